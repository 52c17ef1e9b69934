"""Which S3 library the remote tier uses: ``python -m bench.s3_libraries`` uploads and downloads
the same file (1 GiB of random bytes by default) with obstore, boto3 (its transfer manager, and
our own parallel multipart with ``upload_part``/ranged ``get_object``) and s3fs, against one
SeaweedFS server on loopback, each ``--reps`` times, and prints MiB/s. A library that is not
installed in this interpreter is skipped (s3fs's current release pins an older botocore than
boto3's: run it from its own venv with ``--endpoint``, ``--bucket`` and the AWS_* variables of a
server this one left running: ``--keep``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PART = 16 << 20
THREADS = 8


def _obstore(endpoint: str, bucket: str):
    import obstore
    from obstore.store import S3Store

    store = S3Store(bucket, endpoint=endpoint, region="us-east-1", client_options={"allow_http": True},
                    access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                    secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"])

    def up(path: Path, key: str) -> None:
        obstore.put(store, key, path, chunk_size=PART, max_concurrency=THREADS)

    def down(key: str, size: int, out: bytearray) -> None:
        ranges = [(a, min(size, a + PART)) for a in range(0, size, PART)]
        got = obstore.get_ranges(store, key, starts=[a for a, _ in ranges], ends=[b for _, b in ranges])
        for (a, b), buf in zip(ranges, got):
            out[a:b] = memoryview(buf)
    return up, down


def _boto_client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        config=Config(max_pool_connections=THREADS * 2,
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


def _boto_transfer(endpoint: str, bucket: str):
    from boto3.s3.transfer import TransferConfig

    s3 = _boto_client(endpoint)
    cfg = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=THREADS)

    def up(path: Path, key: str) -> None:
        s3.upload_file(str(path), bucket, key, Config=cfg)

    def down(key: str, size: int, out: bytearray) -> None:
        import io

        buf = io.BytesIO()
        s3.download_fileobj(bucket, key, buf, Config=cfg)
        out[:] = buf.getbuffer()
    return up, down


def _boto_parts(endpoint: str, bucket: str):
    s3 = _boto_client(endpoint)

    def up(path: Path, key: str) -> None:
        size = path.stat().st_size
        uid = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        fd = os.open(path, os.O_RDONLY)

        def part(n: int) -> dict:
            body = os.pread(fd, PART, n * PART)
            return {"PartNumber": n + 1, "ETag": s3.upload_part(Bucket=bucket, Key=key, UploadId=uid,
                                                                PartNumber=n + 1, Body=body)["ETag"]}
        try:
            with ThreadPoolExecutor(THREADS) as pool:
                parts = list(pool.map(part, range((size + PART - 1) // PART)))
        finally:
            os.close(fd)
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": parts})

    def down(key: str, size: int, out: bytearray) -> None:
        view = memoryview(out)

        def part(a: int) -> None:
            body = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={a}-{min(size, a + PART) - 1}")["Body"]
            body.readinto(view[a:min(size, a + PART)]) if hasattr(body, "readinto") else \
                view[a:min(size, a + PART)].__setitem__(slice(None), body.read())
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(part, range(0, size, PART)))
    return up, down


def _s3fs(endpoint: str, bucket: str):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
                           max_concurrency=THREADS)  # (s3fs >= 2023.x)

    def up(path: Path, key: str) -> None:
        fs.put_file(str(path), f"{bucket}/{key}", chunksize=PART)

    def down(key: str, size: int, out: bytearray) -> None:
        out[:] = fs.cat_file(f"{bucket}/{key}")
    return up, down


LIBRARIES = {"obstore": _obstore, "boto3 transfer manager": _boto_transfer,
             "boto3 upload_part/ranged get": _boto_parts, "s3fs": _s3fs}


def measure(endpoint: str, bucket: str, mib: int, reps: int, work: Path) -> list[tuple[str, str, float]]:
    path = work / "blob"
    if not path.exists():
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
    size = path.stat().st_size
    expect = path.read_bytes()
    out = []
    for name, make in LIBRARIES.items():
        try:
            up, down = make(endpoint, bucket)
        except ImportError:
            continue
        ups, downs = [], []
        for r in range(reps):
            key = f"libs/{name.split()[0]}-{r}"
            t0 = time.perf_counter()
            up(path, key)
            ups.append(time.perf_counter() - t0)
            got = bytearray(size)
            t0 = time.perf_counter()
            down(key, size, got)
            downs.append(time.perf_counter() - t0)
            assert got == expect, f"{name}: the download differs from the upload"
        for what, times in (("upload", ups), ("download", downs)):
            mibs = mib / statistics.median(times)
            out.append((name, what, mibs))
            print(f"{name:30s} {what:8s} {mibs:8.0f} MiB/s  (median of {reps}; {times})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--endpoint")
    ap.add_argument("--bucket", default="snapd")
    ap.add_argument("--keep", action="store_true", help="leave the server running (for s3fs's venv)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        if args.endpoint:
            measure(args.endpoint, args.bucket, args.mib, args.reps, Path(work))
            return
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.s3_server import S3Server

        server = S3Server.start(Path(work) / "s3")
        os.environ.update({k: v for k, v in server.env().items() if k.startswith("AWS_")})
        try:
            measure(server.endpoint, server.bucket, args.mib, args.reps, Path(work))
        finally:
            if args.keep:
                print(f"left running: {server.endpoint} pid {server.proc.pid}", flush=True)
            else:
                server.stop()


if __name__ == "__main__":
    main()
