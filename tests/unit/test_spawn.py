"""A private daemon spawned by several ranks at once (client/spawn.py): they share one log, and a
rank whose daemon lost the endpoint must tell so from that log however much the winner wrote since."""

from snapd.client.spawn import written_since


def test_a_losers_line_counts_however_much_the_winner_logged_after_it(tmp_path) -> None:
    log = tmp_path / "snapd-private.log"
    log.write_text("an earlier run: another snapd (pid 1) already serves ipc:///old.sock\n")
    start = log.stat().st_size
    with open(log, "a") as f:
        f.write("snapd: ready on ipc:///x.sock\n")
        f.write("snapd.daemon.serve: another snapd (pid 7) already serves ipc:///x.sock\n")
        for step in range(20):  # (the winner's first snapshots, under load, before the loser looks)
            f.write(f"INFO snapd.daemon.seal_stage: persisted raced-1 step {step}\n")
    since = written_since(log, start)
    assert "already serves ipc:///x.sock" in since  # (the last 5 lines, as read before, hold none)
    assert "already serves ipc:///old.sock" not in since  # (an earlier run's line does not count)
