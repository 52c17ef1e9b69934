"""The deployment examples (deploy/): the Kubernetes manifests use only fields the API has, at the
places it has them (a typo would be dropped silently by a lenient client, and the pod would run
without it), and agree with each other and with the daemon's own settings; the sbatch script is
valid bash with the directives docs/clusters.md relies on. No cluster is needed."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from snapd.cli import build_parser
from snapd.inspection import UsageError

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

# the Kubernetes API's fields (core/v1, apps/v1) at each place these manifests use; a subset
FIELDS = {
    "DaemonSet": {"apiVersion", "kind", "metadata", "spec"},
    "Pod": {"apiVersion", "kind", "metadata", "spec"},
    "metadata": {"name", "namespace", "labels", "annotations"},
    "DaemonSet.spec": {"selector", "template", "updateStrategy", "minReadySeconds", "revisionHistoryLimit"},
    "template": {"metadata", "spec"},
    "PodSpec": {"containers", "initContainers", "volumes", "hostPID", "hostIPC", "hostNetwork",
                "priorityClassName", "terminationGracePeriodSeconds", "restartPolicy", "securityContext",
                "nodeSelector", "tolerations", "affinity", "serviceAccountName"},
    "Container": {"name", "image", "command", "args", "env", "resources", "lifecycle", "readinessProbe",
                  "livenessProbe", "startupProbe", "volumeMounts", "securityContext", "ports", "workingDir"},
    "Probe": {"exec", "httpGet", "tcpSocket", "periodSeconds", "timeoutSeconds", "failureThreshold",
              "initialDelaySeconds", "successThreshold"},
    "Volume": {"name", "hostPath", "emptyDir", "persistentVolumeClaim", "configMap", "secret"},
    "hostPath": {"path", "type"},
    "VolumeMount": {"name", "mountPath", "readOnly", "subPath"},
    "EnvVar": {"name", "value", "valueFrom"},
}
HOSTPATH_TYPES = {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice",
                  "BlockDevice"}


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "kubernetes" / name).read_text())


def check(obj: dict, place: str) -> None:
    unknown = set(obj) - FIELDS[place]
    assert not unknown, f"{place}: no such field(s) {sorted(unknown)}"


def check_pod_spec(spec: dict) -> None:
    check(spec, "PodSpec")
    assert isinstance(spec.get("terminationGracePeriodSeconds", 30), int)
    names = set()
    for v in spec["volumes"]:
        check(v, "Volume")
        if "hostPath" in v:
            check(v["hostPath"], "hostPath")
            assert v["hostPath"].get("type", "") in HOSTPATH_TYPES, v
        names.add(v["name"])
    for c in spec["containers"]:
        check(c, "Container")
        assert c["name"] and c["image"] and isinstance(c["command"], list)
        for m in c.get("volumeMounts", []):
            check(m, "VolumeMount")
            assert m["name"] in names, f"{m['name']} mounted but not a volume"
        for e in c.get("env", []):
            check(e, "EnvVar")
        for p in ("readinessProbe", "livenessProbe"):
            if p in c:
                check(c[p], "Probe")


def mounts(spec: dict) -> dict[str, str]:
    """mountPath -> hostPath of the first container."""
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    return {m["mountPath"]: host[m["name"]] for m in spec["containers"][0]["volumeMounts"]}


def test_the_daemonset_is_well_formed_and_drains_within_its_grace() -> None:
    ds = load("snapd-daemonset.yaml")
    check(ds, "DaemonSet")
    assert (ds["apiVersion"], ds["kind"]) == ("apps/v1", "DaemonSet")
    check(ds["metadata"], "metadata")
    check(ds["spec"], "DaemonSet.spec")
    check(ds["spec"]["template"], "template")
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = ds["spec"]["template"]["spec"]
    check_pod_spec(spec)
    assert spec["hostPID"] is True  # (a killed trainer's buffers come back: docs/clusters.md)
    [c] = spec["containers"]
    args = build_parser().parse_args(c["command"][1:])  # the daemon's own parser takes every flag
    assert args.command == "serve"
    assert spec["terminationGracePeriodSeconds"] > args.drain_timeout_s
    assert "kill -TERM 1" in c["lifecycle"]["preStop"]["exec"]["command"][-1]
    endpoint = args.endpoint
    for probe in ("readinessProbe", "livenessProbe"):
        cmd = c[probe]["exec"]["command"]
        assert cmd[:2] == ["snapd", "status"] and cmd[cmd.index("--endpoint") + 1] == endpoint
    socket_dir = endpoint[len("ipc://"):].rsplit("/", 1)[0]
    assert mounts(spec)[socket_dir] == socket_dir and mounts(spec)["/dev/shm"] == "/dev/shm"
    assert mounts(spec)[args.root] == args.root


def test_the_trainer_pod_reaches_the_daemon_the_daemonset_runs() -> None:
    ds, pod = load("snapd-daemonset.yaml"), load("trainer-pod.yaml")
    check(pod, "Pod")
    check_pod_spec(pod["spec"])
    daemon = build_parser().parse_args(ds["spec"]["template"]["spec"]["containers"][0]["command"][1:])
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["SNAPD_ENDPOINT"] == daemon.endpoint
    theirs, ours = mounts(ds["spec"]["template"]["spec"]), mounts(pod["spec"])
    for path in (daemon.endpoint[len("ipc://"):].rsplit("/", 1)[0], "/dev/shm", daemon.root):
        assert ours[path] == theirs[path], path  # the same host directories, at the same places
    assert pod["spec"]["securityContext"]["runAsGroup"] == int(daemon.socket_group)  # it may reach the socket
    assert pod["spec"]["hostIPC"] is True and ds["spec"]["template"]["spec"]["hostIPC"] is True


def test_the_sbatch_example_is_bash_with_the_directives_the_docs_name() -> None:
    script = DEPLOY / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    directives = re.findall(r"^#SBATCH (\S+)", script.read_text(), re.M)
    assert {"--requeue", "--signal=USR1@120", "--open-mode=append"} <= set(directives)
    serve = next(line for line in script.read_text().splitlines() if "snapd serve" in line)
    flags = shlex.split(serve.split("snapd serve", 1)[1].rstrip("&\\ "))
    with pytest.raises(UsageError):  # (the parser refuses a flag it does not know: the check can fail)
        build_parser().parse_args(["serve", "--no-such-flag"])
    args = build_parser().parse_args(["serve", *[f if not f.startswith("${") else "/x" for f in flags]])
    # the drain ends before Slurm's SIGKILL: KillWait after the SIGTERM, 30 s by default (docs/clusters.md)
    assert args.drain_timeout_s is not None and args.drain_timeout_s < 30
