"""DataloaderDispatcher: one rank of a group loads batches, the others receive them.

Used where several ranks must see the same data without each running a loader: the stages of one
pipeline (every stage needs the batch: the first for inputs, the last for labels), the ranks of one
tensor-parallel group, or, with ``split_batches=True``, DDP ranks that each take a slice of a batch
loaded once. Only the loading rank holds dataset state, which is why the trainers declare dataset
state GLOBAL (one group) or PER_GROUP (one dispatcher per model replica in DP×PP / DP×TP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torchdata.stateful_dataloader import StatefulDataLoader

__all__ = ["DataloaderDispatcher"]

# gloo cannot broadcast bool tensors; they travel as uint8 and are viewed back on arrival.
_WIRE_DTYPES = {torch.bool: torch.uint8}


class DataloaderDispatcher:
    """Iterate a ``StatefulDataLoader`` on the loading rank of ``group`` and hand its batches to every
    rank of the group.

    Call protocol (every call below is collective over ``group`` unless noted):

    1. every rank of ``group`` builds a dispatcher with the same ``group``, ``src`` and
       ``split_batches``; the loading rank passes its dataloader, the others may pass ``None``;
    2. every rank iterates it in lockstep (``for batch in dispatcher``), epoch after epoch;
    3. ``state_dict()`` / ``load_state_dict()`` are local (no communication): the loading rank returns
       / restores its loader's state, the other ranks return ``{}`` and ignore what they are given.

    Batches are dicts of tensors (plus picklable non-tensor values, which are copied as they are).
    With ``split_batches`` every tensor's first dimension is cut into ``group size`` equal slices and
    rank ``r`` of the group receives slice ``r`` (non-tensor values are copied whole).

    A batch the loading rank cannot send (not a dict, or not divisible for ``split_batches``) raises
    the same ``TypeError`` / ``ValueError`` on every rank, rather than leaving the others waiting.
    """

    def __init__(
        self,
        dataloader: StatefulDataLoader | None,
        *,
        group: dist.ProcessGroup | None = None,
        src: int = 0,
        split_batches: bool = False,
    ) -> None:
        self._distributed = dist.is_available() and dist.is_initialized()
        self.group = group if group is not None or not self._distributed else dist.group.WORLD
        self.group_size = dist.get_world_size(self.group) if self._distributed else 1
        self.group_rank = dist.get_rank(self.group) if self._distributed else 0
        if not 0 <= src < self.group_size:
            raise ValueError(
                f"DataloaderDispatcher: src must be a rank of the group, in [0, {self.group_size}) "
                f"(got {src})"
            )
        self.src = src
        self.split_batches = split_batches
        self.is_loading_rank = self.group_rank == src
        if self.is_loading_rank and dataloader is None:
            raise ValueError(
                f"DataloaderDispatcher: dataloader must be given on the loading rank (group rank {src}, "
                f"global rank {self._global_src()})"
            )
        # Only the loading rank touches its loader: a loader passed elsewhere is ignored, so that
        # symmetric code can build one everywhere without consuming data twice.
        self.dataloader = dataloader if self.is_loading_rank else None
        self._length = self._broadcast_object(self._local_length())

    @classmethod
    def from_device_mesh(
        cls,
        mesh: DeviceMesh,
        build_dataloader: Callable[[int, int], StatefulDataLoader],
        *,
        dp_dim: str = "dp",
        src: int = 0,
    ) -> DataloaderDispatcher:
        """One dispatcher per model replica of a 2-D ``mesh`` with a data-parallel dimension ``dp_dim``
        and one model-parallel dimension (pipeline or tensor parallel).

        Each model-parallel group broadcasts within itself; its loading rank calls
        ``build_dataloader(shard_index, num_shards)`` with its data-parallel coordinate, so the
        replicas read disjoint shards. Other ranks never build a loader.
        """
        names = mesh.mesh_dim_names or ()
        if mesh.ndim != 2 or dp_dim not in names:
            raise ValueError(
                f"DataloaderDispatcher.from_device_mesh: mesh must be 2-D with a {dp_dim!r} dimension "
                f"(got shape {tuple(mesh.shape)}, names {names})"
            )
        mp_dim = next(n for n in names if n != dp_dim)
        mp_mesh, dp_mesh = mesh[mp_dim], mesh[dp_dim]
        loads = mp_mesh.get_local_rank() == src
        loader = build_dataloader(dp_mesh.get_local_rank(), dp_mesh.size()) if loads else None
        return cls(loader, group=mp_mesh.get_group(), src=src)

    # -- state (local) --------------------------------------------------------------------------

    # Only the loading rank holds a loader (``self.dataloader`` is None elsewhere).
    def state_dict(self) -> dict[str, Any]:
        return self.dataloader.state_dict() if self.dataloader is not None else {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self.dataloader is None:
            return
        if not state_dict:
            raise ValueError(
                f"DataloaderDispatcher.load_state_dict: the loading rank (global rank {self._global_src()}) "
                "got an empty state; expected a StatefulDataLoader state_dict"
            )
        self.dataloader.load_state_dict(state_dict)

    # -- iteration (collective) -----------------------------------------------------------------

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError("DataloaderDispatcher: the underlying dataloader has no length")
        return self._length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.group_size == 1 and self.dataloader is not None:  # the only rank loads: nothing to send
            yield from self.dataloader
            return
        source = iter(self.dataloader) if self.dataloader is not None else None
        while True:
            batch = header = None
            if source is not None:
                batch = next(source, None)
                header = self._header(batch)
            header = self._broadcast_object(header)
            if header["kind"] == "end":
                return
            if header["kind"] == "error":
                raise header["error"]
            yield self._transfer(header, batch)

    def _header(self, batch: Any) -> dict[str, Any]:
        """What receivers need to allocate buffers; an ``error`` header makes every rank raise."""
        if batch is None:
            return {"kind": "end"}
        if not isinstance(batch, Mapping):
            return {
                "kind": "error",
                "error": TypeError(
                    f"DataloaderDispatcher: batches must be dicts (got a {type(batch).__name__})"
                ),
            }
        tensors, objects = {}, {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                if self.split_batches and (value.dim() == 0 or value.shape[0] % self.group_size):
                    return {
                        "kind": "error",
                        "error": ValueError(
                            f"DataloaderDispatcher: split_batches needs batch[{key!r}].shape[0] divisible by the "
                            f"group size {self.group_size} (got shape {tuple(value.shape)})"
                        ),
                    }
                tensors[key] = (tuple(value.shape), value.dtype)
            else:
                objects[key] = value
        return {"kind": "batch", "tensors": tensors, "objects": objects}

    def _transfer(self, header: Mapping[str, Any], batch: Mapping[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = dict(header["objects"])
        for key, (shape, dtype) in header["tensors"].items():
            wire = _WIRE_DTYPES.get(dtype, dtype)
            if self.split_batches:
                shape = (shape[0] // self.group_size, *shape[1:])
            received = torch.empty(shape, dtype=wire)
            if self.split_batches:
                chunks = None
                if batch is not None:  # the loading rank
                    chunks = [c.contiguous().view(wire) for c in batch[key].chunk(self.group_size)]
                dist.scatter(received, chunks, group=self.group, group_src=self.src)
            else:
                if batch is not None:
                    received = batch[key].contiguous().view(wire)
                dist.broadcast(received, group=self.group, group_src=self.src)
            out[key] = received.view(dtype)
        return out

    def _local_length(self) -> int | None:
        if self.dataloader is None:
            return None
        try:
            return len(self.dataloader)
        except TypeError:  # an IterableDataset without __len__
            return None

    def _broadcast_object(self, obj: Any) -> Any:
        if self.group_size == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, group=self.group, group_src=self.src)
        return holder[0]

    def _global_src(self) -> int:
        if not self._distributed or self.group is None:  # distributed, the group is at least WORLD
            return 0
        return dist.get_global_rank(self.group, self.src)
