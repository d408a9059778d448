"""A GLOBAL DTensor committed with only one rank's chunks (the other rank's chunks removed from every
record, checksums re-sealed) is refused on every rank at its own world size and at world 1, before
anything is filled: the rank whose shard no stored chunk overlaps reads nothing for it, and must
refuse all the same instead of keeping its fresh values."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dcp_forge import CheckpointCoordinator, IntegrityError, StateComponent
from tests.support.statefuls import Box
from tests.support.tamper import drop_chunks

ROWS = 8


def _full() -> torch.Tensor:
    return torch.arange(ROWS * 4, dtype=torch.float32).reshape(ROWS, 4)


def _sharded(value: torch.Tensor):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(value, init_device_mesh("cpu", (dist.get_world_size(),)), [Shard(0)])


def _save_tamper_load(rank: int, world: int, root: str) -> tuple[str, str, bool]:
    with CheckpointCoordinator([StateComponent("box", Box({"w": _sharded(_full())}), "global")],
                               output_dir=root) as coord:
        path = coord.save_checkpoint(checkpoint_id="c")
    if rank == 0:  # rank 1's shard of box.w is gone from .metadata and the index alike
        drop_chunks(path, "box.w", lambda chunks: [c for c in chunks if c.offsets[0] != 0])
    dist.barrier()
    fresh = Box({"w": _sharded(torch.full((ROWS, 4), -1.0))})
    with CheckpointCoordinator([StateComponent("box", fresh, "global")], output_dir=root) as coord:
        try:
            coord.load_checkpoint(path)
            outcome = ("no error", "")
        except IntegrityError as err:
            outcome = (type(err).__name__, str(err))
        untouched = bool((fresh.state["w"].to_local() == -1).all())
    return (*outcome, untouched)


def test_a_dtensor_missing_one_ranks_chunks_is_refused_on_every_rank(ranks, tmp_path):
    root = str(tmp_path / "run")
    for name, message, untouched in ranks(_save_tamper_load, 2, root):
        assert name == "IntegrityError", message
        assert "tensor 'box.w' of component 'box' cannot be loaded exactly: its chunks cover 16 of its 32" in message
        assert untouched
    box = Box({"w": torch.full((ROWS, 4), -1.0)})
    with pytest.raises(IntegrityError, match="its chunks cover 16 of its 32 elements"):
        CheckpointCoordinator([StateComponent("box", box, "global")], output_dir=root).load_checkpoint(
            os.path.join(root, "c"))
    assert (box.state["w"] == -1).all()
