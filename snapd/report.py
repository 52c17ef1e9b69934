"""What the command line prints: sizes, tables, and ``snapd status`` as text (``--json`` aside)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1.5 GiB``: binary units, one decimal (bytes whole)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned columns two spaces apart, the header first."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def metrics_text(m: dict) -> str:
    """``loss=0.25 acc=0.9``: a snapshot's metrics in one column."""
    return " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def _last_snapshot(last: dict | None) -> str:
    """``step 12: 1.0 GiB cuda_ipc, 8 B inline``: how a client's last snapshot reached the daemon."""
    if not last:
        return "-"
    parts = [f"{human_bytes(n)} {path}" for path, n in last["bytes"].items() if n]
    return f"step {last['step']}: {', '.join(parts) or 'no bytes'}"


def status_text(st: dict) -> str:
    """The daemon's status (``snapd.daemon.status``) as the lines ``snapd status`` prints."""
    c, b, tp = st["counters"], st["buffers"], st["throughput"]
    used, skipped = set(st.get("cuda_devices_in_use") or []), st.get("cuda_devices_skipped") or {}
    devices = [d + (" (in use)" if d in used else "") for d in st.get("cuda_devices") or []]
    devices += [f"{d} skipped: {why}" for d, why in skipped.items()]
    # (grown ones differ; older daemons send no sizes)
    sizes = sorted(set(b.get("sizes") or [b["bytes_each"]]))
    grow = f", growing to {human_bytes(b['max_bytes_each'])} each and {human_bytes(b['max_bytes'])} in all" \
        if b.get("max_bytes", 0) > sum(b.get("sizes") or []) else ""
    lines = [
        f"snapd {st['version']} pid {st['pid']} up {st['uptime_s']:.0f} s on {st['endpoint']}",
        f"backend {st.get('backend', '-')}; GPU path: "
        f"{', '.join(devices) or 'off (device tensors are staged by the clients)'}",
        f"root {st['root']}; buffers {b['busy']}/{b['count']} busy x "
        f"{' / '.join(human_bytes(x) for x in sizes)}{grow}; waiting {st['waiting_for_buffer']}",
        f"persisted {c['persisted']} ({human_bytes(c['bytes_raw'])} raw, {human_bytes(c['bytes_stored'])} "
        f"stored), failed {c['failed']}, skipped {c['skipped']}; in flight {st['in_flight'] or 0}",
        f"last {tp['window_s']:.0f} s: {tp['snapshots']} snapshots, {human_bytes(tp['raw_bytes_per_s'])}/s "
        f"raw, {human_bytes(tp['stored_bytes_per_s'])}/s stored"]
    lines += [f"job {j['job']} ({j['dir']}): last step {j['last_step']}, persisted {j['persisted']}, "
              f"failed {j['failed']}" + _persist_times(j) for j in st["jobs"]]
    rows = [[cl["job"], f"{cl.get('rank', 0)}/{cl.get('world_size', 1)}", str(cl["pid"]),
             str(cl.get("uid", "-")), str(cl.get("held_buffers", "-")),
             st["codecs"].get(cl["job"], {}).get("codec", "-"), _last_snapshot(cl.get("last_snapshot"))]
            for cl in st["clients"]]
    lines.append(table(rows, ["JOB", "RANK", "PID", "UID", "BUFFERS", "CODEC", "LAST SNAPSHOT"]) if rows
                 else "no clients connected")
    for w in st.get("rank_commits", []):  # a rank's part durable, its step not yet global
        lines.append(f"job {w['job']} step {w['step']}: rank {w['rank']} of {w['world_size']} waits "
                     f"{w['waited_s']:.0f}/{w['timeout_s']:.0f} s for rank(s) "
                     f"{', '.join(map(str, w['missing_ranks'])) or '-'}")
    r = st.get("remote")
    if r:
        lines.append(f"remote {r['remote']}: backlog {r['backlog']} ({human_bytes(r['backlog_bytes'])}, "
                     f"oldest {r['oldest_s']:.0f} s), uploaded {r['uploaded']} "
                     f"({human_bytes(r['uploaded_bytes'])}), failures {r['failures']}, skipped {r['skipped']}"
                     + (f"; uploading {r['uploading']}" if r.get("uploading") else ""))
        if r.get("last_error"):
            lines.append(f"remote error: {r['last_error']}")
    lines += _peers(st.get("peers"))
    if st["last_error"]:
        lines.append(f"last error: {st['last_error']}")
    return "\n".join(lines)


def _peers(p: dict | None) -> list[str]:
    if not p:
        return []
    held = p["held"]
    told = p.get("learned_jobs") or 0  # (jobs whose ranks told this daemon their other nodes)
    targets = ", ".join(p["targets"]) or ("no peer of its own" if told else "no peer yet")
    lines = [f"peers: {p['endpoint']} (node {p['node']}), {p['replicas']} replica(s) of each part to "
             f"{targets}{f'; {told} job(s) told their nodes by their ranks' if told else ''}; holding "
             f"{human_bytes(held['memory_bytes'])} of {human_bytes(held['memory_budget_bytes'])} for peers, "
             f"refused {p['refused']}"]
    for s in p["peers"]:
        lines.append(f"peer {s['endpoint']} ({s['node']}): {s['state']}, lag {s['backlog_parts']} part(s) "
                     f"({human_bytes(s['backlog_bytes'])}, oldest {s['oldest_s']:.0f} s"
                     + (f", sending {s['sending']}" if s.get("sending") else "") + "), replicated "
                     f"{human_bytes(s['replicated_bytes'])}, failures {s['failures']}"
                     + (f", sent again {s['resent_parts']}" if s.get("resent_parts") else "")
                     + (f"; {s['last_error']}" if s.get("last_error") else ""))
    for job, steps in sorted(p["jobs"].items()):
        for step, w in sorted(steps.items(), key=lambda kv: -int(kv[0])):
            disks = "; ".join(f"{n}: {_ranks(r)}" for n, r in sorted(w["disks"].items()))
            reps = "; ".join(f"{n}: {_ranks(r)}" for n, r in sorted(w["replicas"].items())) or "none"
            state = ("complete on disks" if w["complete_on_disks"] else "complete" if w["complete"]
                     else "incomplete")
            remote = {True: "; remote: committed", False: "; remote: absent", None: ""}[w.get("remote")]
            lines.append(f"job {job} step {step} ({state}): disks {disks}; replicas {reps}{remote}")
    return lines


def _ranks(ranks: list[int]) -> str:
    return "ranks " + ",".join(map(str, ranks))


def _persist_times(j: dict) -> str:
    out = f", last took {j['last_persist_s']:.2f} s" if j.get("last_persist_s") is not None else ""
    if j.get("last_emergency_s") is not None:
        out += f", last emergency snapshot {j['last_emergency_s']:.2f} s"
        grace = j.get("last_emergency_grace_s")
        if grace is not None:
            out += f" of the {grace:.1f} s the scheduler gave" + (
                " (TOO SHORT: give the signal more time)" if j["last_emergency_s"] > grace else "")
    return out
