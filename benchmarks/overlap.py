"""Training-time overhead of async checkpointing, and what a background upload costs the training thread.

Trains a model and saves every ``--save-every`` steps, once per variant, in the same run:

- ``none``: no checkpointing (the reference);
- ``dcp``: DCP's ``async_save`` with a reused ``DefaultStager`` (blocking staging, DCP's writer);
- ``blocking-thread``: dcp_forge ``async_save`` as before overlapped staging (staging at the call,
  upload on a thread);
- ``overlapped-thread``: staging overlapped with the next forward/backward (``AsyncOptions``), the
  optimizer step waits for what is left (``install_step_hook``); upload on a thread;
- ``blocking-process``, ``overlapped-process``: the same with uploads in an upload process;
- ``raw-write``: the floor for any checkpointer that writes through the page cache: another process
  (a plain interpreter without torch) writes as many bytes as the state holds, from a buffer of its
  own, to a file in 32 MiB writes and ``fdatasync``s it. What it costs the training (page cache
  copies, writeback, memory bandwidth) is what no upload, in a thread or a process, can avoid here.

Models: ``tiny-lm`` (``dcp_forge.trainers.tiny_lm``; many small ops, so its steps are sensitive to a
background thread holding the GIL) and ``mlp`` (Linear layers sized so that parameters plus AdamW
state are ``--mlp-gib``, default 1.1 GiB).

The unit measured is one *save cycle* in steady state: the save call, ``--save-every`` training
steps while the upload runs, then the wait for the upload to finish (what the next save would wait
for, since one save is in flight at a time). For ``none`` a cycle is the steps alone. A round runs
one cycle of every variant back to back, in an order that rotates from round to round, so that each
variant's cycle is compared with a reference cycle measured within a minute of it: on a shared
machine whose speed changes by tens of percent from one minute to the next, only such paired
ratios mean anything. Every variant trains the same model on (step times do not depend on the
values); each variant's first save (which allocates its staging memory) happens before the rounds.
Checkpoints go to local disk and are deleted once committed.

Reported per variant, medians over rounds: the cycle's time over the reference cycle's (the training
time overhead; target <= 2%); where the training thread was blocked: in the save call, at mutation
points (``stall``: the optimizer step waiting for an overlapped copy) and at the end of the cycle
waiting for the upload (``wait``); the CPU seconds the save used (every other thread of the training
process, and the upload process) over the reference cycle's training CPU seconds, which is what the
save costs where it must share the training's cores; and the mean time of the steps that ran while an
upload was in flight over the reference's mean step time (the training thread's slowdown from a
background upload: thread vs process uploads).

Usage: ``python -m benchmarks.overlap [--models tiny-lm mlp] [--rounds 8] [--save-every 10]
[--threads N] [--dir .bench/overlap] [--json out.json]``
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager

from benchmarks.results import write_json
from dcp_forge import AsyncOptions, CheckpointCoordinator, StateComponent, delete_checkpoint
from dcp_forge.async_staging import staging_options
from dcp_forge.trainers.tiny_lm import TinyLM, TinyLMConfig

VARIANTS = ("none", "dcp", "blocking-thread", "overlapped-thread", "blocking-process", "overlapped-process",
            "raw-write")

# The raw-write variant's writer: one request per line on stdin (a path), one line back when the file
# is on disk. Its buffer is written to once first, so that no page of it is allocated during a cycle.
_RAW_WRITER = """
import os, sys
size = int(sys.argv[1]); chunk = 32 << 20
buffer = bytearray(b"\\x01") * size
view = memoryview(buffer)
for path in sys.stdin:
    fd = os.open(path.strip(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for at in range(0, size, chunk):
        os.write(fd, view[at:at + chunk])
    os.fdatasync(fd)
    os.close(fd)
    print("done", flush=True)
"""


class RawWriter:
    """The raw-write variant's other process (see the module docstring)."""

    def __init__(self, nbytes: int) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _RAW_WRITER, str(nbytes)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)

    def write(self, path: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(path + "\n")

    def in_flight(self) -> bool:
        return not select.select([self.process.stdout], [], [], 0)[0]

    def wait(self) -> None:
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "done":
            raise RuntimeError(f"the raw writer failed (exit status {self.process.poll()})")

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


class Workload:
    """A model, its AdamW optimizer and a fixed batch; ``step()`` is one training step."""

    def __init__(self, model: nn.Module, batch: Callable[[], torch.Tensor], loss: Callable[[Any], torch.Tensor]):
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self._batch = batch()
        self._loss = loss
        self.step()  # AdamW's state exists from here on: every save holds all of it

    def step(self) -> None:
        self._loss(self.model(self._batch)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        tensors = list(self.model.state_dict().values())
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return sum(t.nbytes for t in tensors)


def tiny_lm() -> Workload:
    config = TinyLMConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, max_seq_len=64)
    model = TinyLM(config, seed=0)
    tokens = torch.randint(0, config.vocab_size, (8, config.max_seq_len), generator=torch.Generator().manual_seed(0))
    return Workload(model, lambda: tokens, lambda out: out.float().square().mean())


def mlp(gib: float) -> Workload:
    width = 4096
    per_layer = (width * width + width) * 4 * 3  # weights and bias, with AdamW's two moments
    layers = max(1, -(-int(gib * (1 << 30)) // per_layer))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    data = torch.randn(16, width)
    return Workload(model, lambda: data, lambda out: out.square().mean())


class Saver:
    """One checkpointing variant: ``save(step)`` at the save steps, ``in_flight()``, ``finish()``."""

    def __init__(self, variant: str, work: Workload, root: str) -> None:
        self.variant, self.work, self.root = variant, work, os.path.join(root, variant)
        os.makedirs(self.root, exist_ok=True)
        self._pending: Any = None
        self._hook: Any = None
        self._coord: CheckpointCoordinator | None = None
        self._stager: DefaultStager | None = None
        self._raw: RawWriter | None = None
        if variant == "raw-write":
            self._raw = RawWriter(work.state_bytes())
        elif variant == "dcp":
            self._stager = DefaultStager(staging_options())
        elif variant != "none":
            staging, upload = variant.split("-")
            self._coord = CheckpointCoordinator(
                [StateComponent("model", work.model, "replicated"), StateComponent("optimizer", work.optimizer, "replicated")],
                output_dir=self.root, async_options=AsyncOptions(staging=staging, upload=upload))
        self.save(-1)  # the first save allocates the staging memory: not part of the steady state
        self.finish()

    def attach(self) -> None:
        if self._coord is not None:
            self._hook = self._coord.install_step_hook(self.work.optimizer)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def in_flight(self) -> bool:
        if self._pending is None:
            return False
        return self._raw.in_flight() if self._raw is not None else not self._pending[0].done()

    def child_pids(self) -> list[int]:
        if self._raw is not None:
            return [self._raw.process.pid]
        upload = self._coord._async_saves.upload_process if self._coord is not None else None
        return [upload.pid] if upload is not None else []

    def _settle(self) -> float:
        """Wait for the save in flight and delete it; returns how long mutation points waited for it."""
        if self._pending is None:
            return 0.0
        handle, path = self._pending
        self._pending = None
        if self._raw is not None:
            self._raw.wait()
            os.remove(path)
            return 0.0
        if self._coord is not None:
            delete_checkpoint(handle.result())
            return handle.stall_seconds
        handle.result()
        shutil.rmtree(path)
        return 0.0

    def save(self, step: int) -> None:
        if self.variant == "none":
            return
        self._settle()  # one save in flight, as dcp_forge does: the previous one must be done
        path = os.path.join(self.root, f"checkpoint-{step}")
        if self._raw is not None:
            self._raw.write(path)
            handle = None
        elif self._coord is not None:
            handle = self._coord.async_save(checkpoint_path=path)
        else:
            handle = dcp.async_save({"model": self.work.model, "optimizer": self.work.optimizer}, checkpoint_id=path,
                                    async_stager=self._stager, no_dist=True)
        self._pending = (handle, path)

    def finish(self) -> float:
        return self._settle()

    def close(self) -> None:
        self.finish()
        self.detach()
        if self._coord is not None:
            self._coord.close()
        if self._stager is not None:
            self._stager.close()
        if self._raw is not None:
            self._raw.close()


def _children_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the given child processes used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def save_cycle(work: Workload, saver: Saver, save_every: int) -> dict:
    """One save and the steps until the next one (see the module docstring)."""
    saver.attach()
    children = saver.child_pids()
    cpu, train_cpu, child_cpu = time.process_time(), 0.0, _children_cpu_s(children)
    started = time.perf_counter()
    saver.save(0)
    call_s = time.perf_counter() - started
    step_times: list[tuple[float, bool]] = []
    for _ in range(save_every):
        uploading = saver.in_flight()
        t, tc = time.perf_counter(), time.thread_time()
        work.step()
        train_cpu += time.thread_time() - tc
        step_times.append((time.perf_counter() - t, uploading))
    waited = time.perf_counter()
    stall_s = saver.finish()
    cycle_s = time.perf_counter() - started
    saver.detach()
    during = [s for s, uploading in step_times if uploading]
    checkpoint_cpu = time.process_time() - cpu - train_cpu + _children_cpu_s(children) - child_cpu
    return {"cycle_s": cycle_s, "call_s": call_s, "stall_s": stall_s, "wait_s": time.perf_counter() - waited,
            "train_cpu_s": train_cpu, "checkpoint_cpu_s": checkpoint_cpu,
            "step_s": statistics.mean(s for s, _ in step_times),
            "step_during_upload_s": statistics.mean(during) if during else None, "steps_during_upload": len(during)}


def bench_model(name: str, work: Workload, args: argparse.Namespace) -> dict:
    root = os.path.join(args.dir, name)
    shutil.rmtree(root, ignore_errors=True)
    savers = {variant: Saver(variant, work, root) for variant in args.variants}
    rounds = []
    try:
        for r in range(args.rounds):
            shift = r % len(args.variants)
            order = list(args.variants[shift:]) + list(args.variants[:shift])
            rounds.append({variant: save_cycle(work, savers[variant], args.save_every) for variant in order})
            print(f"  {name} round {r + 1}: " + ", ".join(f"{v} {rounds[-1][v]['cycle_s']:.2f}s" for v in args.variants),
                  flush=True)
    finally:
        for saver in savers.values():
            saver.close()
        shutil.rmtree(root, ignore_errors=True)
    return {"state_bytes": work.state_bytes(), "rounds": rounds}


def report(results: dict, args: argparse.Namespace) -> None:
    def med(rounds: list[dict], variant: str, fn: Callable[[dict, dict], float | None]) -> float | None:
        values = [v for r in rounds if (v := fn(r[variant], r["none"])) is not None]
        return statistics.median(values) if values else None

    for name, result in results.items():
        rounds = result["rounds"]
        print(f"\n{name}: state {result['state_bytes'] / (1 << 30):.3f} GiB, a save every {args.save_every} steps, "
              f"median of {len(rounds)} rounds; {torch.get_num_threads()} torch threads")
        print(f"{'variant':<19} {'cycle s':>7} {'overhead':>8} {'call s':>7} {'stall s':>7} {'wait s':>7} "
              f"{'ckpt CPU/train CPU':>18} {'step during upload':>18}")
        for variant in args.variants:
            cells = [med(rounds, variant, lambda v, n: v["cycle_s"]),
                     med(rounds, variant, lambda v, n: 100 * (v["cycle_s"] / n["cycle_s"] - 1)),
                     med(rounds, variant, lambda v, n: v["call_s"]), med(rounds, variant, lambda v, n: v["stall_s"]),
                     med(rounds, variant, lambda v, n: v["wait_s"]),
                     med(rounds, variant, lambda v, n: 100 * v["checkpoint_cpu_s"] / n["train_cpu_s"]),
                     med(rounds, variant, lambda v, n: None if v["step_during_upload_s"] is None
                         else v["step_during_upload_s"] / n["step_s"])]
            shown = [f"{cells[0]:7.2f}", f"{cells[1]:7.2f}%", *(f"{c:7.3f}" for c in cells[2:5]),
                     f"{cells[5]:17.1f}%", "-" if cells[6] is None else f"{cells[6]:.3f}x"]
            print(f"{variant:<19} {shown[0]:>7} {shown[1]:>8} {shown[2]:>7} {shown[3]:>7} {shown[4]:>7} "
                  f"{shown[5]:>18} {shown[6]:>18}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("tiny-lm", "mlp"), default=["tiny-lm", "mlp"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--mlp-gib", type=float, default=1.1, help="MLP parameters plus AdamW state")
    parser.add_argument("--dir", default=".bench/overlap")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if "none" not in args.variants:
        args.variants.insert(0, "none")
    warnings.simplefilter("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = {}
    for name in args.models:
        work = tiny_lm() if name == "tiny-lm" else mlp(args.mlp_gib)
        results[name] = bench_model(name, work, args)
        del work
    report(results, args)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
