"""What the server does with the stages' reports (over the inproc events socket).

- ``copied`` (the registered-region copy thread, or the GPU copier once the
  device copies are done): the buffer now holds the bytes; tell the client.
  From the GPU copier the snapshot is also handed to the encode/flush stages.
- ``queued`` (GPU copier): the copies are enqueued; the client gets the
  daemon's done events, so its stream can wait on them.
- ``done``: persisted or failed; the buffer goes back, counters and metrics
  move, and the client gets ``persisted`` or the error with its stage.
- ``forgotten`` (GPU copier): a client's handles are closed; its ``bye`` is answered.
- ``buffer_ready`` (the host buffer pool's threads): a buffer made anew (grown,
  or for another uid) goes into the pool and to the request waiting for it.
Runs on the server thread, the only one that sends on the ROUTER socket.
"""

from __future__ import annotations

import json
from typing import Any

import zmq

from snapd import protocol
from snapd.daemon.pipeline import COPIED, EVENTS_ENDPOINT


def post_event(ctx: zmq.Context, event: dict) -> None:
    """Send ``event`` to the server thread from a thread with no events socket of its own."""
    try:
        sock = ctx.socket(zmq.PUSH)
    except zmq.ZMQError:  # the context is closed: the daemon is stopping
        return
    try:
        sock.connect(EVENTS_ENDPOINT)
        sock.send(json.dumps(event).encode())
    finally:
        sock.close(linger=1000)


def on_event(server: Any, event: dict) -> None:
    if event["event"] == "done":
        finish(server, event)
        return
    if event["event"] == "buffer_ready":  # a host buffer made on the pool's thread
        server.leases.replaced()
        return
    if event["event"] == "forgotten":  # the GPU copier closed a leaving client's handles
        server._send(bytes.fromhex(event["peer"]), protocol.reply("bye", event["id"]))
        return
    task = server.tasks.get(event["seq"])
    if task is None:  # already failed and answered
        return
    if event["event"] == "queued":
        server._send(task.peer, protocol.reply("queued", task.req_id, step=task.step, events=event["events"]))
        return
    server.leases.copied(task.lease)
    if event.get("submit"):  # from the GPU copier: the state machine moves here
        task.advance(COPIED)
        server.pipeline.submit(task)
    server._send(task.peer, protocol.reply("copied", task.req_id, step=task.step))


def on_sync(server: Any, peer: bytes, job: str, root: Any, req_id: int) -> bytes | None:
    """``sync``: "synced" once every snapshot of ``job`` under ``root`` now in flight has ended,
    whichever client sent it (a trainer killed a moment ago, whose successor is about to restore:
    its last snapshots are still the daemon's to write). None: answered from ``finish``."""
    seqs = {t.seq for t in server.tasks.values() if t.job == job and t.root == root}
    if not seqs:
        return protocol.reply("synced", req_id)
    server.syncs.append((peer, req_id, seqs))
    return None


def finish(server: Any, event: dict) -> None:
    task = server.tasks.pop(event["seq"])
    for entry in list(server.syncs):
        entry[2].discard(task.seq)
        if not entry[2]:
            server.syncs.remove(entry)
            server._send(entry[0], protocol.reply("synced", entry[1]))
    server.leases.free(None, task.lease)
    server.quotas.refresh(task.root)  # (what retention deleted, what this snapshot added)
    if event["ok"]:
        server.counters["persisted"] += 1
        server.counters["bytes_raw"] += task.raw_bytes
        server.counters["bytes_stored"] += event["stored_bytes"]
        server.metrics.persisted(task.raw_bytes, event["stored_bytes"], event["seconds"])
        server.recent.persisted(task.job, str(task.root / task.job), task.step, task.raw_bytes,
                                event["stored_bytes"])
        reply = protocol.reply("persisted", task.req_id, step=task.step, path=event["path"],
                               codec=event["codec"], stored_bytes=event["stored_bytes"],
                               raw_bytes=task.raw_bytes, seconds=event["seconds"])
    else:
        server.counters["failed"] += 1
        server.metrics.snapshots.labels("failed").inc()
        server.recent.failed(task.job, str(task.root / task.job))
        server.last_error = f"{task.job} step {task.step}: {event['message']}"
        extra = {k: event[k] for k in ("refused", "any_open") if k in event}  # (the GPU copier's ipc_refused)
        reply = protocol.error_reply(task.req_id, event["code"], event["message"], event["stage"], **extra)
    server._send(task.peer, reply)
