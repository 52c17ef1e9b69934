"""The daemon as a real subprocess, for integration tests."""

from __future__ import annotations

import importlib.util
import itertools
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapd.client.connection import probe
from snapd.errors import ProtocolError


@dataclass
class Daemon:
    proc: subprocess.Popen
    endpoint: str
    root: Path
    log: Path
    args: list[str]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, cond, timeout: float = 10.0) -> None:
        """Until ``cond()`` holds (the daemon's threads work on after a reply); fails with the log."""
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_daemon(tmp: Path, *extra: str, name: str = "d", root: Path | None = None,
                 endpoint: str | None = None, env: dict | None = None,
                 command: list[str] | None = None) -> Daemon:
    """``snapd serve`` (or ``command`` + ``serve``) as a subprocess, answering once this returns."""
    root = root or tmp / "root"
    endpoint = endpoint or f"ipc://{tmp}/{name}.sock"
    log = tmp / f"{name}.log"
    args = [*(command or [sys.executable, "-m", "snapd"]), "serve", "--root", str(root), "--endpoint",
            endpoint, "--host-buffer-bytes", str(32 << 20), *extra]
    with open(log, "ab") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=f, cwd="/", env={**os.environ, **(env or {})})
    d = Daemon(proc, endpoint, root, log, args)
    wait_ready(d)
    return d


def wait_ready(d: Daemon, timeout: float = 20) -> None:
    """Poll until the daemon answers; on timeout, fail showing its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if d.proc.poll() is not None:
            pytest.fail(f"daemon exited with {d.proc.returncode}:\n{d.log_text()}")
        try:
            if probe(d.endpoint, 0.2) is not None:
                return
        # (a daemon of another protocol version answers too: tests/integration/test_versions.py)
        except ProtocolError as e:
            if e.code == "version":
                return
            raise
    pytest.fail(f"daemon not ready after {timeout} s:\n{d.log_text()}")


@pytest.fixture
def daemon(tmp_path):
    d = start_daemon(tmp_path)
    yield d
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(30)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()
    forget_buffers(d)


@pytest.fixture
def start(tmp_path):
    started: list[Daemon] = []

    def _start(*extra: str, **kw) -> Daemon:
        d = start_daemon(tmp_path, *extra, **kw)
        started.append(d)
        return d
    yield _start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        forget_buffers(d)


def forget_buffers(d: Daemon) -> None:
    """The host buffers a killed daemon left in /dev/shm (a daemon's next start removes them; the
    last one a test run kills has none after it: 64 MiB each run, until snapd runs again)."""
    for leftover in Path("/dev/shm").glob(f"snapd-{d.proc.pid}-*"):
        leftover.unlink(missing_ok=True)


def run_client(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd="/",
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture
def client_proc():
    return run_client


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory):
    """One daemon shared by a module's tests (hypothesis runs many examples against it)."""
    d = start_daemon(tmp_path_factory.mktemp("daemon"))
    yield d
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(30)


@pytest.fixture
def preempt_next_send(monkeypatch):
    """``arm(client, state)``: just before the client's next snapshot message goes out, it sends
    an emergency snapshot of ``state`` (step 99) and waits for it, as a preemption handler that
    runs between any two bytecodes would; the daemon then holds that snapshot's layout."""
    from snapd.client.connection import Connection

    real = Connection.send
    armed: dict = {}

    def send(self, kind, **fields):
        if kind == "snapshot" and armed:
            client, state = armed.pop("client"), armed.pop("state")
            client.snapshot(state, step=99, emergency=True).wait(30)
        return real(self, kind, **fields)
    monkeypatch.setattr(Connection, "send", send)
    return lambda client, state: armed.update(client=client, state=state)


@pytest.fixture
def sent(monkeypatch):
    """The fields of every snapshot message the client sends (the real send still happens)."""
    from snapd.client.connection import Connection

    out: list[dict] = []
    real = Connection.send

    def spy(self, kind, **fields):
        if kind == "snapshot":
            out.append(fields)
        return real(self, kind, **fields)
    monkeypatch.setattr(Connection, "send", spy)
    return out


HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path) -> types.ModuleType:
    """A helper module of the tests by path (the tests run with --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def peer_nodes() -> types.ModuleType:
    """tests/integration/peer_nodes.py: ``Nodes(tmp, start, n, *flags)``, daemons standing for the
    nodes of a cluster; ``ranks(nodes, job, run, steps, ...)``, a job's ranks on them; ``free_ports``."""
    return _load("snapd_tests_peer_nodes", HERE / "peer_nodes.py")


@pytest.fixture(scope="session")
def host_kernel_lib(tmp_path_factory) -> Path:
    """The segment kernel built for the host (tests/kernel_host); skips without g++."""
    lib = _load("snapd_tests_host_kernel", HERE.parent / "kernel_host" / "host_kernel.py").build(
        tmp_path_factory.mktemp("kernel"))
    if lib is None:
        pytest.skip("no g++ to build the segment kernel for the host")
    return lib


_arenas = itertools.count()


@pytest.fixture
def fake_gpu(tmp_path, host_kernel_lib, monkeypatch):
    """The GPU path on stand-in GPUs (tests/integration/fake_cuda.py): ``start(*flags, staging=,
    devices=1, fail="", modes=())`` starts a daemon on the CUDA backend over them (``fail``:
    ``open``, ``copy``, ``context`` or ``sync``, a daemon whose CUDA IPC, device copies, contexts or
    synchronizations fail;
    ``modes``: each device's compute mode); ``array(values, within=None,
    device=0)`` puts NumPy values in a device's memory (``within``: an ``alloc(nbytes)``'s (id,
    address) on device 0, for sub-blocks); ``bad`` holds allocation ids whose IPC handles will not
    open in the daemon; ``uuid(ordinal)`` names a device;
    ``preempt(script, daemon)`` runs a trainer script to READY and SIGTERMs it (its stderr)."""
    fake = _load("snapd_tests_fake_cuda", HERE / "fake_cuda.py")
    n = next(_arenas)
    arenas = [fake.Arena(Path("/dev/shm") / f"snapd-fake-gpu-{os.getpid()}-{n}-{i}",
                         ordinal=i) for i in range(2)]
    bad: set[int] = set()
    fake.install_client(monkeypatch, arenas, bad)
    started: list[Daemon] = []

    def _preempt(script: str, d: Daemon) -> str:
        """Run ``script`` (argv: this folder, the daemon's endpoint, an arena path for its stand-in
        device) as a trainer until it prints READY, SIGTERM it, and return its stderr once the
        signal, handed on after the emergency snapshot, has ended it."""
        arena = Path("/dev/shm") / f"snapd-fake-gpu-trainer-{os.getpid()}-{n}"
        proc = subprocess.Popen([sys.executable, "-c", script, str(HERE), d.endpoint, str(arena)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        try:
            assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == -signal.SIGTERM  # handed on to the default action, once persisted
            return proc.stderr.read()
        finally:
            proc.kill()
            proc.wait()
            arena.unlink(missing_ok=True)

    def _start(*extra: str, staging: int = 256 << 10, devices: int = 1, fail: str = "",
               modes: tuple[int, ...] = ()) -> Daemon:
        d = start_daemon(tmp_path, "--backend", "cuda", *extra, name=f"fake{len(started)}",
                         command=[sys.executable, str(HERE / "fake_cuda_daemon.py"), str(host_kernel_lib),
                                  str(staging), str(devices)],
                         env={"SNAPD_CHUNK_BYTES": str(64 << 10), "SNAPD_FAKE_CUDA_FAIL": fail,
                              "SNAPD_FAKE_CUDA_MODES": ",".join(map(str, modes))})
        started.append(d)
        return d
    yield types.SimpleNamespace(
        start=_start, array=lambda v, within=None, device=0: fake.DeviceArray(arenas[device], v, within),
        alloc=arenas[0].alloc, free=arenas[0].free, bad=bad, uuid=fake.uuid, preempt=_preempt)
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        forget_buffers(d)
    for arena in arenas:
        arena.close()


@pytest.fixture
def torchrun(tmp_path):
    """``torchrun(script, *args, nproc=2)``: a real multi-rank job (``torchrun --standalone``, gloo on
    CPU) run to its end from ``tmp_path``; its output, once it exited 0 (else the test fails with it)."""
    import shutil

    launcher = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")

    def run(script: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
        # (TMPDIR: torchrun's log directory, a torchelastic_* a run, stays with the test's files)
        out = subprocess.run([launcher, "--standalone", "--nproc-per-node", str(nproc), str(script), *args],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env={**os.environ, "TMPDIR": str(tmp_path)})
        assert out.returncode == 0, out.stdout + out.stderr
        return out
    return run



@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A real S3 server (SeaweedFS, tests/s3_server.py) on loopback, its credentials and endpoint in
    this process's environment (the daemons started after inherit them)."""
    server = _load("s3_server", Path(__file__).parent.parent / "s3_server.py").S3Server.start(tmp_path / "s3")
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SNAPD_REMOTE", raising=False)
    yield server
    # (killed: a test over has nothing in it to keep, and after clients were killed mid-upload weed's
    # graceful stop waited out its 15 s three times a CI run)
    server.kill()
