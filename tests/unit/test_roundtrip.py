"""Bytes restored equal bytes saved, for every dtype, shape, layout and codec."""

import math

import numpy as np
import pytest
import torch

import snapd.client as snapd
from snapd.errors import InvalidArgument, UnsupportedValueError
from snapd.format import SnapshotReader, save_state
from snapd.format.dtypes import ITEMSIZE

NUMPY_DTYPES = ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                "float16", "float32", "float64", "complex64", "complex128"]
TORCH_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.float8_e4m3fn,
                torch.float8_e5m2]
CODECS = ["raw", "lz4", "shuffle-lz4", "shuffle-zstd"]


def _random(dtype: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    n = math.prod(shape) * np.dtype(dtype).itemsize
    return np.frombuffer(rng.bytes(n), dtype=np.uint8).view(dtype).reshape(shape).copy()


@pytest.mark.parametrize("codec", CODECS)
def test_every_numpy_dtype_and_shape(root, digest, codec) -> None:
    rng = np.random.default_rng(1)
    state = {}
    for dt in NUMPY_DTYPES:
        state[dt] = {"odd": _random(dt, (3, 1001), rng), "zero_d": _random(dt, (), rng),
                     "empty": np.zeros((0, 5), dt), "smooth": (np.arange(5000) % 7).astype(dt)}
    save_state(root, "j", state, step=1, codec=codec, chunk_bytes=4096)
    out = snapd.load(root, "j")
    for dt in NUMPY_DTYPES:
        for k, v in state[dt].items():
            got = out[dt][k]
            assert isinstance(got, np.ndarray) and got.dtype == v.dtype and got.shape == v.shape, (dt, k)
            assert digest(got) == digest(v), (dt, k)


@pytest.mark.parametrize("codec", CODECS)
def test_every_torch_dtype(root, digest, codec) -> None:
    g = torch.Generator().manual_seed(0)
    state = {}
    for dt in TORCH_DTYPES:
        raw = torch.randint(0, 256, (2 * 777 * 16,), dtype=torch.uint8, generator=g)
        t = raw[: 777 * 2 * (torch.empty(0, dtype=dt).element_size())].view(dt).reshape(777, 2)
        state[str(dt)] = {"t": t, "zero_d": t[0, 0].clone(), "empty": torch.empty(0, 3, dtype=dt)}
    save_state(root, "j", state, step=1, codec=codec, chunk_bytes=1000 * 16)
    out = snapd.load(root, "j")
    for dt in TORCH_DTYPES:
        for k, v in state[str(dt)].items():
            got = out[str(dt)][k]
            assert isinstance(got, torch.Tensor) and got.dtype == v.dtype and got.shape == v.shape
            assert digest(got) == digest(v), (dt, k)


def test_non_contiguous_big_endian_and_scalars(root, digest) -> None:
    base = np.arange(10000, dtype=np.float32).reshape(100, 100)
    tbase = torch.arange(10000, dtype=torch.float32).reshape(100, 100)
    state = {"T": base.T, "strided": base[::3, 1::2], "be": base.astype(">f4"),
             "np_scalar": np.float64(3.25), "torch_T": tbase.t(), "torch_slice": tbase[5:, ::4],
             "param": torch.nn.Parameter(torch.ones(4)), "neg": (torch.ones(3) * 1j).conj(),
             "neg_real": (torch.arange(3.0) * 1j).conj().imag, "in_list": [tbase.t(), torch.ones(2)]}
    snapd.save(root, "j", state, step=5)
    out = snapd.load(root, "j")
    np.testing.assert_array_equal(out["T"], base.T)
    np.testing.assert_array_equal(out["strided"], base[::3, 1::2])
    np.testing.assert_array_equal(out["be"], base)
    assert out["np_scalar"] == np.float64(3.25) and isinstance(out["np_scalar"], np.float64)
    assert torch.equal(out["torch_T"], tbase.t()) and torch.equal(out["torch_slice"], tbase[5:, ::4])
    assert torch.equal(out["param"], torch.ones(4)) and not out["param"].requires_grad
    assert torch.equal(out["neg"], (torch.ones(3) * 1j).conj().resolve_conj())
    assert state["neg_real"].is_neg() and torch.equal(out["neg_real"], -torch.arange(3.0))
    assert torch.equal(out["in_list"][0], tbase.t()) and torch.equal(out["in_list"][1], torch.ones(2))


def test_tree_structure_and_json_leaves(root) -> None:
    state = {"optim": {"state": {0: {"step": 3}, 1: {"step": 4}},
                       "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0, 1]}]},
             "flags": [True, False, None], "name": "run-1", "big": 2 ** 70, "nan": float("nan"),
             "inf": float("-inf"), "blob": b"\x00\xffbytes", "tuple": (1, (2, [3])), "empty": {}}
    snapd.save(root, "j", state, step=0)
    out = snapd.load(root, "j")
    assert math.isnan(out.pop("nan")) and state.pop("nan")
    assert out == state
    assert isinstance(out["tuple"], tuple) and isinstance(out["tuple"][1][1], list)
    assert list(out["optim"]["state"]) == [0, 1]


def test_large_state_is_sharded_and_chunked(root, digest) -> None:
    rng = np.random.default_rng(2)
    state = {f"w{i}": rng.standard_normal(300_000).astype(np.float32) for i in range(6)}
    done = save_state(root, "j", state, step=1, chunk_bytes=256 << 10, shard_bytes=1 << 20, codec="raw")
    with SnapshotReader(done.path) as r:
        assert len(r.manifest.files) >= 6
        assert all(len(t.chunks) == 5 for t in r.manifest.tensors)
    out = snapd.load(root, "j")
    assert all(digest(out[k]) == digest(v) for k, v in state.items())


@pytest.mark.parametrize("bad, fragment", [
    ({"model": {"layer": object()}}, "model.layer: values of type builtins.object"),
    ({"opt": [1, {2.5: 1}]}, "dict key of type float"),
    ({"x": {1, 2}}, "x: values of type builtins.set"),
    ({"a": np.array(["s"])}, "a: NumPy dtype <U1 is not supported"),
    ({"a": np.zeros(2, dtype=np.float128) if hasattr(np, "float128") else object()}, "a:"),
    ({"a.": np.zeros(2)}, "invalid key path"),
    ({"a.": torch.zeros(2)}, "invalid key path"),
    ({"a": [torch.zeros(1)], "a.0": torch.zeros(1)}, "a.0: two leaves share this key path"),
    ({"a": {"b": torch.zeros(1)}, "a.b": np.zeros(1)}, "a.b: two leaves share this key path"),
    ({"a": torch.zeros(2).to_sparse()}, "a: torch tensor with layout torch.sparse_coo"),
    ({"a": [torch.zeros(2).to(torch.float8_e4m3fnuz)]},
     "a.0: torch dtype torch.float8_e4m3fnuz is not supported"),
])
def test_unsupported_leaf_named_by_key_path(root, bad, fragment) -> None:
    with pytest.raises(UnsupportedValueError,
                       match=fragment.replace(".", r"\.").replace("(", r"\(").replace("<", "<")):
        snapd.save(root, "j", bad, step=1)
    assert not (root / "j").exists() or snapd.list_snapshots(root, "j") == []


@pytest.mark.parametrize("kwargs, fragment", [
    ({"step": -1}, "step must be an integer >= 0"), ({"step": "3"}, "step must be an integer"),
    ({"step": 1, "codec": "gzip"}, "unknown codec"), ({"step": 1, "keep_last": 0}, "keep_last"),
    ({"step": 1, "best": ("loss", "lowest")}, "best must be"),
    ({"step": 1, "metrics": {"loss": [1, 2]}}, "metric 'loss'"),
])
def test_bad_arguments_are_refused(root, kwargs, fragment) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        snapd.save(root, "j", {"w": np.zeros(3)}, **kwargs)


@pytest.mark.parametrize("job", ["../evil", "/abs", "a/b", "..", ".hidden", "", "x" * 200, "nul\x00"])
def test_hostile_job_names_refused(root, job) -> None:
    with pytest.raises(InvalidArgument, match="invalid job name"):
        snapd.save(root, job, {"w": np.zeros(3)}, step=1)
    assert list(root.parent.iterdir()) == [root] and list(root.iterdir()) == []


def test_all_dtypes_covered() -> None:
    assert set(NUMPY_DTYPES) | {"bfloat16", "float8_e4m3fn", "float8_e5m2"} == set(ITEMSIZE)
