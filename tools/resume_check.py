"""Bit-exact resume, full length, for every trainer, each run a fresh torchrun launch.

For each trainer kind: train ``--steps`` steps uninterrupted; separately train with an interruption
after step ``--interrupt-at`` (nothing saved after the last checkpoint at a multiple of
``--save-steps``); then resume that run in new processes to ``--steps``. Every rank's losses after
the resume and its final model tensors must equal the uninterrupted run's exactly (``==`` and
``torch.equal``). The jobs are ``python -m dcp_forge.trainers.run`` under
``torch.distributed.run --standalone`` (env:// rendezvous), exactly as the README launches them.

    python -m tools.resume_check                    # every kind, 4 ranks, 80 steps, resume from 20
    python -m tools.resume_check --kinds ddp pipeline --world 2 --async-save

Exit status 0 when every kind matches. (tests/trainers/test_trainers_dist.py is the short CI version.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from dcp_forge.trainers.run import TRAINER_KINDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(kind: str, world: int, output_dir: str, results: str, opts: argparse.Namespace, *extra: str) -> None:
    job = ["-m", "dcp_forge.trainers.run", "--trainer", kind, "--output-dir", output_dir,
           "--max-steps", str(opts.steps), "--save-steps", str(opts.save_steps), "--n-layers", str(opts.n_layers),
           "--results-file", results, "--log-every", str(10**9), *extra]
    if opts.async_save:
        job.append("--async-save")
    launcher = [] if world == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *launcher, *job], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind}: launch failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def check(kind: str, world: int, opts: argparse.Namespace, tmp: str) -> tuple[bool, str]:
    def results(run: str) -> list[dict]:
        return [torch.load(os.path.join(tmp, kind, f"{run}.rank{r}.pt"), weights_only=False) for r in range(world)]

    base = os.path.join(tmp, kind)
    os.makedirs(base)
    started = time.perf_counter()
    launch(kind, world, os.path.join(base, "reference"), os.path.join(base, "reference.rank{rank}.pt"), opts)
    launch(kind, world, os.path.join(base, "run"), os.path.join(base, "interrupted.rank{rank}.pt"), opts,
           "--interrupt-at", str(opts.interrupt_at))
    launch(kind, world, os.path.join(base, "run"), os.path.join(base, "resumed.rank{rank}.pt"), opts, "--resume")
    reference, resumed = results("reference"), results("resumed")
    resume_step = opts.interrupt_at - opts.interrupt_at % opts.save_steps
    losses_equal = all(resumed[r]["step_losses"] == reference[r]["step_losses"][resume_step:] for r in range(world))
    params_equal = all(resumed[r]["params"].keys() == reference[r]["params"].keys()
                       and all(torch.equal(resumed[r]["params"][k], v) for k, v in reference[r]["params"].items())
                       for r in range(world))
    after = len(resumed[0]["step_losses"])
    line = (f"{kind:<16} {world:>5} {os.path.basename(resumed[0]['resumed_from']):>15} {after:>6} "
            f"{str(losses_equal):>7} {str(params_equal):>7} {time.perf_counter() - started:>7.1f}s")
    return losses_equal and params_equal and after == opts.steps - resume_step, line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=sorted(TRAINER_KINDS), choices=sorted(TRAINER_KINDS))
    p.add_argument("--world", type=int, default=4, help="ranks for every kind but 'single'")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--interrupt-at", type=int, default=25)
    p.add_argument("--n-layers", type=int, default=4, help="at least --world, for the pipeline kind")
    p.add_argument("--async-save", action="store_true")
    opts = p.parse_args()
    print(f"{'trainer':<16} {'ranks':>5} {'resumed from':>15} {'steps':>6} {'losses':>7} {'params':>7} {'time':>8}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for kind in opts.kinds:
            world = 1 if kind == "single" else opts.world
            good, line = check(kind, world, opts, tmp)
            ok &= good
            print(line, flush=True)
    print("every resumed run is bit-identical to its uninterrupted run" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
