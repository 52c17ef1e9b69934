"""Markdown tables (medians, min-max, snapd as a ratio to each peer) and PNG plots
from one run's measurements."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

UNITS = {"s": lambda v: f"{v:.3f}", "x": lambda v: f"{v:.3f}", "B/s": lambda v: f"{v / 1e6:.0f} MB/s"}


def _cell(values: list[float], unit: str) -> str:
    fmt = UNITS.get(unit, lambda v: f"{v:.4g}")
    med = statistics.median(values)
    return fmt(med) + (f" ({fmt(min(values))}-{fmt(max(values))})" if len(values) > 1 else "")


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        size = r.get("state_bytes") or r.get("state_bytes_each")
        out[(r["scenario"], r["metric"], r.get("data"),
             size if r["scenario"] == "durable" else None)].append(r)
    return out


def markdown(rows: list[dict], machine: dict[str, Any], command: str) -> str:
    v = machine["versions"]
    lines = ["# snapd benchmarks\n", f"`{command}` on {machine['cores']} cores, "
             f"{machine['memory_bytes'] / 2**30:.0f} GiB memory, disk {machine['disk']['device']} "
             f"({'rotational' if machine['disk']['rotational'] else 'non-rotational'}); "
             + ", ".join(f"{k} {val}" for k, val in v.items()) + ". Median (min-max) over repeats.\n"]
    for (scenario, metric, data, size), group in _groups(rows).items():
        title = f"## {scenario}: {metric}" + (f" ({data})" if data else "") + \
            (f", state {size / 2**20:.0f} MiB" if size else "")
        unit = group[0]["unit"]
        lines += [title, "", f"| method | {metric} [{unit}] |", "|---|---|"]
        meds = {}
        for r in group:
            lines.append(f"| {r['method']} | {_cell(r['values'], unit)} |")
            meds[r["method"]] = statistics.median(r["values"])
        ours = [m for m in meds if m.startswith("snapd")]
        peers = [m for m in meds if not m.startswith(("snapd", "no snapshots")) and meds[m] > 0]
        if ours and peers and scenario != "compression":
            lines += ["", "| snapd ÷ peer | " + " | ".join(peers) + " |", "|---" * (len(peers) + 1) + "|"]
            for m in ours:
                lines.append(f"| {m} | " + " | ".join(f"{meds[m] / meds[p]:.3f}x" for p in peers) + " |")
        lines.append("")
    return "\n".join(lines)


def plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    stall = [r for r in rows if r["scenario"] == "stall" and r["metric"] == "stall_per_snapshot"]
    if stall:
        fig, ax = plt.subplots(figsize=(8, 4))
        names = [r["method"] for r in stall]
        meds = [statistics.median(r["values"]) for r in stall]
        err = [[m - min(r["values"]) for m, r in zip(meds, stall)],
               [max(r["values"]) - m for m, r in zip(meds, stall)]]
        ax.barh(names, meds, xerr=err, color=["#2a7" if n.startswith("snapd") else "#889" for n in names])
        ax.set_xscale("log")
        ax.set_xlabel("training stall per snapshot, s (log)")
        ax.set_title(f"stall per snapshot, state {stall[0]['state_bytes'] / 2**30:.2f} GiB")
        fig.tight_layout()
        made.append(_save(fig, out / "stall.png"))
    durable = [r for r in rows if r["scenario"] == "durable" and r["metric"] == "time_to_durable"]
    if durable:
        fig, ax = plt.subplots(figsize=(7, 4))
        by: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in durable:
            by[r["method"]].append((r["state_bytes"], statistics.median(r["values"])))
        for name, pts in by.items():
            pts.sort()
            ax.plot([p[0] / 2**30 for p in pts], [p[1] for p in pts], marker="o", label=name,
                    linestyle="--" if name.startswith("disk floor") else "-")
        ax.set_xlabel("state, GiB")
        ax.set_ylabel("time to durable, s")
        ax.legend(fontsize=7)
        fig.tight_layout()
        made.append(_save(fig, out / "durable.png"))
    comp = [r for r in rows if r["scenario"] == "compression" and r["metric"] == "ratio"]
    if comp:
        fig, ax = plt.subplots(figsize=(8, 4))
        datas = list(dict.fromkeys(r["data"] for r in comp))
        codecs = list(dict.fromkeys(r["method"] for r in comp))
        width = 0.8 / len(codecs)
        for j, c in enumerate(codecs):
            vals = [next(r["values"][0] for r in comp if r["data"] == d and r["method"] == c) for d in datas]
            ax.bar([i + j * width for i in range(len(datas))], vals, width, label=c)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(datas))], datas, fontsize=8)
        ax.set_ylabel("compression ratio (raw / stored)")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(_save(fig, out / "compression.png"))
    return made


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
