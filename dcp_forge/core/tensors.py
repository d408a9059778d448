"""Tensor helpers shared by planners and storage: exact-storage views, chunk narrowing, dtype names,
lazy-view flags."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TypeGuard

import torch

from .._torch_compat import negative_view

# The lazy-view flags a tensor can carry ("math bits": ``x.conj()``, ``torch._neg_view(x)``), as
# ``math_bits`` names them and index.parquet records them.
MATH_BITS = ("conj", "neg", "conj+neg")


@functools.cache
def dtype_text(dtype: torch.dtype) -> str:
    """``str(dtype)``, as the index records it (once per dtype: torch builds the string each time)."""
    return str(dtype)


def math_bits(tensor: torch.Tensor) -> str | None:
    """``"conj"``, ``"neg"``, ``"conj+neg"`` or None: the lazy-view flags ``tensor`` carries. Its
    storage holds the values before the flags apply, as ``torch.save`` stores it."""
    conj, neg = tensor.is_conj(), tensor.is_neg()
    if not (conj or neg):  # nearly every tensor, and asked several times per saved item: no list built
        return None
    return "conj+neg" if conj and neg else "conj" if conj else "neg"


def with_math_bits(tensor: torch.Tensor, bits: str | None) -> torch.Tensor:
    """A view of ``tensor``'s storage with ``bits`` flipped: on a plain tensor it adds them (the
    destination a flagged tensor loads into), on a tensor carrying exactly ``bits`` it removes them
    (its raw storage, for copies that must not compute anything)."""
    if bits not in (None, *MATH_BITS):
        raise ValueError(f"unknown math bits {bits!r} (expected one of {MATH_BITS})")
    if bits and "conj" in bits:
        tensor = tensor.conj()
    if bits and "neg" in bits:
        tensor = negative_view(tensor)
    return tensor


def raw_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without its lazy-view flags: its storage's values, bit for bit (a view, no copy)."""
    return with_math_bits(tensor, math_bits(tensor))


def copy_exactly(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)``, bit for bit where both carry the same lazy-view flags: then the raw
    storages are copied (a copy through the flags would compute, and complex negation quiets
    signalling NaNs)."""
    bits = math_bits(source)
    if bits is not None and bits == math_bits(target):
        with_math_bits(target, bits).copy_(with_math_bits(source, bits))
    else:
        target.copy_(source)


def dtype_named(name: str) -> torch.dtype | None:
    """The dtype ``str(dtype)`` wrote (``"torch.float32"``), as the index records it; None if unknown."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def is_plain_tensor(obj: object) -> TypeGuard[torch.Tensor]:
    """A tensor DCP treats as one whole value (not a DTensor or ShardedTensor shard container)."""
    if type(obj) is torch.Tensor:  # the usual case, asked several times per saved item: no attribute lookups
        return True
    if not isinstance(obj, torch.Tensor):
        return False
    # DTensor and ShardedTensor implement DCP's _Checkpointable / shard-lookup protocol.
    return not (hasattr(obj, "__create_write_items__") or hasattr(obj, "local_shards"))


def exact_storage(tensor: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor whose storage holds exactly them, copying only when unavoidable.

    ``torch.save`` writes a tensor's whole underlying storage, so saving a row-chunk (or any view)
    as-is would write the full parent tensor. A contiguous CPU view gets a zero-copy storage slice;
    a non-contiguous one is copied; other devices are copied to the CPU by the writer anyway. A lazy
    conjugate / negative view keeps its flags over its storage's bytes, as ``torch.save`` stores it:
    the copy or slice is taken of its raw storage and flagged again. The result is outside autograd:
    ``tensor`` itself where it already is (a save resolves every item: no alias made for nothing).
    """
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_cpu:
        return tensor
    bits = math_bits(tensor)
    if bits is not None:
        return with_math_bits(exact_storage(with_math_bits(tensor, bits)), bits)
    if not tensor.is_contiguous():
        return tensor.contiguous()
    storage = tensor.untyped_storage()
    if storage.nbytes() == tensor.nbytes:
        return tensor
    start = tensor.storage_offset() * tensor.element_size()
    sliced = storage[start:start + tensor.nbytes]
    # torch's stubs lack this overload: set_'s stride defaults to the contiguous one (native_functions.yaml).
    return torch.empty(0, dtype=tensor.dtype).set_(sliced, 0, tensor.shape)  # type: ignore[call-overload]


def narrow_box(tensor: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    """The sub-box ``[offsets, offsets + sizes)`` of ``tensor`` as a view."""
    out = tensor
    for dim, (start, length) in enumerate(zip(offsets, sizes, strict=True)):
        if start != 0 or length != out.shape[dim]:
            out = out.narrow(dim, int(start), int(length))
    return out


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def one_whole_chunk(shape: tuple, offsets: tuple, sizes: tuple) -> bool:
    """Whether one chunk at ``offsets`` of ``sizes`` is exactly the whole tensor of ``shape``: plain
    ints (bools and other int subclasses go to ``tiling_problem``'s full checks), no negative size,
    zero offsets, the same sizes. True means ``tiling_problem(shape, [(offsets, sizes)])`` is None:
    callers checking many tensors ask this first, without building the boxes."""
    return (sizes == shape and len(offsets) == len(shape) and not any(offsets)
            and {*map(type, shape), *map(type, offsets), *map(type, sizes)} <= _INT and min(shape, default=0) >= 0)


_INT = frozenset({int})


def tiling_problem(shape: Sequence[int], boxes: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   whole: bool = True) -> str | None:
    """Why the boxes ``(offsets, sizes)`` do not tile a tensor of ``shape`` exactly once; None if they do.
    With ``whole=False`` (a copy that holds part of a tensor) they must lie inside it without
    overlapping, but need not cover it.

    A load fills each destination from the stored chunks that overlap it: a gap leaves elements at
    whatever the destination held, an overlap writes them twice from chunks that may disagree. Boxes
    inside the tensor whose volumes add up to its volume and of which no two overlap tile it exactly.
    The overlap test sweeps along the dimension with the most distinct starts, so evenly sharded
    tensors compare each box with a few neighbours only.
    """
    shape = tuple(shape)
    if len(boxes) == 1 and one_whole_chunk(shape, tuple(boxes[0][0]), tuple(boxes[0][1])):
        return None  # how unsharded tensors are stored: checked for every tensor of a save and a load
    if not all(map(_is_index, shape)) or any(s < 0 for s in shape):
        return f"its shape {list(shape)} is not a list of sizes"
    total = math.prod(shape)
    covered = 0
    nonempty = []
    for offsets, sizes in boxes:
        offsets, sizes = tuple(offsets), tuple(sizes)
        if (len(offsets) != len(shape) or len(sizes) != len(shape) or not all(map(_is_index, offsets + sizes))
                or any(o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True))):
            return f"a chunk at offsets {list(offsets)} of sizes {list(sizes)} lies outside its shape {list(shape)}"
        volume = math.prod(sizes)
        covered += volume
        if volume:
            nonempty.append((offsets, sizes))
    if whole and covered < total:
        return f"its chunks cover {covered} of its {total} elements"
    if not nonempty:
        return None
    dim = max(range(len(shape)), key=lambda d: len({o[d] for o, _ in nonempty})) if shape else 0
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for offsets, sizes in sorted(nonempty, key=lambda box: box[0][dim] if shape else 0):
        if shape:
            active = [a for a in active if a[0][dim] + a[1][dim] > offsets[dim]]
        for other_offsets, other_sizes in active:
            if all(o1 < o2 + s2 and o2 < o1 + s1
                   for o1, s1, o2, s2 in zip(offsets, sizes, other_offsets, other_sizes, strict=True)):
                return (f"its chunks at offsets {list(other_offsets)} and {list(offsets)} overlap "
                        f"(they cover {covered} element(s) of {total})")
        active.append((offsets, sizes))
    return None  # disjoint boxes inside the tensor (covering at least its volume: exactly its volume)
