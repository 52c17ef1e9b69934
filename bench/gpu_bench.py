"""The GPU path, measured on a CUDA machine: ``python -m bench.gpu_bench [--sizes 1,4,16]``.

1. Kernels: the shuffle (pack + chunk shuffle) and unshuffle kernels against a
   measured device-to-device copy of the same bytes (bandwidth counts bytes
   read plus bytes written); target >= 80%.
2. Device -> host: a copy into the daemon's kind of host buffer (a /dev/shm
   mapping pinned with cudaHostRegister) against one into cudaHostAlloc'd
   pinned memory; and the daemon's end-to-end copy rate (snapshot() returning
   to the "copied" message) against the same; target >= 80%.
3. For each state size (half bf16, half float32, 64 MiB tensors, on the
   device): the CPU time ``snapshot()`` blocks (target <= 2 ms), the GPU time
   the next step waits at ``fence()`` (right away, and after 100 ms of
   compute), and the time to durable; against torch.save + fsync and PyTorch
   DCP async_save (default), in the same run.
4. Restore onto the device, from page cache (the files just written): snapd
   into new tensors (``device="cuda:0"``) and into the trainer's own
   (``into=``, as a resumed job does), against ``torch.load(map_location=
   "cuda")`` and DCP ``load`` into the same tensors, each with the host memory it takes at its
   peak (``bench.gpu_restore``).
Figures go to bench/results/gpu.jsonl and gpu.md, with the device named.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import snapd.client as snapd
from bench.gpu_restore import peer_restore, restore
from bench.machine import Recorder, describe
from bench.peers import DcpAsync, SnapdDaemon, TorchSave, timed

GIB = 1 << 30
RESULTS = Path(__file__).resolve().parent / "results"


def _time(cp, fn, reps: int = 20) -> float:
    """Median seconds of ``fn`` on the current stream, by CUDA events, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    return statistics.median(times)


def _mixed(a: int, b: int, itemsize: int, mode: int) -> tuple[str, int, list]:
    """A window as a model makes them: 2 tensors of 128 MiB beside 4096 of 64 KiB (norms, biases)."""
    from snapd.kernels import segments as sg

    sizes = [128 << 20] * 2 + [64 << 10] * 4096
    segs, pos = [], 0
    for n in sizes:
        segs += (sg.chunk_segments(a + pos, b + pos, n, itemsize, 4 << 20, mode) if mode != sg.COPY
                 else [(a + pos, b + pos, n, 1, sg.COPY)])
        pos += n
    what = "pack" if mode == sg.COPY else "shuffle bf16"
    return f"{what}, 2 x 128 MiB + 4096 x 64 KiB", pos, segs


def _legacy_launches(segs: list) -> list[tuple[Any, tuple[int, int]]]:
    """v1's launch: one grid row a segment, each as wide as the widest segment needs."""
    from snapd.kernels import segments as sg

    segs = [x for x in segs if x[2]]
    out = []
    for i in range(0, len(segs), sg.MAX_SEGMENTS):
        batch = segs[i:i + sg.MAX_SEGMENTS]
        table = np.array([(src, dst, m, k | mode << 8) for src, dst, m, k, mode in batch], dtype=np.uint64)
        width = max(sg.threads_for(m, k, mode) for _, _, m, k, mode in batch)
        out.append((table, (max(1, min(-(-width // sg.THREADS), sg.MAX_BLOCKS)), len(batch))))
    return out


def kernels(rec: Recorder, nbytes: int, compare: list[Path]) -> None:
    """The segment kernel's modes over ``nbytes`` against a device-to-device copy; each source in
    ``compare`` (an earlier version of kernels/segments.cu) is timed the same way in the same run, and
    its bytes checked against the committed kernel's."""
    import cupy as cp

    from snapd.kernels import segments as sg

    src = cp.random.standard_normal(nbytes // 4, dtype=cp.float32).view(cp.uint8)
    dst = cp.empty_like(src)
    d2d = _time(cp, lambda: cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, 3,
                                                        cp.cuda.get_current_stream().ptr))
    rec.add("kernels", "device-to-device copy", "bandwidth", [2 * nbytes / d2d / 1e9], "GB/s")
    a, b = src.data.ptr, dst.data.ptr
    cases = [("shuffle fp32 (4 MiB chunks)", nbytes, sg.chunk_segments(a, b, nbytes, 4, 4 << 20, sg.SHUFFLE)),
             ("shuffle bf16 (4 MiB chunks)", nbytes, sg.chunk_segments(a, b, nbytes, 2, 4 << 20, sg.SHUFFLE)),
             ("shuffle fp64 (4 MiB chunks)", nbytes, sg.chunk_segments(a, b, nbytes, 8, 4 << 20, sg.SHUFFLE)),
             ("unshuffle fp32 (4 MiB chunks)", nbytes,
              sg.chunk_segments(a, b, nbytes, 4, 4 << 20, sg.UNSHUFFLE)),
             ("pack (copy)", nbytes, [(a, b, nbytes, 1, sg.COPY)]),
             _mixed(a, b, 1, sg.COPY), _mixed(a, b, 2, sg.SHUFFLE)]
    want: dict[str, Any] = {}
    for label, code in [("", sg.source())] + [(f" [{p.name}]", p.read_text()) for p in compare]:
        fn = cp.RawModule(code=code, options=sg.compile_options()).get_function("snapd_segments")
        legacy = "blockIdx.y" in code  # v1 took one grid row a segment

        def run(segs: list, fn: Any = fn, legacy: bool = legacy) -> None:
            if legacy:
                for table, grid in _legacy_launches(segs):
                    fn(grid, (sg.THREADS,), (cp.asarray(table),))
                return
            for launch in sg.launches(segs):
                fn((launch.blocks,), (launch.block,), (cp.asarray(launch.table), np.uint32(launch.segments)))

        for name, moved, segs in cases:
            t = _time(cp, lambda segs=segs: run(segs))
            extra = {}
            if label:
                extra["same_bytes"] = bool((dst[:moved] == want[name]).all())
            else:
                want[name] = dst[:moved].copy()
            rec.add("kernels", name + label, "bandwidth", [2 * moved / t / 1e9], "GB/s",
                    ratio_to_d2d=round(moved * d2d / (nbytes * t), 3), **extra)
    del want


def device_to_host(rec: Recorder, nbytes: int) -> float:
    import cupy as cp

    src = cp.random.standard_normal(nbytes // 4, dtype=cp.float32).view(cp.uint8)
    stream = cp.cuda.get_current_stream().ptr
    pinned = cp.cuda.alloc_pinned_memory(nbytes)
    t_pinned = _time(cp, lambda: cp.cuda.runtime.memcpyAsync(pinned.ptr, src.data.ptr, nbytes, 2, stream), 10)
    rec.add("d2h", "cudaHostAlloc pinned", "bandwidth", [nbytes / t_pinned / 1e9], "GB/s")
    fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="snapd-bench-")
    try:
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        view = np.frombuffer(mm, np.uint8)
        view[::4096] = 0
        address = view.ctypes.data
        cp.cuda.runtime.hostRegister(address, nbytes, 0)
        t = _time(cp, lambda: cp.cuda.runtime.memcpyAsync(address, src.data.ptr, nbytes, 2, stream), 10)
        cp.cuda.runtime.hostUnregister(address)
        rec.add("d2h", "/dev/shm buffer, cudaHostRegister", "bandwidth", [nbytes / t / 1e9], "GB/s",
                ratio_to_pinned=round(t_pinned / t, 3))
        del view
        mm.close()
    finally:
        os.close(fd)
        os.unlink(path)
    return nbytes / t_pinned


def make_state(nbytes: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    per = 64 << 20
    state = {}
    for i in range(max(2, nbytes // per)):
        if i % 2:
            state[f"fp32_{i}"] = torch.randn(per // 4, generator=g, device="cuda")
        else:
            state[f"bf16_{i}"] = torch.randn(per // 2, generator=g, device="cuda").to(torch.bfloat16)
    return state


def compute(ms: float) -> None:
    """About ``ms`` of matrix products queued on the trainer's stream (a training step's work)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(max(1, int(ms / 1.4))):  # ~1.4 ms each at ~790 TFLOP/s
        a @ a


def gpu_wait(client, after_ms: float) -> float:
    """GPU seconds the trainer's stream stands still at fence() (after ``after_ms`` of compute)."""
    compute(after_ms)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    client.fence()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def snapshots(rec: Recorder, size_gib: int, work: Path, pinned_bps: float) -> None:
    nbytes = size_gib * GIB
    state = make_state(nbytes)
    scen = f"{size_gib} GiB"
    daemon = SnapdDaemon(work, nbytes + (64 << 20), "--backend", "cuda")
    try:
        client = snapd.connect(f"gpu{size_gib}", endpoint=daemon.endpoint, spawn=False, keep_last=1)
        t0 = time.perf_counter()
        first = client.snapshot(state, step=100)  # the job's first: pins host buffers, opens handles
        first.wait()
        rec.add(scen, "snapd (CUDA IPC)", "first_snapshot_stall", [first.stall_s])
        rec.add(scen, "snapd (CUDA IPC)", "first_snapshot_durable", [time.perf_counter() - t0])
        stalls, waits_now, waits_later, durable, rates = [], [], [], [], []
        for step in range(3 if size_gib < 16 else 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            p = client.snapshot(state, step=step)
            stalls.append(p.stall_s)
            if step % 2 == 0:  # right away: the GPU waits for the whole copy
                waits_now.append(gpu_wait(client, 0))
                p.wait_copied()
                rates.append(nbytes / (time.perf_counter() - t0))
            else:
                waits_later.append(gpu_wait(client, 100))
            p.wait()
            durable.append(time.perf_counter() - t0)
        codec = p.wait().codec
        restore(rec, scen, "snapd load(device='cuda:0')", lambda: client.restore(device="cuda:0"),
                codec=codec)
        restore(rec, scen, "snapd load(into=the state)", lambda: client.restore(into=state), codec=codec)
        client.close()
    finally:
        daemon.close()
    rec.add(scen, "snapd (CUDA IPC)", "cpu_stall", stalls, tensors=len(state))
    rec.add(scen, "snapd (CUDA IPC)", "gpu_wait_at_once", waits_now)
    if waits_later:
        rec.add(scen, "snapd (CUDA IPC)", "gpu_wait_after_100ms", waits_later)
    rec.add(scen, "snapd (CUDA IPC)", "copy_rate", [r / 1e9 for r in rates], "GB/s",
            ratio_to_pinned=round(statistics.median(rates) / pinned_bps, 3))
    rec.add(scen, "snapd (CUDA IPC)", "durable", durable)
    for peer in (TorchSave(work), DcpAsync(work, fastest=False)):
        stall, dur = [], []
        for step in range(2 if size_gib < 16 else 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            s, handle = timed(lambda peer=peer, step=step: peer.start(state, step))
            handle.wait()
            stall.append(s)
            dur.append(time.perf_counter() - t0)
        peer_restore(rec, scen, peer, state)
        peer.close()
        rec.add(scen, peer.name, "cpu_stall", stall)
        rec.add(scen, peer.name, "durable", dur)
    state.clear()
    torch.cuda.empty_cache()


def report(rec: Recorder, path: Path, device: str) -> None:
    med = {(r["scenario"], r["method"], r["metric"]): statistics.median(r["values"]) for r in rec.rows}
    lines = [f"# GPU path ({device})", "", "| scenario | method | metric | median | unit |",
             "|---|---|---|---|---|"]
    for r in rec.rows:
        extra = "".join(f" ({k} {v})" for k,
                        v in r.items() if k.startswith("ratio") or k in ("same_bytes", "codec"))
        lines.append(f"| {r['scenario']} | {r['method']} | {r['metric']} | "
                     f"{med[(r['scenario'], r['method'], r['metric'])]:.4g}{extra} | {r['unit']} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,16", help="state sizes in GiB")
    ap.add_argument("--work", default="/var/tmp", help="where snapshots are written")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--compare-kernel", action="append", default=[], type=Path, metavar="FILE",
                    help="an earlier segments.cu to time beside the committed one (repeatable)")
    ap.add_argument("--kernels-only", action="store_true", help="time the kernels and stop")
    args = ap.parse_args()
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="snapd-gpu-bench-", dir=args.work))
    device = torch.cuda.get_device_name()
    rec = Recorder(out / "gpu.jsonl", {**describe(work), "gpu": device})
    kernels(rec, GIB, args.compare_kernel)
    pinned = 0.0 if args.kernels_only else device_to_host(rec, GIB)
    for s in ([] if args.kernels_only else [int(x) for x in args.sizes.split(",") if x]):
        (work / f"s{s}").mkdir()
        snapshots(rec, s, work / f"s{s}", pinned)
    rec.close()
    report(rec, out / "gpu.md", device)
    print((out / "gpu.md").read_text())


if __name__ == "__main__":
    main()
