"""Storage tiers on real gloo ranks simulating nodes (``ranks_per_node``), each node with its own local
directory: peer copies on other nodes, recovery after a node lost its local storage without reading
checkpoint data from the remote tier (counted at the fault proxy in front of the real SeaweedFS), and
the fall back to the remote tier, with one line saying why, after losing more nodes than the copies
cover."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from dcp_forge.format.names import COMMIT_FILE
from tests.support.fault_proxy import FaultProxy
from tests.support.object_store import storage_options_for

STEPS = 3


def state(step: int, rank: int) -> tuple[dict, dict]:
    shared = torch.Generator().manual_seed(step)
    own = torch.Generator().manual_seed(1000 * step + rank)
    return ({"w": torch.randn(300, 70, generator=shared), "b": torch.randn(5, generator=shared).to(torch.bfloat16),
             "step": step},
            {"noise": torch.randn(257, generator=own), "tag": f"rank{rank}-step{step}"})


def bit_exact(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
        if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def tiered_job(rank: int, world: int, root: str, remote: str, options: dict, per_node: int, copies: int,
               load: bool, shared_dir: bool = False) -> dict:
    """Save ``STEPS`` checkpoints (the last one async), or load the newest; report what happened."""
    from dcp_forge import CheckpointCoordinator, LocalTier, StateComponent
    from tests.support.statefuls import Box

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                lines.append(record.getMessage())

    logging.getLogger("dcp_forge").addHandler(Keep())
    node = rank // per_node
    model, rng = Box({}), Box({})
    local = os.path.join(root, "node" if shared_dir else f"node{node}")
    coord = CheckpointCoordinator([StateComponent("model", model, "replicated"), StateComponent("rng", rng, "per_rank")],
                                  output_dir=remote, storage_options=options,
                                  local_tier=LocalTier(local, keep=2, peer_copies=copies))
    try:
        if not load:
            for step in range(1, STEPS + 1):
                model.state, rng.state = state(step, rank)
                coord.wait()  # local retention keeps a checkpoint while it drains: let keep=2 show exactly
                if step < STEPS:
                    coord.save_checkpoint(checkpoint_id=f"checkpoint-{step}")
                else:
                    handle = coord.async_save(checkpoint_id=f"checkpoint-{step}")
                    model.state["w"].add_(1)  # training goes on while it commits
                    handle.result()
            return {"peer_bytes_sent": coord.tiers.last_commit.peer_copy.bytes_sent}
        model.state = {"w": torch.zeros(300, 70), "b": torch.zeros(5, dtype=torch.bfloat16), "step": 0}
        rng.state = {"noise": torch.zeros(257), "tag": ""}
        result = coord.load_checkpoint()
        expected = state(STEPS, rank)
        return {"tier": result.tier, "path": os.fspath(result), "bytes_read": result.bytes_read,
                "exact": bit_exact(model.state, expected[0]) and bit_exact(rng.state, expected[1]), "lines": lines}
    finally:
        coord.close()


def test_a_node_that_lost_its_local_storage_recovers_from_peer_copies_without_remote_reads(
        ranks, tmp_path, s3_url, s3_server_info):
    root = str(tmp_path)
    with FaultProxy(s3_server_info.endpoint_url) as proxy:
        options = {**storage_options_for(s3_server_info), "endpoint_url": proxy.endpoint_url}
        saved = ranks(tiered_job, 4, root, s3_url, options, 2, 1, False, ranks_per_node=2)
        assert all(r["peer_bytes_sent"] > 0 for r in saved)
        for node in ("node0", "node1"):  # each node keeps its own files and its partner's: the whole checkpoint
            assert sorted(os.listdir(os.path.join(root, node))) == ["checkpoint-2", "checkpoint-3"]
        shutil.rmtree(os.path.join(root, "node1"))  # node 1 lost its local storage; the job restarts
        proxy.reset_stats()
        loaded = ranks(tiered_job, 4, root, s3_url, options, 2, 1, True, ranks_per_node=2)
        events = proxy.events()
    assert [r["tier"] for r in loaded] == ["local"] * 4 and all(r["exact"] for r in loaded)
    assert all(r["path"] == f"{s3_url}/checkpoint-{STEPS}" for r in loaded)
    assert [r["bytes_read"] > 0 for r in loaded] == [True, True, False, False]  # node 1's ranks got it over gloo
    prefix = "/" + s3_url[len("s3://"):] + "/"
    objects = [path for _, method, path, _ in events if method in ("GET", "HEAD") and path.startswith(prefix)]
    assert objects and all(path.endswith(f"/{COMMIT_FILE}") for path in objects), objects
    assert not any(r["lines"] for r in loaded)


def test_losing_more_nodes_than_the_copies_cover_falls_back_to_the_remote_tier(ranks, tmp_path):
    root, remote = str(tmp_path / "local"), str(tmp_path / "remote")
    ranks(tiered_job, 4, root, remote, {}, 1, 1, False, ranks_per_node=1)
    for node in ("node1", "node2"):  # rank 1's files were on nodes 1 and 2 only
        shutil.rmtree(os.path.join(root, node))
    loaded = ranks(tiered_job, 4, root, remote, {}, 1, 1, True, ranks_per_node=1)
    assert [r["tier"] for r in loaded] == ["remote"] * 4 and all(r["exact"] for r in loaded)
    [line] = loaded[0]["lines"]
    assert line.startswith(f"checkpoint-{STEPS} is committed in the local tier but cannot be loaded from it: data "
                           "file(s) __1_0.distcp")
    assert f"loading its remote copy {remote}/checkpoint-{STEPS}" in line and "peer_copies=1" in line
    assert not any(r["lines"] for r in loaded[1:])


def test_a_local_directory_shared_by_nodes_is_refused(ranks, tmp_path):
    with pytest.raises(AssertionError, match="LocalTier.path .* of node 0 is also node \\[1\\]'s: the local tier "
                                             "must be node-local storage"):
        ranks(tiered_job, 2, str(tmp_path), str(tmp_path / "remote"), {}, 1, 0, False, True, ranks_per_node=1)
