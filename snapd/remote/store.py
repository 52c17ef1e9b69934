"""One S3 bucket and prefix (``s3://bucket/prefix``): the calls the remote tier makes, with every
failure turned into a ``RemoteError`` that names the object and what the store said.

boto3 (the ``s3`` extra) does the talking: of the three libraries measured (bench/s3_libraries.py,
docs/remote.md) it is the one that can list and abort the multipart uploads a killed daemon left
behind, and with our own parallel ``upload_part`` and ranged GETs it was within the noise of the
fastest. Credentials come from the standard AWS chain (environment, ~/.aws files, instance
roles) and ``endpoint_url`` (the daemon's config, else ``AWS_ENDPOINT_URL``), never from
snapshot data or a client's message.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from snapd.errors import InvalidArgument, RemoteError

log = logging.getLogger(__name__)

URL_RE = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?\Z")
PART_BYTES = 16 << 20  # one multipart part (and the unit of memory one upload thread holds)
T = TypeVar("T")


def parse_url(url: object) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` -> (bucket, prefix without surrounding slashes)."""
    m = URL_RE.match(url) if isinstance(url, str) else None
    prefix = (m.group(2) or "").strip("/") if m else ""
    if not m or ".." in prefix.split("/") or "//" in prefix:
        raise InvalidArgument(f"invalid remote {url!r}: use s3://bucket or s3://bucket/prefix (a bucket "
                              "name of 3-63 lowercase letters, digits, '.' or '-')")
    return m.group(1), prefix


class _Sessions:
    """New boto3 sessions that share one botocore model loader. A session of its own per store
    resolves credentials afresh (environment, files, roles as they are now); loading the S3
    service's models again is what makes a new session cost ~0.1 s, a tenth of a 1 GiB restore's
    transfer at 4 Gbit/s, where the shared loader's cost ~0.02 s."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loader: Any = None

    def new(self) -> Any:
        import boto3
        import botocore.session

        core = botocore.session.get_session()
        with self._lock:
            if self._loader is None:
                self._loader = core.get_component("data_loader")
            else:
                core.register_component("data_loader", self._loader)
        return boto3.session.Session(botocore_session=core)


_sessions = _Sessions()


def answered_within(call: Callable[[], T], wait_s: float, what: str) -> T:
    """``call()``'s result, or RemoteError if it has not answered within ``wait_s`` (a bucket that
    takes connections and answers nothing holds the SDK 60 s a try, 3 tries). The call is then left
    on a daemon thread: it holds up neither its caller nor the process's exit."""
    got: list[Any] = []
    done = threading.Event()

    def ask() -> None:
        try:
            got.append(call())
        except BaseException as e:  # (handed to the caller's thread)
            got.append(e)
        done.set()

    threading.Thread(target=ask, name="snapd-remote-ask", daemon=True).start()
    if not done.wait(wait_s):
        raise RemoteError(f"{what} did not answer within {wait_s:.0f} s")
    if isinstance(got[0], BaseException):
        raise got[0]
    return got[0]


def _describe(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict) and resp.get("Error"):
        err = resp["Error"]
        return f"{err.get('Code', '?')}: {err.get('Message', '') or 'no message'}"
    return f"{type(e).__name__}: {e}"


@dataclass
class Store:
    bucket: str
    prefix: str
    client: Any
    endpoint_url: str | None = None

    @classmethod
    def open(cls, url: str, *, endpoint_url: str | None = None, threads: int = 8,
             credentials: tuple[str, str] | None = None) -> Store:
        bucket, prefix = parse_url(url)
        try:
            import boto3  # noqa: F401 (what is missing, said here)
            from botocore.config import Config
        except ImportError:
            raise InvalidArgument("the remote tier needs boto3: pip install 'snapd[s3]'") from None
        endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                        or os.environ.get("AWS_ENDPOINT_URL"))
        cfg = Config(max_pool_connections=max(10, threads * 2), connect_timeout=5, read_timeout=60,
                     retries={"max_attempts": 3, "mode": "standard"},
                     # chunk checksums are ours (xxh3 per chunk, checked on every read); the SDK's
                     # own CRC of each part would cost a core at disk speed for nothing more
                     request_checksum_calculation="when_required",
                     response_checksum_validation="when_required")
        kw: dict[str, Any] = {"endpoint_url": endpoint_url, "config": cfg}
        if credentials is not None:
            kw["aws_access_key_id"], kw["aws_secret_access_key"] = credentials
        if not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
            kw["region_name"] = "us-east-1"
        return cls(bucket, prefix, _sessions.new().client("s3", **kw), endpoint_url)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _call(self, what: str, key: str, fn: Any, **kw: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kw)
        except Exception as e:  # botocore's errors: client, connection, credentials
            raise RemoteError(f"{what} {self.where(key)}: {_describe(e)}") from None

    def check(self) -> None:
        """Reach the bucket with these credentials (``serve --check-config``, the daemon's start)."""
        where = f"{self.endpoint_url or 'AWS'}"
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.key(""), MaxKeys=1)
        except Exception as e:
            raise RemoteError(f"cannot use {self.url} at {where}: {_describe(e)}") from None

    # -- objects ---------------------------------------------------------------------------
    def put(self, key: str, body: bytes) -> None:
        self._call("cannot write", key, self.client.put_object, Key=key, Body=body)

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such object."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as e:
            if _describe(e).startswith(("NoSuchKey", "404")):
                return None
            raise RemoteError(f"cannot read {self.where(key)}: {_describe(e)}") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        body = self._call("cannot read", key, self.client.get_object, Key=key,
                          Range=f"bytes={offset}-{offset + length - 1}")["Body"]
        try:
            return body.read()
        except Exception as e:
            raise RemoteError(f"cannot read {self.where(key)} @ {offset}: {_describe(e)}") from None

    def get_range_into(self, key: str, offset: int, out: memoryview) -> int:
        """Read ``len(out)`` bytes at ``offset`` straight into ``out`` (no bytes object in between);
        returns how many came."""
        if len(out) == 0:
            return 0
        body = self._call("cannot read", key, self.client.get_object, Key=key,
                          Range=f"bytes={offset}-{offset + len(out) - 1}")["Body"]
        got = 0
        try:
            while got < len(out):
                n = body.readinto(out[got:])
                if not n:
                    break
                got += n
        except Exception as e:
            raise RemoteError(f"cannot read {self.where(key)} @ {offset}: {_describe(e)}") from None
        finally:
            body.close()
        return got

    def list(self, prefix: str) -> dict[str, int]:
        """Every object under ``prefix``: key -> size."""
        return {key: size for key, (_, size) in self.list_tags(prefix).items()}

    def list_tags(self, prefix: str) -> dict[str, tuple[str, int]]:
        """Every object under ``prefix``: key -> (ETag, size) (another ETag when it is written anew)."""
        out: dict[str, tuple[str, int]] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                out.update({o["Key"]: (o.get("ETag", ""), o["Size"]) for o in page.get("Contents", [])})
        except Exception as e:
            raise RemoteError(f"cannot list {self.where(prefix)}: {_describe(e)}") from None
        return out

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            got = self._call("cannot delete under", batch[0], self.client.delete_objects,
                             Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            if got.get("Errors"):
                e = got["Errors"][0]
                raise RemoteError(f"cannot delete {self.where(e.get('Key', '?'))}: {e.get('Code')}: "
                                 f"{e.get('Message')}")

    # -- multipart ---------------------------------------------------------------------------
    def upload_file(self, key: str, path: str, size: int, pool: Any, pace: Any = None,
                    part_bytes: int = PART_BYTES) -> None:
        """Upload a file: one PUT if small, else a multipart upload whose parts go up on ``pool``;
        ``pace(n)`` is called before ``n`` bytes are sent (the bandwidth bound). A failed multipart
        upload is aborted; one cut off by a kill is found by ``abort_stale`` later."""
        fd = os.open(path, os.O_RDONLY)
        try:
            if size <= part_bytes:
                if pace is not None:
                    pace(size)
                self.put(key, os.pread(fd, size, 0))
                return
            uid = self._call("cannot start an upload of", key, self.client.create_multipart_upload,
                             Key=key)["UploadId"]
            futures: list = []
            try:
                futures = [pool.submit(self._part, key, uid, fd, n, part_bytes, size, pace)
                           for n in range((size + part_bytes - 1) // part_bytes)]
                parts = [f.result() for f in futures]
                self._call("cannot complete the upload of", key, self.client.complete_multipart_upload,
                           Key=key, UploadId=uid, MultipartUpload={"Parts": parts})
            except BaseException:
                for f in futures:
                    f.cancel()
                self._abort(key, uid)
                raise
        finally:
            os.close(fd)

    def _part(self, key: str, uid: str, fd: int, n: int, part_bytes: int, size: int, pace: Any) -> dict:
        length = min(part_bytes, size - n * part_bytes)
        if pace is not None:
            pace(length)
        body = os.pread(fd, length, n * part_bytes)
        if len(body) != length:
            raise RemoteError(f"{self.where(key)}: the local file shrank while uploading it")
        got = self._call(f"cannot upload part {n + 1} of", key, self.client.upload_part, Key=key,
                         UploadId=uid, PartNumber=n + 1, Body=body)
        return {"PartNumber": n + 1, "ETag": got["ETag"]}

    def _abort(self, key: str, uid: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=uid)
        except Exception as e:
            log.warning("could not abort the multipart upload of %s (%s): abort_stale removes it later",
                        self.where(key), _describe(e))

    def abort_stale(self, prefix: str) -> int:
        """Abort the multipart uploads under ``prefix`` that a killed daemon left (call before this
        daemon starts uploading there). Returns how many."""
        n = 0
        got = self._call("cannot list the uploads under", prefix, self.client.list_multipart_uploads,
                         Prefix=prefix)
        for u in got.get("Uploads", []):
            self._abort(u["Key"], u["UploadId"])
            n += 1
        if n:
            log.info("aborted %d multipart upload(s) under %s left by an earlier daemon", n,
                     self.where(prefix))
        return n
