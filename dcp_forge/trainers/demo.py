"""The demo: the real training job, interrupted and resumed.

The tiny causal LM trains with ``DDPTrainer`` on gloo ranks (rank 0 loads each batch and scatters
it), checkpointing every ``--save-every`` steps to ``--output-dir`` (a local path or any fsspec URL).
The job is ``python -m dcp_forge.trainers.run`` launched by torchrun (``torch.distributed.run``),
exactly as you would launch it yourself; the demo prints each command line.

1. run 1 stops after ``--interrupt-at`` steps without saving (everything after the last checkpoint
   is lost, as in a crash); it reports what its last checkpoint holds and which ranks wrote it;
2. run 2, in fresh processes, resumes from that checkpoint and trains to ``--steps``;
3. a reference run trains the same job without interruption, in a temporary directory;
4. the resumed loss curve and every rank's final parameters must equal the reference's bit for bit.

Each demo starts from scratch: when ``--output-dir`` already holds checkpoints (an earlier demo),
this one writes to a fresh sibling directory (``./checkpoints-2``, ``-3``, ...) and says so, so the
command can be run again and again.

Exit status: 0 when they match, 1 when they do not, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from ..storage import latest_checkpoint, redact_url


def _launch(world: int, output_dir: str, results: str, opts: argparse.Namespace, *extra: str,
            quiet: bool = False) -> None:
    """One torchrun launch of the job (fresh processes), its output indented under the command."""
    job = ["-m", "dcp_forge.trainers.run", "--trainer", "ddp", "--output-dir", output_dir,
           "--max-steps", str(opts.steps), "--save-steps", str(opts.save_every), "--log-every", str(opts.save_every),
           "--results-file", results, *extra]
    for option in opts.storage_option:
        job += ["--storage-option", option]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *job]
    shown = ["torchrun", "--standalone", f"--nproc-per-node={world}",
             *(a for a in job if a not in ("--results-file", results))]
    print("$ " + shlex.join(shown), flush=True)
    # One intra-op thread per rank: the ranks share the machine's cores (torchrun's own default).
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout + proc.stderr, file=sys.stderr)
        raise SystemExit(f"dcp-forge demo: the job failed with exit status {proc.returncode}")
    if not quiet:
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):  # the job's closing JSON line is for machines
                print("    " + line)


def _load(results: str, world: int) -> list[dict]:
    return [torch.load(results.format(rank=r), weights_only=False) for r in range(world)]


def fresh_output_dir(output_dir: str, storage_options: Mapping[str, Any]) -> str:
    """``output_dir`` when it holds no committed checkpoint, else the first ``<output_dir>-<n>``
    (n = 2, 3, ...) that holds none."""
    base = output_dir.rstrip("/") or output_dir
    candidate, n = output_dir, 1
    while latest_checkpoint(candidate, storage_options) is not None:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _storage_options(pairs: list[str]) -> dict:
    from .run import _storage_option

    return dict(_storage_option(p) for p in pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcp-forge demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="./checkpoints", help="where checkpoints go (path or fsspec URL)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--interrupt-at", type=int, default=35)
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for --output-dir (repeatable)")
    opts = parser.parse_args(argv)
    try:
        import torchdata  # noqa: F401  (the trainers' dataset state is torchdata's StatefulDataLoader)
    except ImportError:
        parser.error("the demo trains with dcp_forge.trainers, which need torchdata: "
                     "pip install 'dcp-forge[trainers]'")
    if not 0 < opts.save_every <= opts.interrupt_at < opts.steps:
        parser.error("need 0 < --save-every <= --interrupt-at < --steps")
    storage_options = _storage_options(opts.storage_option)
    output_dir = fresh_output_dir(opts.output_dir, storage_options)
    if output_dir != opts.output_dir:
        print(f"{redact_url(opts.output_dir)} already holds checkpoints (an earlier run's); this demo starts "
              f"from scratch in {redact_url(output_dir)}\n")
    opts.output_dir = output_dir
    world = opts.world_size
    resumed_at = opts.interrupt_at - opts.interrupt_at % opts.save_every
    with tempfile.TemporaryDirectory() as tmp:
        results = os.path.join(tmp, "{run}.rank{{rank}}.pt")
        print(f"== run 1: {world} gloo ranks train the tiny LM with DDPTrainer for {opts.steps} steps, saving "
              f"every {opts.save_every} to {redact_url(opts.output_dir)}; interrupted after step {opts.interrupt_at}")
        _launch(world, opts.output_dir, results.format(run="interrupted"), opts, "--interrupt-at", str(opts.interrupt_at))
        print(f"\n== run 2: fresh processes resume from the latest checkpoint (step {resumed_at}); "
              f"steps {resumed_at + 1}-{opts.interrupt_at} are trained again")
        _launch(world, opts.output_dir, results.format(run="resumed"), opts, "--resume")
        print("\n== reference: the same job without interruption (temporary output_dir)")
        _launch(world, os.path.join(tmp, "reference"), results.format(run="reference"), opts, quiet=True)
        resumed, reference = _load(results.format(run="resumed"), world), _load(results.format(run="reference"), world)
    after, expected = resumed[0]["step_losses"], reference[0]["step_losses"][resumed_at:]
    print("\n== loss after the resume vs the uninterrupted run (rank 0; every rank logs the global mean)")
    print(f"  {'step':>5}  {'resumed':>10}  {'reference':>10}")
    for i, (a, b) in enumerate(zip(after, expected, strict=False), start=resumed_at + 1):
        if i % opts.save_every == 0 or i in (resumed_at + 1, opts.steps):
            print(f"  {i:>5}  {a:>10.6f}  {b:>10.6f}  {'identical' if a == b else 'DIFFERENT'}")
    same_loss = all(resumed[r]["step_losses"] == reference[r]["step_losses"][resumed_at:] for r in range(world))
    same_params = all(resumed[r]["params"].keys() == reference[r]["params"].keys()
                      and all(torch.equal(resumed[r]["params"][k], v) for k, v in reference[r]["params"].items())
                      for r in range(world))
    print(f"loss curves identical for all {len(after)} steps after the resume: {same_loss}; "
          f"final parameters bit-identical on every rank: {same_params}")
    return 0 if same_loss and same_params else 1
