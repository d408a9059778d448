"""The demo job: a small 2-rank data-parallel training run that checkpoints, is interrupted,
resumes from its latest checkpoint, and shows that the resumed run matches an uninterrupted one.

Runs on CPU with gloo; ranks are spawned processes rendezvousing through a file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import CheckpointCoordinator, RNGState, SharingPattern, StateComponent, latest_checkpoint, read_manifest
from .storage import redact_url


class StepCounter:
    def __init__(self) -> None:
        self.step = 0
        self.losses: list[float] = []

    def state_dict(self):
        return {"step": self.step, "losses": list(self.losses)}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]


def _components(model, opt, counter):
    return [
        StateComponent("model", model, SharingPattern.REPLICATED, validate_replication=True),
        StateComponent("optimizer", opt, SharingPattern.REPLICATED),
        # step and the (all-reduced) loss history are the same on every rank: checked at each save
        StateComponent("trainer", counter, SharingPattern.REPLICATED, validate_replication=True),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),  # each rank draws its own batches
    ]


def _train(rank: int, world: int, init_file: str, output_dir: str, steps: int, save_every: int,
           stop_at: int | None, results) -> None:
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on every rank (what DDP's broadcast ensures)
        model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        counter = StepCounter()
        torch.manual_seed(1000 + rank)  # per-rank data stream
        coord = CheckpointCoordinator(_components(model, opt, counter), output_dir=output_dir)
        if latest_checkpoint(output_dir) is not None:
            path = coord.load_checkpoint()
            if rank == 0:
                print(f"[rank 0] resumed from {redact_url(path)} at step {counter.step}", flush=True)
        target = torch.linspace(-1, 1, 32)
        while counter.step < steps:
            x = torch.randn(16, 32)
            loss = (model(x).squeeze(-1) - x @ target).pow(2).mean()
            loss.backward()
            for p in model.parameters():  # data-parallel gradient average
                dist.all_reduce(p.grad)
                p.grad /= world
            opt.step()
            opt.zero_grad()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            counter.step += 1
            counter.losses.append(round(mean_loss.item() / world, 6))
            if counter.step % save_every == 0:
                coord.save_checkpoint(checkpoint_id=f"checkpoint-{counter.step}", validate=True)
            if stop_at is not None and counter.step == stop_at:
                if rank == 0:
                    print(f"[rank 0] simulated interruption at step {counter.step}", flush=True)
                break
        results.put((rank, counter.losses, [p.detach().clone() for p in model.parameters()]))
    finally:
        dist.destroy_process_group()


def _run(world: int, output_dir: str, steps: int, save_every: int, stop_at: int | None):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_train, args=(r, world, init_file, output_dir, steps, save_every, stop_at,
                                                  results)) for r in range(world)]
        for p in procs:
            p.start()
        out = dict((r, (losses, params)) for r, losses, params in (results.get(timeout=600) for _ in procs))
        for p in procs:
            p.join()
            if p.exitcode:
                raise SystemExit(f"demo rank failed with exit code {p.exitcode}")
    return out


def _report(path: str) -> None:
    manifest = read_manifest(path)
    print(f"\nlatest checkpoint: {redact_url(path)} (world size {manifest.world_size}, {manifest.timestamp:%H:%M:%S})")
    print(f"  {'component':<10} {'pattern':<11} {'copies':>6} {'bytes':>9}  written by ranks")
    for key, comp in manifest.components.items():
        print(f"  {key:<10} {comp.sharing_pattern:<11} {len(comp.copies):>6} {comp.size_bytes:>9}  {comp.ranks}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcp-forge demo", description=__doc__)
    parser.add_argument("--output-dir", default="./checkpoints", help="where checkpoints go (path or fsspec URL)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--interrupt-at", type=int, default=25)
    args = parser.parse_args(argv)
    if latest_checkpoint(args.output_dir) is not None:
        parser.error(f"{args.output_dir} already holds checkpoints; pass an empty --output-dir")
    print(f"== run 1: training {args.steps} steps on {args.world_size} gloo ranks, "
          f"saving every {args.save_every} to {args.output_dir}")
    _run(args.world_size, args.output_dir, args.steps, args.save_every, args.interrupt_at)
    _report(latest_checkpoint(args.output_dir))
    print("\n== run 2: fresh processes resume from the latest checkpoint")
    resumed = _run(args.world_size, args.output_dir, args.steps, args.save_every, None)
    print("\n== reference: the same job without interruption")
    with tempfile.TemporaryDirectory() as ref_dir:
        reference = _run(args.world_size, ref_dir, args.steps, 10**9, None)
    same_loss = all(resumed[r][0] == reference[r][0] for r in resumed)
    same_params = all(torch.equal(a, b) for r in resumed for a, b in zip(resumed[r][1], reference[r][1]))
    print(f"final loss (rank 0): resumed {resumed[0][0][-1]:.6f}  reference {reference[0][0][-1]:.6f}")
    print(f"loss curves identical: {same_loss}; final parameters bit-identical: {same_params}")
    return 0 if same_loss and same_params else 1
