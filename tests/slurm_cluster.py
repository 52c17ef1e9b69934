"""A real one-node Slurm cluster on localhost for the tests (Debian's slurmctld, slurmd and munge;
``.ci/run`` installs them, a fixture starts this): its own munge key and socket, its own config,
state and spool directories and ports, so it never touches a system Slurm. Needs root (slurmd
starts jobs as their user)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def available() -> str:
    """Why a cluster cannot start here ('' if it can)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"no {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return ""


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    out = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return out


def _node() -> tuple[str, str]:
    """This node's name and its CPUs line as slurmd sees them."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.split()
    fields = dict(f.split("=", 1) for f in out if "=" in f)
    return fields["NodeName"], " ".join(f"{k}={fields[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard",
                                                                     "CoresPerSocket", "ThreadsPerCore"))


@dataclass
class SlurmCluster:
    dir: Path
    conf: Path
    node: str
    procs: list[subprocess.Popen]

    @classmethod
    def start(cls, dir: Path, kill_wait_s: int = 10) -> SlurmCluster:
        dir.mkdir(parents=True, exist_ok=True)
        os.chmod(dir, 0o755)
        key = dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = dir / "munge.socket"
        node, cpus = _node()
        ctld, slurmd = _ports(2)
        for d in ("state", "spool", "log"):
            (dir / d).mkdir(exist_ok=True)
        conf = dir / "slurm.conf"
        conf.write_text(f"""ClusterName=snapdtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait={kill_wait_s}
MinJobAge=600
MessageTimeout=20
NodeName={node} NodeAddr=127.0.0.1 {cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
        log = open(dir / "log" / "daemons.log", "ab")
        env = {**os.environ, "SLURM_CONF": str(conf)}
        procs = [subprocess.Popen(["munged", "-F", "--force", f"--key-file={key}", f"--socket={sock}",
                                   f"--pid-file={dir}/munged.pid", f"--log-file={dir}/log/munged.log",
                                   f"--seed-file={dir}/munged.seed"], stdout=log, stderr=log)]
        _wait(lambda: sock.exists(), "munged's socket", dir)
        procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], stdout=log, stderr=log,
                                      env=env))
        procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], stdout=log, stderr=log, env=env))
        cluster = cls(dir, conf, node, procs)
        _wait(lambda: "idle" in cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout, "an idle node",
              dir)
        return cluster

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env(), check=check,
                              timeout=60)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.dir / "log").glob("*.log")))

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait(cond, what: str, dir: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in (dir / "log").glob("*.log"))
            raise RuntimeError(f"Slurm: no {what} after {timeout:.0f} s\n{logs}")
        time.sleep(0.2)
