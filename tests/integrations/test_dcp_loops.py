"""Training loops that call DCP themselves (torchtitan's pattern) use dcp_forge's planners and storage
directly: ``dcp.save`` / ``dcp.async_save`` / ``dcp.load`` with ``ForgeSavePlanner`` / ``ForgeLoadPlanner``
and ``open_writer`` / ``open_reader``, on 2 real gloo ranks."""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.checkpoint.stateful import Stateful

from dcp_forge import latest_checkpoint, read_manifest, verify_checkpoint
from dcp_forge.planners import ForgeLoadPlanner, ForgeSavePlanner
from dcp_forge.storage import open_reader, open_writer

# How each top-level key of the loop's state is shared: the declaration torchtitan's loop lacks (it
# names per-rank dataloader state "dp_rank_<n>" by hand so DCP's key dedup keeps every rank's copy).
DECLARATION = {"model": "replicated", "optimizer": "replicated", "dataloader": "per_rank", "train_state": "global"}


class ModelWrapper(Stateful):
    """torchtitan's ModelWrapper: the model parts' state dicts, merged, by parameter name."""

    def __init__(self, model: torch.nn.Module | list[torch.nn.Module]) -> None:
        self.model = [model] if isinstance(model, torch.nn.Module) else model

    def state_dict(self) -> dict:
        return {k: v for part in self.model for k, v in get_model_state_dict(part).items()}

    def load_state_dict(self, state_dict: dict) -> None:
        load = functools.partial(set_model_state_dict, model_state_dict=state_dict, options=StateDictOptions(strict=False))
        list(map(load, self.model))


class OptimizersContainer(Stateful):
    """torchtitan's OptimizersContainer, for one model part."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class TrainState(Stateful):
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step = int(state_dict["step"])


class Loader(Stateful):
    """A dataloader position, different on every data-parallel rank."""

    def __init__(self, rank: int) -> None:
        self.position = 0
        self.rank = rank

    def state_dict(self) -> dict:
        return {"position": self.position, "rank": self.rank}

    def load_state_dict(self, state_dict: dict) -> None:
        self.position, self.rank = state_dict["position"], state_dict["rank"]


def build(rank: int) -> dict:
    torch.manual_seed(0)  # replicated model, as after DDP's broadcast
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    return {"model": ModelWrapper(model), "optimizer": OptimizersContainer(model, optimizer),
            "dataloader": Loader(rank), "train_state": TrainState(), "_model": model, "_optimizer": optimizer}


def train_steps(state: dict, steps: int) -> None:
    model, optimizer = state["_model"], state["_optimizer"]
    for _ in range(steps):
        g = torch.Generator().manual_seed(state["train_state"].step)  # the same batch on every rank: grads agree
        model(torch.randn(4, 6, generator=g)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        state["train_state"].step += 1
        state["dataloader"].position += 10 + state["dataloader"].rank


def checkpointed(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("_")}


def snapshot(state: dict) -> dict:
    return {"model": {k: v.clone() for k, v in state["_model"].state_dict().items()},
            "optimizer": {name: {k: v.clone() for k, v in state["_optimizer"].state[p].items()}
                          for name, p in state["_model"].named_parameters()},
            "dataloader": state["dataloader"].state_dict(), "step": state["train_state"].step}


def assert_same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys() and a["optimizer"].keys() == b["optimizer"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for (pa, sa), sb in zip(a["optimizer"].items(), b["optimizer"].values(), strict=True):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa), pa
    assert (a["dataloader"], a["step"]) == (b["dataloader"], b["step"])


def load(path: str) -> dict:
    fresh = build(dist.get_rank())
    train_steps(fresh, 1)  # other values everywhere, and optimizer state to load into
    dcp.load(checkpointed(fresh), storage_reader=open_reader(path), planner=ForgeLoadPlanner(DECLARATION))
    return fresh


def _save_and_load(rank, world_size, root, mode):
    state = build(rank)
    train_steps(state, 3)
    path = os.path.join(root, "step-3")
    saved = snapshot(state)
    writer, planner = open_writer(path, extra={"step": 3}), ForgeSavePlanner(DECLARATION)
    if mode == "sync":
        dcp.save(checkpointed(state), storage_writer=writer, planner=planner)
    else:
        future = dcp.async_save(checkpointed(state), storage_writer=writer, planner=planner,
                                async_checkpointer_type=AsyncCheckpointerType.THREAD)
        train_steps(state, 2)  # training goes on while the checkpoint uploads; the staged copy is saved
        future.result()
    dist.barrier()
    assert_same(saved, snapshot(load(path)))
    return latest_checkpoint(root)


@pytest.mark.parametrize("mode", ["sync", "async_thread"])
def test_dcp_save_with_forge_planner_and_writer_on_two_ranks(ranks, tmp_path, mode):
    root = str(tmp_path)
    latest = ranks(_save_and_load, 2, root, mode)
    assert latest == [os.path.join(root, "step-3")] * 2  # committed: the commit marker is written last
    assert verify_checkpoint(latest[0]) == []
    manifest = read_manifest(latest[0])
    assert manifest.extra == {"step": 3}
    patterns = {k: (c.sharing_pattern, sorted(c.copies)) for k, c in manifest.components.items()}
    assert patterns["dataloader"] == ("per_rank", ["dataloader@rank0", "dataloader@rank1"])
    assert patterns["model"][0] == "replicated" and sorted(manifest.components["model"].ranks) == [0, 1]


def _process_executor_rank(rank, world_size, port, root, results):
    # A rank of our own: DCP's PROCESS executor starts a child process, which the ``ranks`` harness's
    # daemonic ranks may not, and rendezvouses through MASTER_ADDR / MASTER_PORT.
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        state = build(rank)
        train_steps(state, 2)
        saved = snapshot(state)
        path = os.path.join(root, "step-2")
        future = dcp.async_save(checkpointed(state), storage_writer=open_writer(path),
                                planner=ForgeSavePlanner(DECLARATION),
                                async_checkpointer_type=AsyncCheckpointerType.PROCESS)
        train_steps(state, 1)
        future.result()
        dist.barrier()
        assert_same(saved, snapshot(load(path)))
        results.put((rank, None))
    except BaseException as err:
        results.put((rank, f"{type(err).__name__}: {err}"))
    finally:
        dist.destroy_process_group()


def test_dcp_async_save_in_a_process_executor(rank_processes, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = rank_processes.Queue()
    procs = [rank_processes.Process(target=_process_executor_rank, args=(r, 2, port, str(tmp_path), results))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        outcome = dict(results.get(timeout=170) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert outcome == {0: None, 1: None}
    assert latest_checkpoint(str(tmp_path)) == os.path.join(str(tmp_path), "step-2")
    assert verify_checkpoint(os.path.join(str(tmp_path), "step-2")) == []
