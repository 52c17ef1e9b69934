"""The distribution says its license the way packaging tools read it, and ships the text."""

from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]


def test_license_is_an_spdx_expression_with_its_text() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_a_clones_root_imports_the_whole_package_from_the_clone() -> None:
    """`python -c`, `python -m pytest` and `python -m bench` from a clone's root put the root first
    on sys.path: its `snapd/` must then be the whole package (client and kernels included), the
    same code an editable install imports."""
    import subprocess
    import sys

    code = ("import os, snapd.client, snapd.client.daemon, snapd.kernels, snapd.kernels.numpy_shuffle, "
            "snapd.daemon;print(*(os.path.realpath(m.__file__) for m in (snapd.client.daemon, "
            "snapd.kernels.numpy_shuffle)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(REPO / "client" / "daemon.py"),
                                  str(REPO / "kernels" / "numpy_shuffle.py")]
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0 and "usage" in out.stdout, out.stderr


def test_the_wheel_holds_client_and_kernels_as_files(tmp_path: Path) -> None:
    """The links that make the source tree whole become the modules themselves in a built wheel."""
    import subprocess
    import sys
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("snapd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for need in ("snapd/client/daemon.py", "snapd/kernels/segments.cu", "snapd/daemon/server.py",
                 "snapd/format/writer.py"):
        assert need in names
    assert not any(n.startswith(("client/", "kernels/", "tests/", "bench/")) for n in names)
