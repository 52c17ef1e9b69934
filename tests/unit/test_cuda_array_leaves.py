"""What flatten makes of a device array it knows only by ``__cuda_array_interface__`` (the GPU
path, ``keep_device``): its dtype, shape, size and address, or a clear error naming its key."""

from __future__ import annotations

import pytest

from snapd.errors import UnsupportedValueError
from snapd.format.tree import flatten


class Cai:
    def __init__(self, typestr: str, shape: tuple, ptr: int = 0x7F00_0000_1000,
                 strides: tuple | None = None) -> None:
        self.iface = {"typestr": typestr, "shape": shape, "data": (ptr, False), "version": 3,
                      "strides": strides}

    @property
    def __cuda_array_interface__(self) -> dict:
        return self.iface


@pytest.mark.parametrize("typestr,name,size",
                         [("<f4", "float32", 4), ("<f2", "float16", 2), ("|b1", "bool", 1),
                                               ("<c8", "complex64", 8), ("|u1", "uint8", 1),
                                               ("<i8", "int64", 8)])
def test_each_typestr_becomes_its_dtype_and_size(typestr: str, name: str, size: int) -> None:
    for _ in range(2):  # (the second time from the cache)
        _, [leaf] = flatten({"a": Cai(typestr, (3, 5), ptr=0xABC000)}, keep_device=True)
        assert (leaf.kind, leaf.dtype, leaf.shape, leaf.nbytes, leaf.ptr, leaf.on_device) == \
            ("cupy", name, (3, 5), 15 * size, 0xABC000, True)


def test_c_strides_are_contiguous_and_an_empty_array_has_no_bytes() -> None:
    _, [a, b] = flatten({"a": Cai("<f4", (2, 3), strides=(12, 4)), "b": Cai("<f8", (0, 7))}, keep_device=True)
    assert a.nbytes == 24 and b.nbytes == 0 and b.shape == (0, 7)


@pytest.mark.parametrize("cai,words", [
    (Cai(">f4", (4,)), "model.w: a big-endian CUDA array (>f4) cannot be saved"),
    (Cai("<U4", (4,)), "model.w: NumPy dtype <U4 is not supported"),
    (Cai("<f4", (2, 3), strides=(4, 8)), "model.w: a non-contiguous CUDA array of type Cai"),
])
def test_what_cannot_be_saved_is_refused_by_key(cai: Cai, words: str) -> None:
    with pytest.raises(UnsupportedValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        flatten({"model": {"w": cai}}, keep_device=True)
