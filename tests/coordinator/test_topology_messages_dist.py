"""What a load on a changed topology says it did, and that the user sees it: one line per
component, true for DTensor and plain values alike, shown as a TopologyChangeWarning on rank 0 when
no log handler would show it (torchrun configures no logging), logged instead when one would."""

from __future__ import annotations

import logging
import os
import warnings

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from dcp_forge import CheckpointCoordinator, StateComponent, TopologyChangeWarning
from tests.support.statefuls import Box, Counter


def _components(world: int, step: int, fill: float) -> list[StateComponent]:
    mesh = init_device_mesh("cpu", (world,))
    sharded = distribute_tensor(torch.full((4, 2), fill), mesh, [Shard(0)])
    return [StateComponent("sharded", Box({"w": sharded}), "global"),
            StateComponent("step", Counter(step), "global"),
            StateComponent("weights", Box({"b": torch.full((3,), fill)}), "replicated")]


def _save(rank: int, world: int, root: str) -> None:
    with CheckpointCoordinator(_components(world, 7, 1.0), output_dir=root) as coord:
        coord.save_checkpoint(checkpoint_id="checkpoint-7")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _load(rank: int, world: int, root: str, log_to_handler: bool) -> dict:
    components = _components(world, 0, 0.0)
    handler = _Lines()
    log = logging.getLogger("dcp_forge.coordinator")
    if log_to_handler:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with CheckpointCoordinator(components, output_dir=root) as coord:
                result = coord.load_checkpoint()
    finally:
        log.removeHandler(handler)
    return {"changes": list(result.topology_changes), "logged": [line for line in handler.lines if "component" in line],
            "warned": [str(w.message) for w in caught if w.category is TopologyChangeWarning],
            "step": components[1].stateful.step, "w": components[0].stateful.state["w"].full_tensor()}


def test_topology_change_lines_are_true_and_visible(ranks, tmp_path):
    root = str(tmp_path)
    ranks(_save, 2, root)
    assert os.path.isdir(os.path.join(root, "checkpoint-7"))
    [quiet] = ranks(_load, 1, root, False)
    assert quiet["step"] == 7 and torch.equal(quiet["w"], torch.ones(4, 2))
    lines = {line.split("'")[1]: line for line in quiet["changes"]}
    assert set(lines) == {"sharded", "step", "weights"}
    assert "its DTensor values reshard to the current placement" in lines["sharded"]
    for plain in ("step", "weights"):
        assert "as saved (it holds no DTensor, nothing reshards)" in lines[plain], lines[plain]
        assert "DTensor shards reshard" not in lines[plain]
    assert all("saved with world_size=2" in line and "now world_size=1" in line for line in lines.values())
    assert quiet["warned"] == quiet["changes"] and quiet["logged"] == [], "no logging configured: warned"
    [logged] = ranks(_load, 1, root, True)
    assert logged["logged"] == logged["changes"] == quiet["changes"] and logged["warned"] == [], "logged, not both"
