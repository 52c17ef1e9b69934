"""The shared modules stay light: training code that imports the client must
not pay for torch, CuPy, ZeroMQ or the daemon."""

import json

import pytest

HEAVY = ["torch", "cupy", "zmq", "snapd.daemon", "snapd.server"]


@pytest.mark.parametrize("module", ["snapd.format", "snapd.client", "snapd.errors", "snapd.kernels"])
def test_import_loads_nothing_heavy(module: str, py) -> None:
    code = f"import sys, json, {module}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = py(code)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_numpy_only_save_and_load_never_import_torch(tmp_path, py) -> None:
    code = ("import sys, numpy as np, snapd.client as c\n"
            f"c.save({str(tmp_path)!r}, 'j', {{'w': np.ones(3, np.float32)}}, step=1)\n"
            f"assert (c.load({str(tmp_path)!r}, 'j')['w'] == 1).all()\n"
            "print('torch' in sys.modules)")
    out = py(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_three_packages_installed(py) -> None:
    out = py("import snapd, snapd.client, snapd.kernels, snapd.format; print(snapd.client.save.__module__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "snapd.client.local"


def test_every_source_folder_is_packaged(py) -> None:
    """A module missing from pyproject's package list only shows in a non-editable install."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    mods = []
    for folder, pkg in (("snapd", "snapd"), ("client", "snapd.client"), ("kernels", "snapd.kernels")):
        for f in sorted((repo / folder).rglob("*.py")):
            rel = f.relative_to(repo / folder).with_suffix("")
            if rel.name != "__main__":
                mods.append(".".join([pkg, *rel.parts]).removesuffix(".__init__"))
    optional = {"snapd.kernels.cupy_backend"}  # needs the gpu extra: check it is packaged, not importable
    code = ("import importlib, importlib.util, sys\n"
            "for m in sys.argv[1:]:\n"
            f"    assert importlib.util.find_spec(m) is not None, m\n"
            f"    if m not in {sorted(optional)!r}: importlib.import_module(m)\n")
    out = py(code, *mods)
    assert out.returncode == 0, out.stderr
    assert optional <= set(mods)


def test_kernel_source_is_packaged(py) -> None:
    """The CUDA source ships beside its wrapper as package data, which only a non-editable install
    would show missing."""
    out = py("from snapd.kernels.segments import source; print('snapd_segments' in source())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
