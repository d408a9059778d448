"""Async save benchmark: how long the caller is blocked, how long until commit, how much memory.

Measured in one run, on one state (``--size-gib`` of float32 in ``--tensors`` tensors, one
REPLICATED "model" component, world size 1, local disk):

- a plain copy of the state into already-allocated memory (``Tensor.copy_``), the reference;
- dcp_forge ``async_save``: caller-blocked time of the first save (fresh staging memory) and in
  steady state (buffers reused), background upload-to-commit (the caller idles meanwhile, as during
  a sync save) and call-to-commit times;
- a sync ``save_checkpoint`` of the same state (the total-time reference), wall and CPU time (CPU
  time shows the work done, when other processes make wall times noisy);
- DCP's ``async_save`` with default settings (a new stager per call) and with a reused
  ``DefaultStager``, caller-blocked time;
- dcp_forge ``async_save`` with overlapped staging (``AsyncOptions(staging="overlapped")``): the time
  the call blocks, and how long its background copy takes (until ``wait_for_staging()`` returns);
- staging memory: the bytes dcp_forge staged, and the RSS growth from the first async save.

Usage: ``python -m benchmarks.async_save [--size-gib 1] [--tensors 16] [--rounds 5] [--dir .bench/async]``
Targets: blocked steady state <= 1.2x the copy; upload-to-commit <= 1.1x a sync save;
staging memory <= 1x the state.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from benchmarks.results import write_json
from dcp_forge import AsyncOptions, CheckpointCoordinator, StateComponent, delete_checkpoint
from dcp_forge.async_save import staging_options


class Model:
    """A stateful holding ``count`` float32 tensors of ``total_bytes`` together."""

    def __init__(self, total_bytes: int, count: int) -> None:
        numel = total_bytes // 4 // count
        gen = torch.Generator().manual_seed(0)
        self.tensors = {f"layer{i}.weight": torch.rand(numel, generator=gen) for i in range(count)}

    def state_dict(self):
        return self.tensors

    def load_state_dict(self, state):
        self.tensors = state

    def mutate(self) -> None:
        for t in self.tensors.values():
            t.add_(1.0)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PlainCopy:
    """The reference: copy the state into memory allocated (and faulted in) beforehand."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.targets = {k: torch.empty_like(t) for k, t in model.tensors.items()}
        self()

    def __call__(self) -> float:
        start = time.perf_counter()
        for k, t in self.model.tensors.items():
            self.targets[k].copy_(t)
        return time.perf_counter() - start


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=".bench/async")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = Model(int(args.size_gib * (1 << 30)), args.tensors)
    state_bytes = model.nbytes
    root = args.dir
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    copy = PlainCopy(model)

    # The staging memory the first dcp_forge async save allocates (kept for the saves that follow).
    coord = CheckpointCoordinator([StateComponent("model", model, "replicated")], output_dir=root)
    overlapped = CheckpointCoordinator([StateComponent("model", model, "replicated")], output_dir=root,
                                       async_options=AsyncOptions(staging="overlapped"))
    delete_checkpoint(overlapped.async_save(checkpoint_id="overlapped-warmup").result())
    rss_before = rss_bytes()
    handle = coord.async_save(checkpoint_id="warmup")
    delete_checkpoint(handle.result())
    memory = {"staged_bytes": handle.staged_bytes, "rss_growth_bytes": rss_bytes() - rss_before}

    # Steady state, every variant once per round so that they share the machine's conditions
    # (the ratios are taken within a round, then the median over rounds is reported).
    dcp_stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                              use_async_staging=False, use_non_blocking_copy=False))
    dcp.async_save({"model": model}, checkpoint_id=os.path.join(root, "dcp-reused-warmup"), async_stager=dcp_stager,
                   no_dist=True).result()
    rounds = []
    for i in range(args.rounds):
        r = {"copy_s": copy()}

        def forge_async(i=i, r=r):
            r["forge_blocked_s"], handle = timed(lambda: coord.async_save(checkpoint_id=f"async-{i}"))
            cpu = time.process_time()
            handle.result()  # the caller idles, so the upload is timed on the same footing as a sync save
            r["forge_upload_cpu_s"] = time.process_time() - cpu
            model.mutate()
            r["forge_upload_to_commit_s"] = handle.upload_seconds
            r["forge_call_to_commit_s"] = r["forge_blocked_s"] + handle.upload_seconds
            delete_checkpoint(handle.checkpoint_path)

        def forge_sync(i=i, r=r):
            cpu = time.process_time()
            r["sync_save_s"], path = timed(lambda: coord.save_checkpoint(checkpoint_id=f"sync-{i}"))
            r["sync_save_cpu_s"] = time.process_time() - cpu
            delete_checkpoint(path)

        def forge_overlapped(i=i, r=r):
            r["forge_overlapped_blocked_s"], handle = timed(lambda: overlapped.async_save(checkpoint_id=f"overlapped-{i}"))
            r["forge_overlapped_copy_s"], _ = timed(handle.wait_for_staging)
            r["forge_overlapped_copy_s"] += r["forge_overlapped_blocked_s"]  # from the call until copied
            delete_checkpoint(handle.result())

        forge_overlapped()
        for run in ((forge_async, forge_sync) if i % 2 == 0 else (forge_sync, forge_async)):
            run()  # alternate which goes first: the disk's state after the previous save favours neither
        with CheckpointCoordinator([StateComponent("model", model, "replicated")], output_dir=root) as fresh:
            r["forge_first_blocked_s"], handle = timed(lambda i=i: fresh.async_save(checkpoint_id=f"first-{i}"))
            delete_checkpoint(handle.result())  # a first save: its staging memory is new (freed by close)
        for name, stager in (("dcp_default", None), ("dcp_reused_stager", dcp_stager)):
            target = os.path.join(root, f"{name}-{i}")
            r[f"{name}_blocked_s"], fut = timed(lambda target=target, stager=stager: dcp.async_save(
                {"model": model}, checkpoint_id=target, async_stager=stager, no_dist=True))
            fut.result()
            shutil.rmtree(target)
        rounds.append(r)
    coord.close()
    overlapped.close()
    dcp_stager.close()
    shutil.rmtree(root, ignore_errors=True)
    report(args, state_bytes, memory, rounds)


def report(args, state_bytes: int, memory: dict, rounds: list[dict]) -> None:
    def med(key: str, per: str | None = None) -> float:
        return statistics.median(r[key] / (r[per] if per else 1.0) for r in rounds)

    print(f"state: {state_bytes / (1 << 30):.2f} GiB in {args.tensors} float32 tensors, world size 1, "
          f"local disk; median of {len(rounds)} rounds; {staging_options()}")
    print(f"{'caller blocked':<56} {'seconds':>8} {'x copy':>7}")
    rows = [("plain copy into preallocated memory (reference)", med("copy_s"), 1.0),
            ("dcp_forge async_save, first save (fresh staging memory)", med("forge_first_blocked_s"),
             med("forge_first_blocked_s", "copy_s")),
            ("dcp_forge async_save, steady state", med("forge_blocked_s"), med("forge_blocked_s", "copy_s")),
            ("DCP async_save, defaults", med("dcp_default_blocked_s"), med("dcp_default_blocked_s", "copy_s")),
            ("DCP async_save, reused DefaultStager", med("dcp_reused_stager_blocked_s"),
             med("dcp_reused_stager_blocked_s", "copy_s")),
            ("dcp_forge async_save, overlapped staging", med("forge_overlapped_blocked_s"),
             med("forge_overlapped_blocked_s", "copy_s")),
            ("  its background copy (call to copied, caller idle)", med("forge_overlapped_copy_s"),
             med("forge_overlapped_copy_s", "copy_s"))]
    for name, seconds, ratio in rows:
        print(f"{name:<56} {seconds:8.3f} {ratio:7.2f}")
    print(f"{'until committed':<56} {'seconds':>8} {'x sync':>7}")
    for name, key in (("sync save_checkpoint (reference)", "sync_save_s"),
                      ("async: upload to commit (background)", "forge_upload_to_commit_s"),
                      ("async: call to commit (staging + upload)", "forge_call_to_commit_s")):
        print(f"{name:<56} {med(key):8.3f} {med(key, 'sync_save_s'):7.2f}")
    print(f"{'CPU seconds (all threads): sync save':<56} {med('sync_save_cpu_s'):8.3f} {1.0:7.2f}")
    print(f"{'CPU seconds (all threads): async upload to commit':<56} {med('forge_upload_cpu_s'):8.3f} "
          f"{med('forge_upload_cpu_s', 'sync_save_cpu_s'):7.2f}")
    print(f"staging memory: {memory['staged_bytes'] / state_bytes:.3f}x the state (bytes staged); RSS grew "
          f"{memory['rss_growth_bytes'] / state_bytes:.3f}x the state at the first async save")
    write_json(args.json, {"state_bytes": state_bytes, "memory": memory, "rounds": rounds})


if __name__ == "__main__":
    main()
