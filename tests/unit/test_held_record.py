"""The record of what each replica holder was sent (snapd.daemon.held_record): written whole, read
back at start with whatever in it is malformed or unsafe left out, and each part read again from
this node's disk only where it is still there."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import zmq

from snapd.daemon import held_record

EP = "tcp://10.0.0.2:7010"


def test_what_is_saved_is_loaded_and_each_part_read_again_from_disk(tmp_path, committed_step) -> None:
    committed_step(tmp_path)
    held_record.save(tmp_path, {EP: [("g", 3, 1, False)], "tcp://10.0.0.3:7010": []})
    assert held_record.load(tmp_path) == {EP: [("g", 3, 1, False)]}
    o = held_record.outgoing(tmp_path, "g", 3, 1, False)
    assert o is not None
    assert (o.job, o.step, o.rank, o.world_size, o.run, o.whole) == ("g", 3, 1, 2, "r", False)
    fds = o.open_files()
    assert fds is not None and len(fds) >= 1
    for fd in fds.values():
        os.close(fd)
    # a part that is not there, or not of that kind, is left out
    assert held_record.outgoing(tmp_path, "g", 4, 1, False) is None
    assert held_record.outgoing(tmp_path, "g", 3, 2, False) is None
    assert held_record.outgoing(tmp_path, "g", 3, 0, True) is None  # (a rank's part, not a single process's)


def test_a_malformed_or_hostile_record_is_left_out_and_the_daemon_goes_on(tmp_path, caplog) -> None:
    path = tmp_path / held_record.RECORD_NAME
    path.write_text("not json")
    assert held_record.load(tmp_path) == {} and "unreadable" in caplog.text
    body = {"v": 1, "peers": {
        EP: [["g", 3, 1, False], ["../../etc", 3, 1, False]],  # (a way out of the root: the whole entry)
        "tcp://0.0.0.0:1": [["g", 3, 0, False]],  # (no address to reach)
        "tcp://10.0.0.4:7010": [["g", -1, 0, False], ["g", 3, 0, "yes"], ["g", 3, 0, False]]}}
    path.write_text(json.dumps(body))
    assert held_record.load(tmp_path) == {"tcp://10.0.0.4:7010": [("g", 3, 0, False)]}
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text(json.dumps({"v": 1, "peers": {EP: [["g", 3, 1, False]]}}))
    assert held_record.load(tmp_path) == {}  # (a link is not followed)


def test_a_restarted_daemon_checks_what_its_last_run_sent_peers_known_now_or_told_later(
        tmp_path, committed_step) -> None:
    """At start the record's parts go to the senders of the peers known then; those of a peer a
    job's ranks tell later (group discovery) wait, and are claimed when it is learned."""
    from snapd.daemon.replication import Replication
    from snapd.peers.directory import PeerDirectory, PeerInfo
    from snapd.peers.keys import PeerKeys, create

    root = tmp_path / "root"
    committed_step(root)
    listed, told = "tcp://127.0.0.1:2", "tcp://127.0.0.1:3"  # (nothing answers there: only the seeding)
    held_record.save(root, {listed: [("g", 3, 0, False)], told: [("g", 3, 1, False), ("g", 9, 1, False)]})
    create(tmp_path / "keys")
    d = PeerDirectory("tcp://127.0.0.1:1", "a", [listed])
    r = Replication(PeerKeys.load(tmp_path / "keys"), d, lambda n: None, 1.0, 3600.0, root)
    try:
        r.take_up_record()
        assert {ep: s.held() for ep, s in r._senders.items()} == {listed: [("g", 3, 0, False)]}
        r._record()  # (a part a holder took meanwhile: the record written anew keeps the unclaimed)
        assert held_record.load(root)[told] == [("g", 3, 1, False), ("g", 9, 1, False)]
        r.claim_record({told: PeerInfo(told, "c")})  # (step 9 is not on this disk: left out)
        assert {ep: s.held() for ep, s in r._senders.items()} == {listed: [("g", 3, 0, False)],
                                                                 told: [("g", 3, 1, False)]}
    finally:
        r.stop()


def test_a_holder_down_for_long_is_said_once_not_at_every_check(tmp_path, committed_step, caplog) -> None:
    from snapd.daemon.replication import Replication
    from snapd.peers.directory import PeerDirectory, PeerInfo
    from snapd.peers.keys import PeerKeys, create

    root = tmp_path / "root"
    committed_step(root)
    down = "tcp://127.0.0.1:2"  # (nothing answers there)
    create(tmp_path / "keys")
    r = Replication(PeerKeys.load(tmp_path / "keys"), PeerDirectory("tcp://127.0.0.1:1", "a"), lambda n: None,
                    0.2, 0.1, root)
    caplog.set_level(logging.INFO, logger="snapd.daemon.peer_sender")
    try:
        s = r._sender(PeerInfo(down, "b"))
        s.seed(held_record.outgoing(root, "g", 3, 0, False))
        deadline = time.monotonic() + 30
        while s.failures < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.failures >= 3
    finally:
        r.stop()
    asked = [rec for rec in caplog.records if "asking what it holds" in rec.getMessage()]
    assert len(asked) >= 3 and [rec.levelno for rec in asked].count(logging.WARNING) == 1, \
        [(rec.levelname, rec.getMessage()) for rec in asked]


def test_a_holder_the_ring_moved_away_from_is_not_asked_for_the_older_part(tmp_path, committed_step) -> None:
    """The newer part of a rank goes to another holder (a node joined, the ranks told other peers):
    the old holder drops the older part once the newer step is complete there, so it must no longer
    be checked for it (else it would be sent again at every check, for ever)."""
    from snapd.daemon.replication import Replication
    from snapd.peers.directory import PeerDirectory
    from snapd.peers.keys import PeerKeys, create

    root = tmp_path / "root"
    committed_step(root)
    create(tmp_path / "keys")
    d = PeerDirectory("tcp://127.0.0.1:1", "a", ["tcp://127.0.0.1:2", "tcp://127.0.0.1:3"])
    r = Replication(PeerKeys.load(tmp_path / "keys"), d, lambda n: None, 0.2, 3600.0, root)
    try:
        (target,) = [p.endpoint for p in d.replica_targets(1, "g")]
        (old,) = [p for p in d.all(job="g") if p.endpoint != target]
        older = held_record.outgoing(root, "g", 3, 0, False)
        assert older is not None
        r._sender(old).seed(older)
        r.add(dataclasses.replace(older, step=4, taken=older.taken + 1), 1)
        assert r._senders[old.endpoint].held() == []  # (no longer asked for step 3)
        same = dataclasses.replace(older, taken=older.taken + 2)
        r._sender(old).seed(same)
        r.add(dataclasses.replace(older, step=2, taken=older.taken + 1), 1)  # (an older one: kept)
        assert r._senders[old.endpoint].held() == [("g", 3, 0, False)]
    finally:
        r.stop()


def test_a_holder_that_refuses_a_lost_copy_is_offered_it_ever_more_rarely_then_takes_it(
        tmp_path, committed_step, caplog, monkeypatch) -> None:
    """A holder restarted with no room for the copy it lost (a real peer server, no replica memory, no
    replica_dir): each check found it missing, offered it, was refused, and warned twice, every
    ``peer_check_s`` for ever, counting it as sent again. Now the offers come after ``peer_check_s``,
    doubling, the first refusal is the one warning, and nothing counts as sent again until the holder
    (given room) takes it."""
    from snapd.daemon import peer_sender
    from snapd.daemon.peer_server import PeerServer
    from snapd.daemon.replication import Replication
    from snapd.peers.directory import PeerDirectory, PeerInfo
    from snapd.peers.keys import PeerKeys, create
    from snapd.peers.replicas import ReplicaStore

    monkeypatch.setattr(peer_sender, "REFUSED_MAX_S", 0.8)
    root = tmp_path / "root"
    committed_step(root)
    create(tmp_path / "keys")
    keys = PeerKeys.load(tmp_path / "keys")
    store = ReplicaStore(0)
    holder = PeerServer("tcp://127.0.0.1:*", "b", keys, tmp_path / "b", store, lambda *a: None)
    holder.start()
    r = Replication(keys, PeerDirectory("tcp://127.0.0.1:1", "a"), lambda n: None, 5.0, 0.1, root)
    caplog.set_level(logging.INFO, logger="snapd.daemon.peer_sender")
    try:
        s = r._sender(PeerInfo(holder.sock.getsockopt_string(zmq.LAST_ENDPOINT), "b"))
        s.seed(held_record.outgoing(root, "g", 3, 0, False))
        deadline = time.monotonic() + 30
        while s._refused.get(("g", 0), (0, 0.0, 0.0))[2] < 0.8 and time.monotonic() < deadline:
            time.sleep(0.02)
        refused = [rec for rec in caplog.records if "refused" in rec.getMessage()]
        lost = [rec for rec in caplog.records if "no longer holds g step 3 rank 0" in rec.getMessage()]
        assert len(refused) >= 4 and len(lost) >= 4, caplog.text  # (offered after 0.1, 0.2, 0.4, 0.8 s)
        assert [rec.levelno for rec in refused + lost].count(logging.WARNING) == 2, caplog.text
        assert "no room for g step 3 rank 0" in refused[0].getMessage() and s.resent == 0
        store.memory_bytes = 1 << 30  # (room made): the next offer is taken
        while not store.held("g") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [(p.step, p.rank) for p in store.held("g")] == [(3, 0)]
        assert s.resent == 1 and ("g", 0) not in s._refused
    finally:
        r.stop()
        holder.stop()
