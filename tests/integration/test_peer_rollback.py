"""A job on several ranks that goes back to an earlier step and goes on, on nodes that share no
filesystem (issue 26): its new steps commit across the nodes although the peers heard of higher
ones, never with a part of a step's first making, and a node lost then resumes from the new run's
newest step (taken last, as the index orders latest), not from the abandoned run's higher one,
whether it is in the nodes' copies or only in the bucket."""

from __future__ import annotations


def test_a_run_gone_back_to_an_earlier_step_commits_and_resumes_from_its_own_newest(tmp_path, start,
                                                                                   peer_nodes) -> None:
    nodes = peer_nodes.Nodes(tmp_path, start, 2, "--commit-timeout-s", "20")
    steps = ",".join(str(s) for s in range(1, 11))  # (more steps than the peers' book keeps)
    outs = peer_nodes.ranks(nodes, "g", "run-1", steps, world=2)
    assert all(o.split() == [w for s in range(1, 11) for w in ("COMMITTED", str(s))] for o in outs), \
        (outs, nodes.logs())
    # the same run goes back to step 7 (a loss spike, say) and makes steps 8 and 9 again
    outs = peer_nodes.ranks(nodes, "g", "run-1", "8,9", "restore=7", "gen=1", world=2)
    for r, o in enumerate(outs):
        assert o.split() == ["RESTORED", "7", str(700 + r), "7.0", "COMMITTED", "8", "COMMITTED", "9"], \
            (o, nodes.logs())
    # node 0 holds rank 1's part of the new step 9, not of the abandoned step 10
    nodes.daemons[0].wait_for(lambda: nodes.status(0)["peers"]["held"]["jobs"].get("g") == {"9": [1]},
                              timeout=30)
    nodes.lose(1)
    nodes.daemons[1] = nodes.start(1)
    outs = peer_nodes.ranks(nodes, "g", "run-2", "10", "restore", "gen=2", world=2)
    for r, o in enumerate(outs):  # (the new run's step 9: 10000 + 900 + rank)
        assert o.split()[:4] == ["RESTORED", "9", str(10900 + r), "9.0"], (o, nodes.logs())
        assert "COMMITTED 10" in o, (o, nodes.logs())


def test_a_run_gone_back_to_an_earlier_step_resumes_from_its_own_step_in_the_bucket(tmp_path, start, s3,
                                                                                    peer_nodes) -> None:
    """No copies (``replicas=0``): a lost node's resume needs the bucket, which holds the abandoned
    run's step 3 and the new run's step 2, taken later: the new one is resumed from."""
    nodes = peer_nodes.Nodes(tmp_path, start, 2, "--remote", f"{s3.url}/back")

    def uploaded() -> bool:
        remote = [nodes.status(i)["remote"] for i in (0, 1)]
        return all(r["backlog"] == 0 and r["uploading"] is None for r in remote)

    outs = peer_nodes.ranks(nodes, "g", "run-1", "1,2,3", "replicas=0", world=2)
    assert [o.split() for o in outs] == [["COMMITTED", "1", "COMMITTED", "2", "COMMITTED", "3"]] * 2, \
        nodes.logs()
    nodes.daemons[0].wait_for(uploaded, timeout=60)
    outs = peer_nodes.ranks(nodes, "g", "run-1", "2", "restore=1", "gen=1", "replicas=0", world=2)
    assert [o.split()[-2:] for o in outs] == [["COMMITTED", "2"]] * 2, nodes.logs()
    nodes.daemons[0].wait_for(uploaded, timeout=60)
    nodes.daemons[0].wait_for(lambda: nodes.status(0)["peers"]["jobs"]["g"]["2"]["remote"] is True,
                              timeout=60)
    nodes.lose(1)
    nodes.daemons[1] = nodes.start(1)
    outs = peer_nodes.ranks(nodes, "g", "run-2", "4", "restore", "gen=2", world=2)
    for r, o in enumerate(outs):  # (the new run's step 2: 10000 + 200 + rank)
        assert o.split()[:4] == ["RESTORED", "2", str(10200 + r), "2.0"], (o, nodes.logs())
