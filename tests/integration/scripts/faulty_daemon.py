"""``python faulty_daemon.py STAGE STEP serve ...``: snapd's daemon with a bug planted in one stage,
hit by the snapshots of step STEP: ``handoff`` (the server thread's hand-over after the reply),
``copy`` (the registered-region copy thread) or ``flush`` (the flush thread, outside the flush's
own error handling). What a bug of ours there does is what the error boundary must contain.
``install`` pauses the flush instead, for good, at the last moment of a commit (data and manifest
written and synced, the directory not yet renamed into place), after logging "paused": a test
then kills the daemon there. ``deliver`` pauses a rank's part of step STEP the same way, sealed (its
data and manifest synced) but not yet delivered to its global snapshot."""

import logging
import sys
import threading

from snapd.daemon import intake, pipeline
from snapd.format import global_commit, jobdir

stage, step = sys.argv[1], int(sys.argv[2])


class Planted(RuntimeError):
    pass


if stage == "deliver":
    deliver = global_commit.deliver

    def paused_part(job, tmp, part, retention, **kw):
        if part.step == step:
            logging.getLogger("faulty_daemon").warning("paused before delivering step %d", part.step)
            threading.Event().wait()
        return deliver(job, tmp, part, retention, **kw)
    global_commit.deliver = paused_part
elif stage == "install":
    install = jobdir.JobDir.install

    def paused(self, tmp, at_step):
        if at_step == step:
            logging.getLogger("faulty_daemon").warning("paused before installing step %d", at_step)
            threading.Event().wait()
        return install(self, tmp, at_step)
    jobdir.JobDir.install = paused
elif stage == "handoff":
    accepted = intake.Intake._accepted

    def _accepted(self, *args):
        reply, handoff = accepted(self, *args)
        run = handoff.run

        def planted() -> None:
            if handoff.task.step == step:
                raise Planted("planted in the hand-over")
            run()
        handoff.run = planted
        return reply, handoff
    intake.Intake._accepted = _accepted
else:
    name, task_of = {"copy": ("_copy_one", lambda item: item[0]),
                     "flush": ("_flush", lambda item: item)}[stage]
    real = getattr(pipeline.Pipeline, name)

    def planted(self, item, outbox):
        if task_of(item).step == step:
            raise Planted(f"planted in the {stage} thread")
        return real(self, item, outbox)
    setattr(pipeline.Pipeline, name, planted)

from snapd.cli import main  # noqa: E402

raise SystemExit(main(sys.argv[3:]))
