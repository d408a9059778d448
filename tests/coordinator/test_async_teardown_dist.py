"""An async save in flight when the job tears down without ``close()``, on 2 real gloo ranks.

Each scenario starts 2 ranks holding FSDP2 model + AdamW state (GLOBAL, DTensor shards), starts
``async_save`` to storage that writes slowly (``tests/support/slow_storage.py``: real local files at a bounded
rate, so the upload is still running when the teardown comes), keeps training, then tears down in
one order: ``dist.destroy_process_group()`` right away (on every rank, on one rank, or bypassing
dcp_forge's hook on it), interpreter exit with neither ``close()`` nor ``destroy_process_group()``,
SIGTERM to one or to every rank, SIGKILL to one rank. Whatever the order, the checkpoint is either
committed, verifies clean and loads bit-exactly to the values of the call, or not committed at all.
The scenarios run with uploads on a thread and in upload processes (``AsyncOptions(upload="process")``,
whose own process group a teardown of the training's groups does not touch; a killed rank's upload
process ends with it).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
import time
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dcp_forge import (
    AsyncOptions,
    CheckpointCoordinator,
    StateComponent,
    latest_checkpoint,
    verify_checkpoint,
)
from dcp_forge.statefuls import ModelState, OptimizerState
from dcp_forge.storage import CheckpointState, checkpoint_state, open_backend
from tests.support import slow_storage
from tests.support.model_state import full_state, mismatches, train

WORLD = 2
WIDTH = 384  # model + AdamW moments: about 1.7 MiB, 0.85 MiB per rank
SECONDS_PER_MIB = 1.5  # with one writer thread a rank's upload takes over a second
CHECKPOINT = "checkpoint-2"


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 8))


def _components(model: nn.Module, opt: torch.optim.Optimizer) -> list[StateComponent]:
    return [StateComponent("model", ModelState(model), "global"),
            StateComponent("optimizer", OptimizerState(model, opt), "global")]


def _destroy_bypassing_hooks() -> None:
    """``destroy_process_group`` as torch defines it, past any wrapper installed on the module attribute."""
    destroy = dist.destroy_process_group
    getattr(destroy, "__wrapped__", destroy)()


def _pause_new_threads_entering_dcp_save(until: threading.Event) -> None:
    """Threads started from now on wait for ``until`` as they enter DCP's ``save()`` (the background
    save's first step, which decides whether it runs distributed). Only the scheduling is forced:
    the code that runs afterwards is the real one."""
    def trace(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_name == "save" and code.co_filename.endswith("state_dict_saver.py"):
            until.wait(60)
        return  # nothing traced inside frames

    threading.settrace(trace)


def _rank(rank: int, init_file: str, root: str, mode: str, killed: tuple[int, ...], upload: str, report) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(WORLD)})
    slow_storage.register()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    model = _model(seed=0)
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, steps=1)
    expected = full_state(model, opt)  # collective
    if rank == 0:
        torch.save(expected, os.path.join(root, "expected.pt"))
    coord = CheckpointCoordinator(_components(model, opt), output_dir=slow_storage.slow_url(root),
                                  storage_options={"seconds_per_mib": SECONDS_PER_MIB}, thread_count=1,
                                  async_options=AsyncOptions(upload=upload))
    destroyed = threading.Event()
    if mode == "destroy_unhooked_first":
        # The group is gone before the background save starts: DCP then saves as a single process,
        # this rank's shards alone (the order that once committed half of every tensor).
        _pause_new_threads_entering_dcp_save(until=destroyed)
    handle = coord.async_save(checkpoint_id=CHECKPOINT)
    threading.settrace(None)
    # The destroying scenarios destroy right after the call, before anything else runs here.
    if mode == "destroy" or (mode == "destroy_one" and rank == 1):
        dist.destroy_process_group()
    elif mode.startswith("destroy_unhooked"):
        _destroy_bypassing_hooks()
        destroyed.set()
    elif mode in ("exit", "signal"):
        train(model, opt, steps=1)  # training goes on, changing the state in place under the upload
    report.send("staged")
    if mode == "destroy_one" and rank == 0:
        handle.exception()
        dist.destroy_process_group()
    elif mode == "signal":
        if rank in killed:
            for _ in range(6000):  # keep living until the signal comes
                time.sleep(0.01)
        else:
            handle.exception()
    elif mode not in ("exit", "destroy", "destroy_one", "destroy_unhooked", "destroy_unhooked_first"):
        raise ValueError(mode)
    report.send("returning")
    # then the process exits: neither close() nor (except above) destroy_process_group()


def run_scenario(ctx, root: str, mode: str, kill: tuple[int, ...] = (), how: int = signal.SIGTERM,
                 upload: str = "thread") -> dict:
    """Start the ranks from ``ctx`` (the ``rank_processes`` / ``kills`` fixture), signal ``kill`` ranks
    once every rank staged; returns exit codes and what each said.

    Each rank reports over a pipe of its own: a rank killed while writing to a shared queue would
    leave the queue's lock held, and the other rank's exit waiting on it.
    """
    init_file = os.path.join(root, "rendezvous")
    pipes = [ctx.Pipe(duplex=False) for _ in range(WORLD)]
    procs = [ctx.Process(target=_rank, args=(r, init_file, root, mode, kill, upload, pipes[r][1]), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for _, send in pipes:
        send.close()
    said: list[list[str]] = [[] for _ in range(WORLD)]
    try:
        for rank, (receive, _) in enumerate(pipes):
            assert receive.poll(120), f"{mode}: rank {rank} never staged (exit code {procs[rank].exitcode})"
            said[rank].append(receive.recv())
        for r in kill:
            os.kill(procs[r].pid, how)
        for p in procs:
            p.join(120)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"{mode}: ranks {hung} did not exit"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    for rank, (receive, _) in enumerate(pipes):
        with contextlib.suppress(EOFError, OSError):
            while receive.poll():
                said[rank].append(receive.recv())
        receive.close()
    return {"exitcodes": [p.exitcode for p in procs], "said": said}


def outcome(root: str) -> str:
    """"committed" after checking it verifies clean and loads bit-exactly; else its uncommitted state."""
    path = os.path.join(root, CHECKPOINT)
    state = checkpoint_state(*open_backend(path))
    if state is not CheckpointState.COMMITTED:
        assert latest_checkpoint(root) is None, f"{path} is {state.value} but listed"
        return state.value
    problems = verify_checkpoint(path)
    assert problems == [], f"{path} is committed but verify finds: {[str(p) for p in problems]}"
    model = _model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    CheckpointCoordinator(_components(model, opt), output_dir=root).load_checkpoint(path)
    expected = torch.load(os.path.join(root, "expected.pt"), weights_only=False)
    assert mismatches(expected, full_state(model, opt)) == []
    model_only = _model(seed=2)
    opt_only = torch.optim.AdamW(model_only.parameters(), lr=1e-2)
    CheckpointCoordinator(_components(model_only, opt_only), output_dir=root).load_checkpoint(
        path, components=["model"])
    assert all(torch.equal(expected[f"model.{name}"], p) for name, p in model_only.state_dict().items())
    return "committed"


UPLOADS = pytest.mark.parametrize("upload", ["thread", "process"])


@UPLOADS
@pytest.mark.parametrize("mode", ["destroy", "destroy_one", "exit"])
def test_forgetting_close_still_commits_the_whole_checkpoint(rank_processes, tmp_path, mode, upload):
    run = run_scenario(rank_processes, str(tmp_path), mode, upload=upload)
    assert run["exitcodes"] == [0, 0], run
    assert outcome(str(tmp_path)) == "committed"


@UPLOADS
@pytest.mark.parametrize("mode", ["destroy_unhooked", "destroy_unhooked_first"], ids=["racing", "before-start"])
def test_destroying_the_group_past_the_hook_commits_all_or_nothing(rank_processes, tmp_path, mode, upload):
    run_scenario(rank_processes, str(tmp_path), mode, upload=upload)
    assert outcome(str(tmp_path)) in ("committed", "partial", "missing")


@UPLOADS
@pytest.mark.parametrize("kill", [(1,), (0, 1)], ids=["one-rank", "every-rank"])
def test_sigterm_while_uploading_commits_all_or_nothing(kills, tmp_path, kill, upload):
    run = run_scenario(kills, str(tmp_path), "signal", kill=kill, upload=upload)
    assert all(code in (0, 128 + signal.SIGTERM, -signal.SIGTERM) for code in run["exitcodes"]), run
    assert outcome(str(tmp_path)) in ("committed", "partial", "missing")


@UPLOADS
def test_sigkill_of_one_rank_while_uploading_commits_nothing_half_done(kills, tmp_path, upload):
    run_scenario(kills, str(tmp_path), "signal", kill=(1,), how=signal.SIGKILL, upload=upload)
    assert outcome(str(tmp_path)) in ("committed", "partial", "missing")
