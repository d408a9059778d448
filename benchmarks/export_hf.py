#!/usr/bin/env python
"""Peak memory of ``export_hf`` (Hugging Face safetensors export) against the model it exports.

    .venv/bin/python -m benchmarks.export_hf [--budget-mib 256] [--factor 4] [--tensors 64]
                                             [--shard-mib 512] [--dir DIR] [--json out.json]

A model of ``factor x budget`` MiB (``tensors`` float32 tensors of rows x 1024) is saved with dcp_forge
(REPLICATED, one process). Each contender then runs in a fresh process that reports its peak resident
memory (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the export starts) above
the memory it held at that moment. Each contender first exports a tiny checkpoint in the same
process, so that what it imports on first use is in the baseline and the figure is what the
model's export itself costs:

- ``export_hf``: ``export_hf(buffer_size=budget, max_shard_size=shard)``, shards larger than the budget;
- ``export_hf bf16``: the same with ``dtype="bf16"`` (each tensor cast after it is read);
- ``whole state``: what exporting without streaming costs: ``load_checkpoint_state`` (the whole
  checkpoint in memory, as ``dcp-forge convert`` reads it), then ``safetensors.torch.save_file`` of
  one shard at a time.

Every export is checked against the saved values, tensor by tensor. The page cache is not resident
memory of the process and is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.results import write_json
from benchmarks.save_load import SaveLoadConfig, _TensorDict

CONTENDERS = ("export_hf", "export_hf bf16", "whole state")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset the process's peak resident memory (Linux: VmHWM) to what it holds now; returns that."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def _state(config: SaveLoadConfig) -> dict[str, torch.Tensor]:
    rows = config.nbytes // config.tensors // 4096
    gen = torch.Generator().manual_seed(0)
    return {f"layers.{i:03d}.weight": torch.randn(rows, 1024, generator=gen) for i in range(config.tensors)}


def _export(contender: str, checkpoint: str, out: str, budget: int, shard: int) -> None:
    from dcp_forge.ops.export_hf import export_hf

    if contender != "whole state":
        export_hf(checkpoint, out, buffer_size=budget, max_shard_size=shard,
                  dtype="bf16" if contender.endswith("bf16") else None)
        return
    from safetensors.torch import save_file

    from dcp_forge.format.safetensors import TensorSpec, plan_shards, shard_file_names
    from dcp_forge.ops.convert import load_checkpoint_state

    state = load_checkpoint_state(checkpoint)["model"]
    shards = plan_shards([TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in state.items()], shard)
    os.makedirs(out, exist_ok=True)
    for name, specs in zip(shard_file_names(len(shards)), shards, strict=True):
        save_file({s.name: state[s.name] for s in specs}, os.path.join(out, name), metadata={"format": "pt"})


def _child(contender: str, warmup: str, checkpoint: str, out: str, budget: int, shard: int) -> dict:
    """Run one contender in this (fresh) process: first on the tiny ``warmup`` checkpoint, so that
    the code it runs is imported, then on the model; its peak memory above what it held before."""
    _export(contender, warmup, out + "-warmup", budget, shard)
    before = _reset_peak()
    start = time.perf_counter()
    _export(contender, checkpoint, out, budget, shard)
    seconds = time.perf_counter() - start
    return {"peak_bytes": _status_bytes("VmHWM") - before, "baseline_bytes": before, "seconds": seconds}


def _check(out: str, state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    from safetensors import safe_open

    seen = set()
    for name in sorted(os.listdir(out)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(out, name), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    want = state[key] if dtype is None else state[key].to(dtype)
                    if not torch.equal(f.get_tensor(key), want):
                        raise AssertionError(f"{out}: {key} differs from the saved value")
                    seen.add(key)
    if seen != set(state):
        raise AssertionError(f"{out}: holds {len(seen)} tensors, expected {len(state)}")


def run(budget_mib: int, factor: int, tensors: int, shard_mib: int, directory: str | None) -> dict:
    from dcp_forge import CheckpointCoordinator, StateComponent

    config = SaveLoadConfig(size_mib=budget_mib * factor, tensors=tensors, repetitions=1)
    root = tempfile.mkdtemp(prefix="forge-export-hf-", dir=directory)
    try:
        state = _state(config)
        coord = CheckpointCoordinator([StateComponent("model", _TensorDict(state), "replicated")], output_dir=root)
        checkpoint = coord.save_checkpoint(checkpoint_id="checkpoint-1")
        tiny = CheckpointCoordinator([StateComponent("model", _TensorDict({"w": torch.ones(4, 4)}), "replicated")],
                                     output_dir=os.path.join(root, "warmup"))
        warmup = tiny.save_checkpoint(checkpoint_id="checkpoint-1")
        results = {}
        for contender in CONTENDERS:
            out = os.path.join(root, "hf-" + contender.replace(" ", "-"))
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.export_hf", "--child", contender, warmup, checkpoint, out,
                 str(budget_mib * 2**20), str(shard_mib * 2**20)],
                capture_output=True, text=True, check=False)
            if proc.returncode:
                raise RuntimeError(f"{contender} failed:\n{proc.stderr}")
            results[contender] = json.loads(proc.stdout.strip().splitlines()[-1])
            _check(out, state, torch.bfloat16 if contender.endswith("bf16") else None)
            shutil.rmtree(out)
            shutil.rmtree(out + "-warmup")
        return {"model_bytes": config.nbytes, "budget_bytes": budget_mib * 2**20, "tensors": tensors,
                "tensor_bytes": config.nbytes // tensors, "shard_bytes": shard_mib * 2**20, "results": results}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(result: dict) -> str:
    mib = 2**20
    lines = [f"model {result['model_bytes'] / mib:.0f} MiB in {result['tensors']} tensors of "
             f"{result['tensor_bytes'] / mib:.0f} MiB; budget (buffer_size) {result['budget_bytes'] / mib:.0f} MiB; "
             f"shards of {result['shard_bytes'] / mib:.0f} MiB",
             f"{'contender':<16}{'peak RSS above baseline':>26}{'/ model':>9}{'/ budget':>10}{'time':>9}"]
    for name, r in result["results"].items():
        lines.append(f"{name:<16}{r['peak_bytes'] / mib:>22.0f} MiB{r['peak_bytes'] / result['model_bytes']:>9.2f}"
                     f"{r['peak_bytes'] / result['budget_bytes']:>10.2f}{r['seconds']:>8.1f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        contender, warmup, checkpoint, out, budget, shard = argv[1:]
        print(json.dumps(_child(contender, warmup, checkpoint, out, int(budget), int(shard))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--factor", type=int, default=4, help="model size in budgets (default 4)")
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--shard-mib", type=int, default=512)
    parser.add_argument("--dir", help="where to save and export (default: the temp dir)")
    parser.add_argument("--json", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = run(args.budget_mib, args.factor, args.tensors, args.shard_mib, args.dir)
    print(report(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
