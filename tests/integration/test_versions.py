"""One protocol, checked on every message: a daemon run as a service and a job's environment can hold
different snapd versions, and each side refuses the other's messages saying which is which and
what to upgrade (docs/PROTOCOL.md)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import zmq

import snapd.client as snapd
from snapd import __version__, protocol
from snapd.errors import SnapdError

NEWER_DAEMON = ("import sys, snapd.protocol as p; p.PROTOCOL_VERSION = 3; from snapd.cli import main; "
                "raise SystemExit(main(sys.argv[1:]))")


def test_a_client_of_another_version_is_told_both_versions_and_what_to_do(daemon) -> None:
    """(A client of 0.1.0's unreleased protocol 1, say: it matches replies by id, so the refusal
    carries the id of its hello.)"""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.connect(daemon.endpoint)
    s.send(json.dumps({"v": 1, "snapd": "0.0.9", "type": "hello", "id": 7, "job": "old", "pid": os.getpid(),
                       "on_busy": "wait"}).encode())
    assert s.poll(10_000)
    r = json.loads(s.recv())
    s.close(0)
    assert r["type"] == "error" and r["code"] == "version" and r["id"] == 7
    assert f"this client speaks snapd protocol 1 (snapd '0.0.9'); this daemon speaks snapd protocol " \
           f"{protocol.PROTOCOL_VERSION} (snapd {__version__})" in r["message"]
    assert "install the daemon's snapd version in the job's environment" in r["message"]
    with snapd.connect("after", endpoint=daemon.endpoint, spawn=False) as c:  # (and it serves on)
        assert c.status()["clients"]


def test_a_daemon_of_another_version_is_refused_by_the_client_with_both_versions(start) -> None:
    d = start(command=[sys.executable, "-c", NEWER_DAEMON])
    with pytest.raises(SnapdError) as e:
        snapd.connect("j", endpoint=d.endpoint, spawn=False)
    assert e.value.code == "version"
    assert f"the daemon speaks snapd protocol 3 (snapd '{__version__}'); this process has snapd " \
           f"{__version__} (protocol {protocol.PROTOCOL_VERSION})" in str(e.value)
