"""The remote tier (issue 23), against a real S3 server (SeaweedFS's ``weed mini``) on loopback:
real daemons upload what they commit, a fresh node (an empty root) resumes from the bucket, and
the store's faults (killed mid-upload, down for a while, wrong credentials, a flipped byte, a daemon
SIGKILLed mid-upload) never list a half-uploaded snapshot and never hold up local snapshots."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import snapd.client as snapd
from snapd.errors import ChecksumError, SnapdError
from snapd.remote.remote_job import RemoteJob
from snapd.remote.store import Store

RANK = Path(__file__).parent / "scripts" / "rank_job.py"
FSDP2 = Path(__file__).parent / "scripts" / "fsdp2_job.py"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snapd", *args], capture_output=True, text=True, timeout=120)


def remote_steps(url: str, job: str) -> list[int]:
    return sorted(RemoteJob(Store.open(url), job).steps())


def wait_uploaded(d, count: int, timeout: float = 60) -> dict:
    """Until the daemon says ``count`` uploads are committed and nothing waits."""
    deadline = time.monotonic() + timeout
    while True:
        with snapd.connect("watcher", endpoint=d.endpoint, spawn=False) as c:
            r = c.status()["remote"]
        if r["uploaded"] >= count and r["backlog"] == 0:
            return r
        assert time.monotonic() < deadline, (r, d.log_text()[-3000:])
        time.sleep(0.1)


def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"model": {"w": rng.standard_normal((256, 256)).astype(np.float32),
                      "b": np.full(256, step, np.float32)},
            "step": step}


def test_snapshots_reach_the_bucket_and_a_fresh_node_resumes_from_it(tmp_path, s3, start, digest) -> None:
    url = f"{s3.url}/team"
    d = start("--remote", url, "--metrics-addr", "127.0.0.1:0")
    with snapd.connect("job", endpoint=d.endpoint, spawn=False, keep_last=1) as c:
        for step in (1, 2, 3):
            c.snapshot(state(step), step=step, metrics={"loss": 1.0 / step})
        c.sync()
        wait_uploaded(d, 3)
        scraped = urllib.request.urlopen(c.status()["metrics"], timeout=10).read().decode()
    assert re.search(r"^snapd_remote_uploads_total 3\.0$", scraped, re.M), scraped
    assert re.search(r"^snapd_remote_backlog_snapshots 0\.0$", scraped, re.M)
    assert remote_steps(url, "job") == [1, 2, 3]
    # the local tier kept what its retention keeps, once the older ones were uploaded
    assert sorted(p.name for p in (d.root / "job").glob("step-*")) == ["step-000000000003"]
    listed = cli("ls", url)
    assert listed.returncode == 0 and re.search(r"^job\s+3\s.*latest", listed.stdout, re.M), listed
    assert cli("verify", url).stdout.count("ok ") == 3
    inspected = cli("inspect", f"{url}/job")
    assert "step 3 of job job" in inspected.stdout and "model.w" in inspected.stdout, inspected
    out = tmp_path / "one.safetensors"
    assert cli("export", f"{url}/job/step-000000000001", str(out)).returncode == 0
    from safetensors.numpy import load_file

    assert digest(load_file(str(out))["model.w"]) == digest(state(1)["model"]["w"])
    both = cli("ls", str(d.root), "--remote", url).stdout  # the union, as load sees it
    assert re.search(r"^job\s+1\s+remote\s", both, re.M) and \
        re.search(r"^job\s+3\s+local\+remote\s.*latest", both, re.M), both
    # a fresh node: an empty root, its own daemon, the same bucket
    fresh = start("--remote", url, name="fresh", root=tmp_path / "fresh")
    with snapd.connect("job", endpoint=fresh.endpoint, spawn=False) as c:
        back = c.restore()
        assert back["step"] == 3 and digest(back["model"]["w"]) == digest(state(3)["model"]["w"])
        assert c.restore(1)["model"]["b"][0] == 1  # an older step, from the remote tier only
        part = c.restore(keys="model.b")  # partial: only that tensor's chunks are fetched
        assert list(part["model"]) == ["b"]
    # the in-process loader, given the bucket, does the same (the newest wins wherever it is)
    assert snapd.load(tmp_path / "nowhere", "job", remote=url)["step"] == 3


def test_both_tiers_of_a_root_with_per_user_directories_list_each_users_jobs(tmp_path, s3, start) -> None:
    """A daemon serving several users keeps root's job in ROOT/root/job and s3://.../root/job:
    ``snapd ls ROOT --remote URL`` lists it as root/job in both tiers (it used to fail on the name)."""
    url = f"{s3.url}/users"
    d = start("--remote", url, "--user-dirs", "on")
    with snapd.connect("job", endpoint=d.endpoint, spawn=False, keep_last=1) as c:
        for step in (1, 2):
            c.snapshot(state(step), step=step).wait(30)
        wait_uploaded(d, 2)
    assert (d.root / "root" / "job" / "step-000000000002").is_dir()
    both = cli("ls", str(d.root), "--remote", url)
    assert both.returncode == 0, both.stderr
    assert re.search(r"^root/job\s+1\s+remote\s", both.stdout, re.M) and \
        re.search(r"^root/job\s+2\s+local\+remote\s.*latest", both.stdout, re.M), both.stdout
    one = cli("ls", str(d.root), "root/job", "--remote", url)
    assert one.returncode == 0 and one.stdout.count("root/job") == 2, one.stdout + one.stderr


def test_a_removed_snapshot_leaves_the_bucket_too_and_is_never_brought_back(tmp_path, s3, start) -> None:
    """client.remove(step) through a daemon with a remote tier deletes the bucket's copy as well; a
    copy that outlived a removal (made here without the daemon) is not what ``latest`` loads."""
    from snapd.format.jobdir import JobDir
    from snapd.format.retention import remove_step

    url = f"{s3.url}/rm"
    d = start("--remote", url)
    with snapd.connect("job", endpoint=d.endpoint, spawn=False, keep_last=None) as c:
        for step in (1, 2, 3):
            c.snapshot(state(step), step=step).wait(30)
        wait_uploaded(d, 3)
        assert c.remove(3) is True
        assert remote_steps(url, "job") == [1, 2]
        assert c.restore()["step"] == 2
        assert remove_step(JobDir(d.root, "job"), 2) is not None  # (here only: the bucket keeps step 2)
        assert remote_steps(url, "job") == [1, 2]
        assert c.restore()["step"] == 1  # not the bucket's step 2, removed here
    assert snapd.load(d.root, "job", remote=url)["step"] == 1
    assert snapd.load(tmp_path / "fresh", "job", remote=url)["step"] == 2  # (a node that removed nothing)


def test_remote_retention_keeps_the_last_and_the_best(tmp_path, s3, start) -> None:
    url = f"{s3.url}/ret"
    d = start("--remote", url, env={"SNAPD_REMOTE_KEEP_LAST": "2"})
    with snapd.connect("job", endpoint=d.endpoint, spawn=False, keep_last=5, best=("loss", "min")) as c:
        for step, loss in ((1, 0.1), (2, 0.5), (3, 0.6), (4, 0.7)):
            c.snapshot(state(step), step=step, metrics={"loss": loss}).wait(30)
            wait_uploaded(d, step)
    assert remote_steps(url, "job") == [1, 3, 4]  # step 1 is the best
    assert len(list((d.root / "job").glob("step-*"))) == 4  # local retention is its own


def test_a_killed_server_never_shows_half_a_snapshot_and_the_upload_completes(tmp_path, s3, start) -> None:
    url = f"{s3.url}/kill"
    # paced uploads: 48 MiB at 16 MiB/s take about 3 s, so the kill lands in the middle
    d = start("--remote", url, "--codec", "raw", env={"SNAPD_REMOTE_BYTES_PER_S": str(16 << 20)})
    big = {"x": np.arange(12 << 20, dtype=np.float32)}
    with snapd.connect("job", endpoint=d.endpoint, spawn=False) as c:
        c.snapshot(big, step=7).wait(60)
        d.wait_for(lambda: c.status()["remote"]["uploading"] is not None, 30)
        time.sleep(1.0)
        assert remote_steps(url, "job") == []  # data going up, no manifest yet: nothing listed
        assert c.status()["remote"]["uploading"] == "job step 7"  # (the kill lands mid-upload)
        s3.kill()
        time.sleep(1.0)
        s3.restart()
        assert remote_steps(url, "job") in ([], [7])
        wait_uploaded(d, 1, timeout=120)
    assert remote_steps(url, "job") == [7]
    got = snapd.load(tmp_path / "empty", "job", remote=url)
    assert np.array_equal(got["x"], big["x"])
    # resumed (the SDK retried the parts through the restart) or restarted (an attempt failed,
    # logged, and the snapshot went up again): either way once, and whole
    assert len(re.findall(r"uploaded job step 7 ", d.log_text())) == 1


def test_while_the_server_is_down_local_snapshots_go_on_and_the_latest_goes_up_first(tmp_path, s3,
                                                                                       start) -> None:
    url = f"{s3.url}/down"
    s3.kill()
    d = start("--remote", url, env={"SNAPD_REMOTE_BACKLOG": "3"})
    with snapd.connect("job", endpoint=d.endpoint, spawn=False, keep_last=2) as c:
        for step in range(1, 7):
            c.snapshot(state(step), step=step).wait(30)  # persisted locally, at full speed
        r = c.status()["remote"]
        assert r["backlog"] <= 4 and r["skipped"] >= 2, r  # bounded: the oldest skipped
        d.wait_for(lambda: c.status()["remote"]["last_error"] is not None, 30)
        text = cli("status", "--endpoint", d.endpoint).stdout
        assert "remote error:" in text and f"remote {url}: backlog" in text, text
        assert "remote backlog full" in d.log_text()
        s3.restart()
        wait_uploaded(d, 2, timeout=120)
    # of those waiting, the resume point first (one already going up when the store went away
    # may finish before it: an upload is only abandoned for an emergency snapshot)
    uploaded = re.findall(r"uploaded job step (\d+)", d.log_text())
    assert "6" in uploaded and "5" in uploaded and uploaded.index("6") < uploaded.index("5"), uploaded
    assert 6 in remote_steps(url, "job")
    # local retention let go of what was skipped or uploaded: the local tier is bounded too
    assert len(list((d.root / "job").glob("step-*"))) <= 2


@pytest.mark.timeout(90)
def test_a_server_that_hangs_holds_up_neither_the_daemon_nor_a_local_restore(tmp_path, s3, start,
                                                                               caplog) -> None:
    """SIGSTOP: the server takes connections and answers nothing (the SDK waits 60 s a try, 3 tries)."""
    url = f"{s3.url}/hang"
    d = start("--remote", url)
    with snapd.connect("job", endpoint=d.endpoint, spawn=False) as c:
        c.snapshot(state(1), step=1).wait(30)
        wait_uploaded(d, 1)
    assert s3.proc is not None
    os.kill(s3.proc.pid, signal.SIGSTOP)
    try:
        again = start("--remote", url, name="again", root=d.root)  # (a restarted daemon: its start, too)
        d.stop()
        with snapd.connect("job", endpoint=again.endpoint, spawn=False) as c:
            c.snapshot(state(2), step=2).wait(30)  # persisted locally; its upload waits
            # a step by number: the local one, the bucket not asked
            assert np.array_equal(c.restore(1)["model"]["w"], state(1)["model"]["w"])
            assert c.restore(2)["step"] == 2
            assert c.status()["remote"]["backlog"] >= 1
        with caplog.at_level("WARNING"):  # latest: the bucket waited for 10 s, then the local tier's
            assert snapd.load(d.root, "job", remote=url)["step"] == 2
        assert "did not answer within 10 s): loading the local" in caplog.text, caplog.text
    finally:
        os.kill(s3.proc.pid, signal.SIGCONT)


def test_wrong_credentials_or_a_missing_bucket_say_so_and_local_snapshots_go_on(tmp_path, s3, start,
                                                                               monkeypatch) -> None:
    checked = cli("serve", "--check-config", "--root", str(tmp_path / "r"), "--remote", "s3://no-such-bucket")
    assert checked.returncode == 2 and "NoSuchBucket" in checked.stderr, checked.stderr
    assert len(checked.stderr.strip().splitlines()) == 1
    d = start("--remote", s3.url, env={"AWS_SECRET_ACCESS_KEY": "wrong"})
    with snapd.connect("job", endpoint=d.endpoint, spawn=False) as c:
        c.snapshot(state(1), step=1).wait(30)
        d.wait_for(lambda: c.status()["remote"]["last_error"] is not None, 30)
        err = c.status()["remote"]["last_error"]
        assert "SignatureDoesNotMatch" in err or "AccessDenied" in err, err
        assert c.restore()["step"] == 1  # the local tier serves (the remote one is logged as out of reach)
    assert snapd.load(d.root, "job")["step"] == 1


def test_a_flipped_byte_in_the_bucket_is_caught_by_load_and_verify(tmp_path, s3, start) -> None:
    url = f"{s3.url}/rot"
    d = start("--remote", url, "--codec", "raw")
    with snapd.connect("job", endpoint=d.endpoint, spawn=False) as c:
        c.snapshot(state(1), step=1).wait(30)
        wait_uploaded(d, 1)
    store = Store.open(url)
    [key] = [k for k in store.list("rot/job/") if "/data-" in k]
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 0x01
    store.put(key, bytes(data))
    with pytest.raises(ChecksumError, match=r"model\.w chunk 0"):
        snapd.load(tmp_path / "empty", "job", remote=url)
    verified = cli("verify", url)
    assert verified.returncode == 1 and "BAD s3://snapd/rot/job/step-000000000001" in verified.stdout


def test_a_daemon_killed_mid_upload_leaves_nothing_listed_and_its_successor_finishes(tmp_path, s3,
                                                                                   start) -> None:
    url = f"{s3.url}/sigkill"
    slow = {"SNAPD_REMOTE_BYTES_PER_S": str(8 << 20)}
    d = start("--remote", url, "--codec", "raw", env=slow)
    big = {"x": np.arange(12 << 20, dtype=np.float32)}
    with snapd.connect("job", endpoint=d.endpoint, spawn=False) as c:
        c.snapshot(big, step=3).wait(60)
        d.wait_for(lambda: c.status()["remote"]["uploading"] is not None, 30)
        time.sleep(1.5)
    d.stop(9)
    store = Store.open(url)
    assert remote_steps(url, "job") == []
    assert store.client.list_multipart_uploads(Bucket=store.bucket, Prefix="sigkill/").get("Uploads")
    again = start("--remote", url, name="again", root=d.root)
    wait_uploaded(again, 1, timeout=120)
    assert remote_steps(url, "job") == [3]
    assert not store.client.list_multipart_uploads(Bucket=store.bucket, Prefix="sigkill/").get("Uploads")
    assert np.array_equal(snapd.load(tmp_path / "empty", "job", remote=url)["x"], big["x"])


def test_sigterm_waits_for_the_emergency_upload_and_names_what_did_not_go_up(tmp_path, s3, start) -> None:
    url = f"{s3.url}/drain"
    d = start("--remote", url, "--codec", "raw", env={"SNAPD_REMOTE_BYTES_PER_S": str(16 << 20)})
    with snapd.connect("job", endpoint=d.endpoint, spawn=False) as c:
        c.snapshot({"x": np.arange(12 << 20, dtype=np.float32)}, step=8).wait(60)  # about 3 s to go up
        d.wait_for(lambda: c.status()["remote"]["uploading"] == "job step 8", 30)
        c.snapshot({"x": np.ones(6 << 20, np.float32)}, step=9, emergency=True).wait(60)
    assert d.stop() == 0
    assert remote_steps(url, "job") == [8, 9]  # the drain waited for both
    uploaded = re.findall(r"uploaded job step (\d+)", d.log_text())
    assert uploaded == ["9", "8"] and "job step 8 yields to an emergency snapshot" in d.log_text(), uploaded
    s3.kill()
    d2 = start("--remote", url, "--drain-timeout-s", "2", name="d2", root=tmp_path / "r2")
    with snapd.connect("job", endpoint=d2.endpoint, spawn=False) as c:
        c.snapshot(state(10), step=10, emergency=True).wait(60)
    d2.stop()
    assert re.search(r"not in the remote tier: job step 10 \(emergency\)", d2.log_text()), d2.log_text()


def test_a_global_snapshot_is_committed_remotely_once_every_node_uploaded_its_ranks(tmp_path, s3,
                                                                                      start) -> None:
    url = f"{s3.url}/dist"
    a = start("--remote", url, name="a")
    b = start("--remote", url, name="b", root=a.root)  # another node's daemon, the shared root
    ranks = [subprocess.Popen([sys.executable, str(RANK), ep, "g", str(r), "2", "run-1", "1,2"],
                              stdout=subprocess.PIPE, text=True, cwd="/")
             for r, ep in enumerate((a.endpoint, b.endpoint))]
    for p in ranks:
        assert p.communicate(timeout=120)[0].split() == ["COMMITTED", "1", "COMMITTED", "2"]
    deadline = time.monotonic() + 60
    while remote_steps(url, "g") != [1, 2]:
        assert time.monotonic() < deadline, (a.log_text()[-2000:], b.log_text()[-2000:])
        time.sleep(0.2)
    keys = Store.open(url).list("dist/g/step-000000000002/")
    assert any("/rank-00000/" in k for k in keys) and any("/rank-00001/" in k for k in keys)
    whole = snapd.load(tmp_path / "empty", "g", remote=url, rank=1)
    assert whole["step"] == 2 and whole["own"][0] == 201 and np.array_equal(whole["w"], np.full(4096, 2))
    assert cli("verify", url).stdout.count("ok ") == 2


def test_bad_remote_settings_are_refused_by_name(tmp_path) -> None:
    for args, words in ((["--remote", "http://bucket"], "invalid remote 'http://bucket'"),
                        (["--remote", "s3://B"], "invalid remote 's3://B'"),
                        (["--endpoint-url", "localhost:9000"], "endpoint_url must be an http")):
        out = cli("serve", "--check-config", "--root", str(tmp_path), *args)
        assert out.returncode == 2 and words in out.stderr, out.stderr
    with pytest.raises(SnapdError, match="invalid remote"):
        snapd.load(tmp_path, "job", remote="s3:/x")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_fsdp2_job_resumes_on_fresh_nodes_from_the_bucket(tmp_path, s3, torchrun, start,
                                                             monkeypatch) -> None:
    url = f"{s3.url}/fsdp"
    a = start("--remote", url, name="a")
    b = start("--remote", url, name="b", root=a.root)
    dcp_dir = str(tmp_path / "dcp")
    saved = torchrun(FSDP2, "save", str(a.root), "fsdp", dcp_dir, f"{a.endpoint},{b.endpoint}").stdout
    deadline = time.monotonic() + 120
    while remote_steps(url, "fsdp") != [1, 2, 3]:
        assert time.monotonic() < deadline, (a.log_text()[-2000:], b.log_text()[-2000:])
        time.sleep(0.2)
    # two fresh nodes (an empty shared root): each rank's shards come from the bucket, each piece
    # fetched by ranged GETs through DCP's planner, equal to DCP's own load; RNG back to its rank
    fresh = tmp_path / "fresh"
    c = start("--remote", url, name="c", root=fresh)
    d = start("--remote", url, name="d", root=fresh)
    resumed = torchrun(FSDP2, "resume", str(fresh), "fsdp", dcp_dir, f"{c.endpoint},{d.endpoint}").stdout
    assert sorted(re.findall(r"RESUMED (\d)", resumed)) == ["0", "1"], resumed
    assert sorted(re.findall(r"RNG (\d \w+)", saved)) == sorted(re.findall(r"RNG-RESTORED (\d \w+)", resumed))
    # and on one rank with no daemon at all ($SNAPD_REMOTE), resharded
    monkeypatch.setenv("SNAPD_REMOTE", url)
    loaded = torchrun(FSDP2, "load", str(tmp_path / "empty"), "fsdp", dcp_dir, nproc=1).stdout
    assert "LOADED 0" in loaded, loaded


@pytest.mark.parametrize("codec", ["shuffle-zstd", "lz4", "raw"])
def test_every_codec_restores_from_the_bucket_whole_and_in_part(tmp_path, s3, codec, digest) -> None:
    from concurrent.futures import ThreadPoolExecutor

    # many chunks per tensor (64 KiB), in runs one GET fetches, of every codec
    big = {"a": np.random.default_rng(1).standard_normal(300_000).astype(np.float32),
           "b": {"c": np.arange(100_000, dtype=np.int64)}, "n": 3}
    from snapd.format.saving import save_state

    save_state(tmp_path / "root", "job", big, step=5, codec=codec, chunk_bytes=64 << 10)
    url = f"{s3.url}/codecs"
    with ThreadPoolExecutor(4) as pool:
        assert RemoteJob(Store.open(url), "job").upload(tmp_path / "root" / "job" / "step-000000000005", None,
                                                        pool)
    back = snapd.load(tmp_path / "empty", "job", remote=url)
    assert digest(back["a"]) == digest(big["a"]) and digest(back["b"]["c"]) == digest(big["b"]["c"])
    assert back["n"] == 3
    assert list(snapd.load(tmp_path / "empty", "job", keys="b.c", remote=url)) == ["b"]


def test_a_trainer_without_boto3_loads_its_local_snapshots_and_is_told_what_to_install(tmp_path, py) -> None:
    code = ("import sys; sys.modules['boto3'] = None\n"  # (as if boto3 were not installed)
            "import numpy as np, snapd.client as s\n"
            "s.save(sys.argv[1], 'j', {'x': np.ones(3)}, step=2)\n"
            "print('LOCAL', s.load(sys.argv[1], 'j', remote='s3://bucket/p')['x'].sum())\n"
            "s.load(sys.argv[1], 'other', remote='s3://bucket/p')\n")
    out = py(code, str(tmp_path))
    assert "LOCAL 3.0" in out.stdout, out.stderr
    assert "pip install 'snapd[s3]'" in out.stderr and out.returncode == 1, out.stderr


def test_nodes_that_share_no_filesystem_commit_their_global_snapshot_in_the_bucket(tmp_path, s3,
                                                                                 start) -> None:
    url = f"{s3.url}/apart"
    a = start("--remote", url, name="a", root=tmp_path / "node-a")  # each node its own disk
    b = start("--remote", url, name="b", root=tmp_path / "node-b")
    ranks = [subprocess.Popen([sys.executable, str(RANK), ep, "g", str(r), "2", "run-1", "1,2"],
                              stdout=subprocess.PIPE, text=True, cwd="/")
             for r, ep in enumerate((a.endpoint, b.endpoint))]
    for p in ranks:
        assert p.communicate(timeout=120)[0].split() == ["COMMITTED", "1", "COMMITTED", "2"], \
            (a.log_text()[-2000:], b.log_text()[-2000:])
    assert remote_steps(url, "g") == [1, 2]
    assert "committed in the bucket from the parts of 2 ranks" in a.log_text() + b.log_text()
    whole = snapd.load(tmp_path / "empty", "g", remote=url, rank=1)
    assert whole["step"] == 2 and whole["own"][0] == 201 and np.array_equal(whole["w"], np.full(4096, 2))
    assert snapd.load(tmp_path / "empty", "g", remote=url, rank=0)["own"][0] == 200
    # each node's parts left its pending directories once committed in the bucket
    for node in ("node-a", "node-b"):
        assert not list((tmp_path / node / "g").glob(".pending-*")), list((tmp_path / node / "g").iterdir())
    assert cli("verify", url).stdout.count("ok ") == 2
