"""TinyLM under real parallelism on CPU/gloo: pipelining, tensor parallelism, FSDP2 and DP×TP.

Each check trains a few steps on spawned ranks and compares losses and parameters with the same model
trained on one process (built from the same seed inside each worker), so "it runs" also means "it
computes the same thing".
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dcp_forge.trainers.data import MarkovTokenDataset
from dcp_forge.trainers.strategies import PretrainStrategy
from dcp_forge.trainers.tiny_lm import (
    TinyLM,
    TinyLMConfig,
    apply_fsdp2,
    apply_tensor_parallel,
    split_into_stages,
)

CONFIG = TinyLMConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=32)
STEPS = 3
# SGD, not Adam: Adam divides by the gradient's own scale, so on parameters whose true gradient is zero
# (the key bias: softmax ignores a per-query constant) it amplifies float noise into real updates.
LR = 0.1
TOL = dict(rtol=1e-4, atol=1e-5)


def _batches(n: int = STEPS, batch: int = 8, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    dataset = MarkovTokenDataset(CONFIG.vocab_size, seq, n * batch, seed=5)
    strategy = PretrainStrategy()
    return [
        strategy.prepare_batch(
            {"input_ids": torch.stack([dataset[i * batch + j]["input_ids"] for j in range(batch)])}
        )
        for i in range(n)
    ]


def _train(model, batches, shard=None) -> list[float]:
    """SGD steps; with ``shard=(index, count)`` this rank takes its slice of every batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    strategy, losses = PretrainStrategy(), []
    for batch in batches:
        if shard is not None:
            batch = {k: v.chunk(shard[1])[shard[0]] for k, v in batch.items()}
        loss, _ = strategy.compute_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def reference() -> dict:
    """The single-process run every parallel run must reproduce, computed once here and handed to the
    workers (each worker recomputing it costs seconds of CPU on a 2-core machine)."""
    batches = _batches()
    model = TinyLM(CONFIG, seed=0)
    losses = _train(model, batches)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"batches": batches, "losses": losses, "params": params}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _assert_params_match(model: torch.nn.Module, expected: dict[str, torch.Tensor], what: str) -> None:
    names = [n for n, _ in model.named_parameters()]
    assert names, what
    for name, param in model.named_parameters():
        torch.testing.assert_close(_full(param.detach()), expected[name], **TOL, msg=f"{what}: {name}")


# -- pipelining -----------------------------------------------------------------------------------


def _pipeline_worker(rank: int, world: int, ref: dict) -> None:
    # Both schedules in one process group: spawning ranks costs more than the runs themselves.
    for schedule_name in ("ScheduleGPipe", "Schedule1F1B"):
        _run_pipeline(rank, world, schedule_name, ref)


def _run_pipeline(rank: int, world: int, schedule_name: str, ref: dict) -> None:
    from torch.distributed import pipelining

    stage_module = split_into_stages(TinyLM(CONFIG, seed=0), world)[rank]
    stage = pipelining.PipelineStage(stage_module, rank, world, torch.device("cpu"))
    strategy = PretrainStrategy()
    schedule = getattr(pipelining, schedule_name)(stage, n_microbatches=4, loss_fn=strategy.loss_from_logits)
    optimizer = torch.optim.SGD(stage_module.parameters(), lr=LR)
    for step, batch in enumerate(ref["batches"]):
        optimizer.zero_grad()
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(batch["input_ids"])
        else:
            schedule.step(target=batch["labels"], losses=losses)
            # Equal-size microbatches without padding: their mean loss is the full batch's loss.
            mean = torch.stack(losses).mean().item()
            assert abs(mean - ref["losses"][step]) < 1e-5, (schedule_name, step, mean, ref["losses"][step])
        optimizer.step()
    _assert_params_match(stage_module, ref["params"], f"{schedule_name} stage {rank}")


def test_pipeline_schedules_gpipe_and_1f1b_run_on_gloo_and_match_one_process(ranks, reference):
    ranks(_pipeline_worker, 2, reference)


# -- tensor parallel and FSDP2 on a 1-D mesh --------------------------------------------------------


def _tp_and_fsdp2_worker(rank: int, world: int, ref: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    batches = ref["batches"]
    tp_model = apply_tensor_parallel(
        TinyLM(CONFIG, seed=0), init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    )
    assert isinstance(tp_model.blocks[0].mlp.fc_in.weight, DTensor)
    assert tp_model.blocks[0].mlp.fc_in.weight.to_local().shape[0] == CONFIG.ff_dim // world
    tp_losses = _train(tp_model, batches)
    assert all(abs(a - b) < 1e-5 for a, b in zip(tp_losses, ref["losses"], strict=True)), tp_losses
    _assert_params_match(tp_model, ref["params"], "TP")

    fsdp_model = apply_fsdp2(
        TinyLM(CONFIG, seed=0), init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    )
    assert isinstance(fsdp_model.embed.tok.weight, DTensor)
    _train(fsdp_model, batches, shard=(rank, world))  # each rank half of every batch
    _assert_params_match(fsdp_model, ref["params"], "FSDP2")


def test_tensor_parallel_and_fsdp2_run_on_gloo_and_match_one_process(ranks, reference):
    ranks(_tp_and_fsdp2_worker, 2, reference)


# -- DP×TP on a 2×2 mesh --------------------------------------------------------------------------


def _dp_tp_worker(rank: int, world: int, ref: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel.ddp import _pre_dp_module_transform
    from torch.nn.parallel import DistributedDataParallel

    batches = ref["batches"]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    shard = (mesh["dp"].get_local_rank(), mesh["dp"].size())

    # TP inside each replica, FSDP2 across replicas (the 2-D layout torchtitan uses).
    fsdp_tp = apply_fsdp2(apply_tensor_parallel(TinyLM(CONFIG, seed=0), mesh["tp"]), mesh["dp"])
    _train(fsdp_tp, batches, shard=shard)
    _assert_params_match(fsdp_tp, ref["params"], "FSDP2 x TP")

    # TP inside each replica, DDP across replicas.
    ddp_tp = apply_tensor_parallel(TinyLM(CONFIG, seed=0), mesh["tp"])
    _pre_dp_module_transform(ddp_tp)  # DDP cannot bucket DTensors; this hands it local tensors
    wrapped = DistributedDataParallel(ddp_tp, process_group=mesh["dp"].get_group())
    _train(wrapped, batches, shard=shard)
    _assert_params_match(ddp_tp, ref["params"], "DDP x TP")
    dist.barrier()


def test_dp_x_tp_on_a_2x2_mesh_matches_one_process(ranks, reference):
    ranks(_dp_tp_worker, 4, reference, timeout=180)
