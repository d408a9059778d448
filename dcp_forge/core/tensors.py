"""Tensor helpers shared by planners and storage: exact-storage views, chunk narrowing, dtype names."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def dtype_named(name: str) -> torch.dtype | None:
    """The dtype ``str(dtype)`` wrote (``"torch.float32"``), as the index records it; None if unknown."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def is_plain_tensor(obj: object) -> bool:
    """A tensor DCP treats as one whole value (not a DTensor or ShardedTensor shard container)."""
    if not isinstance(obj, torch.Tensor):
        return False
    # DTensor and ShardedTensor implement DCP's _Checkpointable / shard-lookup protocol.
    return not (hasattr(obj, "__create_write_items__") or hasattr(obj, "local_shards"))


def exact_storage(tensor: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor whose storage holds exactly them, copying only when unavoidable.

    ``torch.save`` writes a tensor's whole underlying storage, so saving a row-chunk (or any view)
    as-is would write the full parent tensor. A contiguous CPU view gets a zero-copy storage slice;
    a non-contiguous one is copied; other devices are copied to the CPU by the writer anyway.
    """
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        return tensor
    if not tensor.is_contiguous():
        return tensor.contiguous()
    storage = tensor.untyped_storage()
    if storage.nbytes() == tensor.nbytes:
        return tensor
    start = tensor.storage_offset() * tensor.element_size()
    sliced = storage[start:start + tensor.nbytes]
    return torch.empty(0, dtype=tensor.dtype).set_(sliced, 0, tensor.shape)


def narrow_box(tensor: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    """The sub-box ``[offsets, offsets + sizes)`` of ``tensor`` as a view."""
    out = tensor
    for dim, (start, length) in enumerate(zip(offsets, sizes, strict=True)):
        if start != 0 or length != out.shape[dim]:
            out = out.narrow(dim, int(start), int(length))
    return out
