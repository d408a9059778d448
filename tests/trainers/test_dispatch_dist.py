"""DataloaderDispatcher on 2 spawned gloo ranks: broadcast, split, resume, errors, per-replica meshes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dcp_forge.trainers.data import MarkovTokenDataset, ReversalSFTDataset, make_dataloader
from dcp_forge.trainers.dispatch import DataloaderDispatcher

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype
        if isinstance(a[k], torch.Tensor)
        else a[k] == b[k]
        for k in a
    )


def _dataset():
    return ReversalSFTDataset(64, 12, 40, seed=0)  # has a bool prompt_mask, which gloo cannot send as is


def _loader(**kwargs):
    return make_dataloader(_dataset(), 4, shuffle=True, seed=3, **kwargs)


def _check_broadcast_and_resume(rank: int) -> None:
    plain = _loader()
    reference = [list(plain) for _ in range(2)]  # every rank can compute what rank 0 loads
    dispatcher = DataloaderDispatcher(_loader() if rank == 0 else None)
    assert len(dispatcher) == len(reference[0]) == 10
    got = []
    for batch in dispatcher:
        got.append(batch)
        if len(got) == 3:
            break
    state = dispatcher.state_dict()
    assert (state != {}) == (rank == 0)

    restored = DataloaderDispatcher(_loader() if rank == 0 else None)
    # Non-loading ranks ignore whatever they are handed (a GLOBAL component loads rank 0's state).
    restored.load_state_dict(state if rank == 0 else {"anything": 1})
    rest = [list(restored) for _ in range(2)]
    expected = [reference[0][3:], reference[1]]
    assert [len(e) for e in rest] == [7, 10]
    assert all(
        same(a, b)
        for got_e, want_e in zip(rest, expected, strict=True)
        for a, b in zip(got_e, want_e, strict=True)
    )
    assert all(same(a, b) for a, b in zip(got, reference[0][:3], strict=True))


def _check_split(rank: int, world: int) -> None:
    reference = list(_loader())
    dispatcher = DataloaderDispatcher(_loader() if rank == 0 else None, split_batches=True)
    batches = list(dispatcher)
    assert len(batches) == len(reference)
    for mine, full in zip(batches, reference, strict=True):
        assert same(mine, {k: v.chunk(world)[rank] for k, v in full.items()})


def _check_errors_reach_every_rank(rank: int) -> None:
    odd = make_dataloader(_dataset(), 3)
    with pytest.raises(ValueError, match="divisible"):
        next(iter(DataloaderDispatcher(odd if rank == 0 else None, split_batches=True)))
    tuples = make_dataloader(torch.utils.data.TensorDataset(torch.arange(8)), 2)
    with pytest.raises(TypeError, match="dicts"):
        next(iter(DataloaderDispatcher(tuples if rank == 0 else None)))


def _check_non_tensor_values(rank: int) -> None:
    def collate(items):
        return {"ids": torch.stack([i["input_ids"] for i in items]), "note": ["x"] * len(items)}

    from torchdata.stateful_dataloader import StatefulDataLoader

    loader = StatefulDataLoader(MarkovTokenDataset(16, 4, 8), batch_size=2, collate_fn=collate)
    batches = list(DataloaderDispatcher(loader if rank == 0 else None))
    assert len(batches) == 4 and batches[0]["note"] == ["x", "x"]


def _check_meshes(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    def build(shard_index, num_shards):
        return make_dataloader(
            MarkovTokenDataset(16, 4, 40, seed=1),
            2,
            shuffle=True,
            seed=5,
            num_shards=num_shards,
            shard_index=shard_index,
        )

    # One replica of two stages: rank 0 loads the only shard, both stages see it.
    one = DataloaderDispatcher.from_device_mesh(
        init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "pp")), build
    )
    assert one.is_loading_rank == (rank == 0)
    assert all(same(a, b) for a, b in zip(one, build(0, 1), strict=True))

    # Two replicas of one stage: each loads its own shard.
    two = DataloaderDispatcher.from_device_mesh(
        init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "pp")), build
    )
    assert two.is_loading_rank
    mine = list(two)
    assert all(same(a, b) for a, b in zip(mine, build(rank, world), strict=True))
    theirs = [None] * world
    dist.all_gather_object(theirs, torch.cat([b["input_ids"] for b in mine]))
    assert not torch.equal(theirs[0], theirs[1])


def _dispatcher_worker(rank: int, world: int) -> None:
    _check_broadcast_and_resume(rank)
    _check_split(rank, world)
    _check_errors_reach_every_rank(rank)
    _check_non_tensor_values(rank)
    _check_meshes(rank, world)


def test_dispatcher_on_two_gloo_ranks(ranks):
    ranks(_dispatcher_worker, 2)


def test_dispatcher_without_a_process_group_passes_batches_through():
    dispatcher = DataloaderDispatcher(_loader())
    assert dispatcher.is_loading_rank and len(dispatcher) == 10
    assert all(same(a, b) for a, b in zip(dispatcher, _loader(), strict=True))
    with pytest.raises(ValueError, match="dataloader must be given"):
        DataloaderDispatcher(None)
    with pytest.raises(ValueError, match="src"):
        DataloaderDispatcher(_loader(), src=1)
