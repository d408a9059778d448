"""Crash consistency: SIGKILL one rank or all ranks at random points of saves, then check the survivors' view.

Each trial is one job of ``--world`` real gloo ranks that resumes the way a restarted training job
does (through the trainers' ``CheckpointManager``: discard partial checkpoints, load the latest one,
which the harness compares bit for bit with the state that was saved), saves the next checkpoint,
and keeps the newest two (the manager's ``save_total_limit`` retention). While
it saves, one rank or all ranks are killed with SIGKILL, in one of four ways:

- ``event-one`` / ``event-all``: at a random storage operation (a file write, fsync, directory sync,
  marker creation, deletion; a write may be torn: half its bytes land first) of one / every rank;
- ``timer-one`` / ``timer-all``: at a random moment of the save, from outside.

On s3:// the same operations of the S3 backend are the kill points: data uploads (Arrow or s3fs),
the record uploads, the conditional PUTs of the claim and commit markers, the marker's delete and
the batched delete of the rest.

Ranks that outlive the victim are killed after a grace period, as a job scheduler would. After each
trial the harness checks, from storage:

- ``latest_checkpoint`` is the newest checkpoint whose commit marker exists, i.e. the previous
  committed checkpoint unless the kill came after the commit;
- every listed checkpoint verifies clean (``verify_checkpoint``), and the next trial loads the latest
  bit-exact on every rank;
- nothing partial is visible: an uncommitted checkpoint is not listed, loads refuse it, and a
  half-deleted one has lost its marker first.

    .venv/bin/python -m tools.crash_harness --trials 200          # prints counts; exit 1 on any failure
    .venv/bin/python -m tools.crash_harness --trials 200 --s3     # the same on s3:// (starts and stops a SeaweedFS)
    .venv/bin/python -m tools.crash_harness --output-dir s3://bucket/run --storage-options '{"endpoint_url": ...}'

The CI test (tests/storage/test_crash_consistency.py) runs the same harness with fewer trials.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_any
from typing import Any

from tests.support.statefuls import Box

MODES = ("event-one", "event-all", "timer-one", "timer-all")
_GRACE_S = 0.5  # survivors of a killed rank get this long to fail on their own before they are killed
_JOB_TIMEOUT_S = 120.0
_CALIBRATION = 3  # jobs without kills first: the third one is the first to delete an old checkpoint


# --- the job (runs in each rank) ----------------------------------------------------------------


def make_state(step: int, rank: int, mib: float) -> dict[str, dict]:
    """What each component holds at ``step`` on ``rank`` (deterministic, so a load can be checked)."""
    import torch

    shared = torch.Generator().manual_seed(step)
    own = torch.Generator().manual_seed(step * 1000 + rank)
    per_tensor = max(1, int(mib * 1024 * 1024) // 4 // 4)
    return {
        "model": {f"w{i}": torch.randn(per_tensor, generator=shared) for i in range(4)},
        "rng": {"noise": torch.randn(257, generator=own), "step": step, "tag": f"rank{rank}-step{step}"},
        "trainer": {"step": step, "loss": 1.0 / (step + 1)},
    }


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    return type(a) is type(b) and a == b


def event_kind(label: str) -> str:
    """``'write __1_0.distcp'`` -> ``'write data file'``: an event without its rank or file number. With
    tiers, ``remote:`` marks the remote tier (``'close remote:__1_0.distcp'`` -> ``'close remote data
    file'``) and ``peer:`` a peer copy another rank's file is being written into."""
    op, _, name = label.partition(" ")
    torn = name.endswith(" (torn)")
    name = name.removesuffix(" (torn)")
    where = ""
    for prefix in ("remote:", "peer:"):
        if name.startswith(prefix):
            where, name = prefix[:-1] + " ", name[len(prefix):]
    if name.endswith(".distcp"):
        name = "data file"
    elif name.startswith("checkpoint-"):
        name = "checkpoint dir"
    return f"{op} {where}{name}" + (" (torn)" if torn else "")


class _KillingOutput:
    """An OutputStream that counts its writes and closes as events of ``_Killer``."""

    def __init__(self, inner: Any, killer: _Killer, name: str) -> None:
        self._inner, self._killer, self._name = inner, killer, name

    def write(self, data: Any) -> int:
        return self._killer.event(f"write {self._name}", lambda: self._inner.write(data),
                                  torn=lambda: self._inner.write(memoryview(data).cast("B")[:len(memoryview(data).cast("B")) // 2]))

    def tell(self) -> int:
        return self._inner.tell()

    def flush(self) -> None:
        self._inner.flush()

    def close(self) -> None:
        self._killer.event(f"close {self._name}", self._inner.close)

    def abort(self) -> None:
        self._inner.abort()


class _Killer:
    """Counts the storage operations of this process by kind and SIGKILLs it at the ``target``
    (kind, occurrence): by kind, because writer threads interleave differently from run to run."""

    MUTATING = ("create_exclusive", "open_output", "write_bytes", "makedirs", "remove", "remove_tree", "sync_dir")

    def __init__(self, target: tuple[str, int] | None, torn: bool, report: Callable[..., None],
                 where: Callable[[str], str] | None = None) -> None:
        self.target, self.torn, self.report = target, torn, report
        self.where = where or (lambda path: "")  # a path's tier prefix for its label (see event_kind)
        self._lock = threading.Lock()
        self._seen: collections.Counter[str] = collections.Counter()
        self.kinds: list[str] = []  # the kind of every event so far, in order (see event_kind)

    def install(self) -> None:
        from dcp_forge.storage.backends import FsspecBackend, LocalBackend
        from dcp_forge.storage.s3 import S3Backend

        for cls in (LocalBackend, FsspecBackend, S3Backend):
            for name in self.MUTATING:
                setattr(cls, name, self._hooked(name, getattr(cls, name)))

    def _hooked(self, name: str, original: Callable) -> Callable:
        killer = self

        def hooked(backend: Any, path: str, *rest: Any) -> Any:
            named = f"{killer.where(str(path))}{os.path.basename(str(path).rstrip('/'))}"
            result = killer.event(f"{name} {named}", lambda: original(backend, path, *rest))
            if name == "open_output":
                return _KillingOutput(result, killer, named)
            return result

        return hooked

    def event(self, label: str, run: Callable[[], Any], torn: Callable[[], Any] | None = None) -> Any:
        kind = event_kind(label)
        with self._lock:
            occurrence = self._seen[kind]
            self._seen[kind] += 1
            self.kinds.append(kind)
        if (kind, occurrence) == self.target:
            if self.torn and torn is not None:
                torn()
                label += " (torn)"
            self.report("killing", label)
            os.kill(os.getpid(), signal.SIGKILL)
        return run()


def _tier_of_path(setup: _Setup, rank: int) -> Callable[[str], str] | None:
    """With tiers: ``remote:`` for the remote tier's paths, ``peer:`` for another rank's data file written
    into this node's local tier (a peer copy), nothing for this rank's own local-tier operations."""
    if setup.local_root is None:
        return None
    local_root = os.path.abspath(setup.local_root)

    def where(path: str) -> str:
        if not os.path.abspath(path).startswith(local_root + os.sep):
            return "remote:"
        match = re.match(r"__(\d+)_\d+\.distcp$", os.path.basename(path))
        return "peer:" if match and int(match.group(1)) != rank else ""

    return where


def _train_in_place(boxes: dict[str, Box]) -> None:
    """What training does while an async save uploads: change every tensor in place."""
    for box in boxes.values():
        for value in box.state.values():
            if hasattr(value, "add_"):
                value.add_(1)


@dataclass(frozen=True)
class _Setup:
    """What every job of a run shares."""

    out_dir: str  # a local directory or any URL dcp_forge takes
    storage_options: dict[str, Any]
    mib: float
    use_async: bool
    local_root: str | None = None  # tiers: node n's local tier is <local_root>/node<n>, each rank a node
    peer_copies: int = 1

    def local_dir(self, node: int) -> str:
        return os.path.join(self.local_root or "", f"node{node}")


def _rank_job(rank: int, world: int, init_file: str, setup: _Setup, step: int, expect_step: int | None,
              target: tuple[str, int] | None, torn: bool, conn: Any, environ: dict[str, str]) -> None:
    import torch
    import torch.distributed as dist

    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(1)

    def send(*message: Any) -> None:
        conn.send(message)

    if setup.local_root is not None:  # every rank is a node of its own, as torchrun would say
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(rank)})
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        from dcp_forge import LocalTier, StateComponent
        from dcp_forge.manager.manager import CheckpointManager, CheckpointPolicy

        boxes = {key: Box({}) for key in ("model", "rng", "trainer")}
        # Resume, save and retention (keep two) the way a trainer does them: through CheckpointManager.
        tier = (LocalTier(setup.local_dir(rank), keep=2, peer_copies=setup.peer_copies)
                if setup.local_root is not None else None)
        args = CheckpointPolicy(output_dir=setup.out_dir, storage_options=setup.storage_options, save_steps=1,
                                save_total_limit=2, async_save=setup.use_async, local_tier=tier)
        manager = CheckpointManager(args, [
            StateComponent("model", boxes["model"], "replicated"), StateComponent("rng", boxes["rng"], "per_rank"),
            StateComponent("trainer", boxes["trainer"], "global")])
        manager.prepare_output_dir(resuming=True)  # discards what an interrupted save left
        if expect_step is not None:
            expected = make_state(expect_step, rank, setup.mib)
            for key, box in boxes.items():
                box.state = {k: (v.clone().zero_() if isinstance(v, torch.Tensor) else None)
                             for k, v in expected[key].items()}
            loaded = manager.resume(True)
            send("loaded", os.path.basename(loaded or "-"),
                 all(_same(boxes[key].state, expected[key]) for key in boxes))
        for key, value in make_state(step, rank, setup.mib).items():
            boxes[key].state = value
        killer = _Killer(target, torn, send, where=_tier_of_path(setup, rank))
        killer.install()
        send("saving")
        started = time.perf_counter()
        manager.save(step=step, epoch=0)  # async: returns once staged
        if setup.use_async:
            for _ in range(20):  # the saved values are those of the call, whatever training does next
                _train_in_place(boxes)
                time.sleep(0.002)
        manager.settle()  # commit (async) and retention
        send("saved", time.perf_counter() - started)
        manager.close()
        dist.barrier()
        send("events", killer.kinds)
    except BaseException:
        send("error", traceback.format_exc(limit=3))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- the harness (runs in the parent) -----------------------------------------------------------
@dataclass
class _Job:
    killed: list[int] = field(default_factory=list)  # ranks that died by SIGKILL (victims and survivors)
    messages: dict[int, list[tuple]] = field(default_factory=dict)
    kill_points: list[str] = field(default_factory=list)
    timed_out: bool = False

    def first(self, rank: int, kind: str) -> tuple | None:
        return next((m for m in self.messages.get(rank, []) if m[0] == kind), None)


def _run_job(ctx: Any, world: int, setup: _Setup, step: int, expect_step: int | None,
             targets: dict[int, tuple[str, int]], torn: bool, timer: tuple[list[int], float] | None) -> _Job:
    job = _Job(messages={r: [] for r in range(world)})
    with tempfile.TemporaryDirectory() as tmp:
        pipes = [ctx.Pipe(duplex=False) for _ in range(world)]
        procs = [ctx.Process(target=_rank_job, daemon=True,
                             args=(r, world, os.path.join(tmp, "rendezvous"), setup, step, expect_step,
                                   targets.get(r), torn, pipes[r][1], dict(os.environ)))
                 for r in range(world)]
        for p in procs:
            p.start()
        for _, sender in pipes:
            sender.close()
        readers = {pipes[r][0]: r for r in range(world)}
        deadline = time.monotonic() + _JOB_TIMEOUT_S
        kill_at: float | None = None
        grace_until: float | None = None
        while any(p.is_alive() for p in procs) or readers:
            now = time.monotonic()
            if timer is not None and kill_at is None and all(job.first(r, "saving") for r in range(world)):
                kill_at = now + timer[1]
            if kill_at is not None and now >= kill_at:
                for r in timer[0]:
                    if procs[r].is_alive():
                        procs[r].kill()
                        job.kill_points.append(f"timer rank {r} after {timer[1] * 1000:.0f} ms"
                                               + (" (after its save returned)" if job.first(r, "saved") else ""))
                kill_at = float("inf")
            if grace_until is None and any(p.exitcode == -signal.SIGKILL for p in procs):
                grace_until = now + _GRACE_S
            if (grace_until is not None and now >= grace_until) or now >= deadline:
                job.timed_out |= now >= deadline
                for p in procs:
                    if p.is_alive():
                        p.kill()
            timeouts = [t - now for t in (kill_at, grace_until, deadline) if t is not None and t > now]
            ready = wait_any(list(readers) + [p.sentinel for p in procs if p.is_alive()],
                             timeout=min(timeouts + [0.05]))
            for conn in [c for c in ready if c in readers]:
                try:
                    message = conn.recv()
                except (EOFError, OSError, ValueError, TypeError, AttributeError, ImportError):
                    # EOF: the rank exited; anything else: a message torn by SIGKILL mid-send.
                    del readers[conn]
                    continue
                job.messages[readers[conn]].append(message)
                if message[0] == "killing":
                    job.kill_points.append(f"rank {readers[conn]}: {message[1]}")
        for p in procs:
            p.join()
        job.killed = [r for r, p in enumerate(procs) if p.exitcode == -signal.SIGKILL]
    return job


@dataclass
class Report:
    trials: int = 0
    killed_before_commit: int = 0
    killed_after_commit: int = 0
    not_killed: int = 0
    loads_checked: int = 0
    modes: dict[str, int] = field(default_factory=collections.Counter)
    kill_points: dict[str, int] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.trials} trials in {self.seconds:.1f} s: {self.killed_before_commit} killed before the "
                f"commit, {self.killed_after_commit} after it, {self.not_killed} not killed; "
                f"{self.loads_checked} bit-exact loads of the latest checkpoint; {len(self.failures)} failures")


def _check_storage(setup: _Setup, path: str, previous: str | None, report: Report, trial: str) -> str | None:
    """The invariants after a trial; returns what the latest checkpoint must now be."""
    from dcp_forge import CheckpointNotFoundError, latest_checkpoint, list_checkpoints, verify_checkpoint
    from dcp_forge.storage import CheckpointState, checkpoint_state, open_backend, open_reader

    options = setup.storage_options
    backend, native = open_backend(path, options)
    state = checkpoint_state(backend, native)
    expected = path if state is CheckpointState.COMMITTED else previous
    latest = latest_checkpoint(setup.out_dir, options)
    if latest != expected:
        report.failures.append(f"{trial}: latest_checkpoint is {latest}, expected {expected} ({path} is {state.value})")
    for listed in list_checkpoints(setup.out_dir, options):
        problems = verify_checkpoint(listed, options)
        if problems:
            report.failures.append(f"{trial}: listed checkpoint {listed} has problems: {[str(p) for p in problems]}")
    if state is CheckpointState.PARTIAL:
        try:
            open_reader(path, options).read_metadata()
            report.failures.append(f"{trial}: the uncommitted {path} is readable")
        except CheckpointNotFoundError:
            pass
    return expected


def _check_tiers(setup: _Setup, path: str, previous: str | None, report: Report, trial: str, world: int
                 ) -> str | None:
    """With tiers: the newest checkpoint committed in either tier (a commit marker on some node, or in the
    remote tier) is this trial's if it committed anywhere, else the previous one; every committed copy is
    complete and verifies clean (each node holds every file: one peer copy, two nodes); a drained copy
    exists only if its local save committed first (the same commit record)."""
    from dcp_forge import verify_checkpoint
    from dcp_forge.storage import join_url
    from dcp_forge.tiers.layout import local_checkpoints
    from dcp_forge.tiers.listing import list_node_copies
    from dcp_forge.tiers.recovery import remote_checkpoints

    options = setup.storage_options
    copies = [c for node in range(world) for c in list_node_copies(setup.local_dir(node), node)]
    local = {c.checkpoint_id: c for c in local_checkpoints(copies)}
    remote = {c.checkpoint_id: c for c in remote_checkpoints(setup.out_dir, options)}
    name = os.path.basename(path)
    expected = path if name in local or name in remote else previous
    newest = max([*local.values(), *remote.values()], key=lambda c: c.commit.committed_at, default=None)
    latest = join_url(setup.out_dir, newest.checkpoint_id) if newest is not None else None
    if latest != expected:
        report.failures.append(f"{trial}: the newest checkpoint of either tier is {latest}, expected {expected}")
    for checkpoint_id, drained in remote.items():
        problems = verify_checkpoint(drained.url, options)
        if problems:
            report.failures.append(f"{trial}: drained {drained.url} has problems: {[str(p) for p in problems]}")
        here = local.get(checkpoint_id)
        if here is not None and here.commit.save_id == drained.commit.save_id and here.commit != drained.commit:
            report.failures.append(f"{trial}: the drained {checkpoint_id} carries another commit record than its "
                                   f"local save ({drained.commit} vs {here.commit})")
    for copy in copies:
        if copy.commit is not None:
            problems = verify_checkpoint(os.path.join(setup.local_dir(copy.node), copy.checkpoint_id))
            if problems:
                report.failures.append(f"{trial}: node {copy.node}'s committed copy of {copy.checkpoint_id} has "
                                       f"problems: {[str(p) for p in problems]}")
    return expected


def _sweep_order(kinds: list[str], sweep: bool | Sequence[str]) -> list[str]:
    """The kinds of one rank's storage operations to sweep, in order."""
    if sweep is True:
        return sorted(set(kinds), key=lambda k: (kinds.count(k), k))
    return [k for k in (sweep or ()) if k in kinds]


def run_trials(trials: int, *, world: int = 2, seed: int = 0, mib: float = 2.0, out_dir: str | None = None,
               storage_options: dict[str, Any] | None = None, use_async: bool = False,
               sweep: bool | Sequence[str] = True, keep_going: bool = False, log: Callable[[str], None] | None = None,
               tiers: bool = False) -> Report:
    """Run ``trials`` kill trials (after three jobs that kill nothing, and before one that only loads).

    ``out_dir``: a local directory or a URL (with ``storage_options``), empty or new; default: a
    temporary directory, removed afterwards. ``use_async``: save with ``async_save`` (training changes the state in place while it uploads)
    instead of ``save_checkpoint``. ``sweep``: begin by killing each rank once at each kind of storage
    operation it performs; a sequence of kinds (``event_kind`` names): only at those, in that order
    (short runs that must cover chosen steps of the protocol). ``tiers``: every rank is a node with a
    local tier of its own (a temporary directory; one peer copy, keep two), ``out_dir`` is the remote
    tier: kills also hit the local commit, peer copies, drains and retention in either tier.
    """
    from dcp_forge.manager.manager import checkpoint_id_for_step
    from dcp_forge.storage import join_url
    from tests.support.dist import rank_context

    ctx = rank_context()
    rng = random.Random(seed)
    report = Report()
    own_dir = out_dir is None
    setup = _Setup(out_dir or tempfile.mkdtemp(prefix="crash-"), dict(storage_options or {}), mib, use_async,
                   tempfile.mkdtemp(prefix="crash-local-") if tiers else None)
    started = time.monotonic()
    try:
        latest: str | None = None
        kinds: list[list[str]] = [[] for _ in range(world)]  # each rank's events in the last full job
        swept: set[tuple[int, str]] = set()
        mixed = 0
        save_s = 0.05
        for step in range(_CALIBRATION + trials + 1):
            # The first jobs kill nothing: they record which storage operations a save and retention
            # (from the third checkpoint on) perform. The last job only loads and checks the latest.
            final = step == _CALIBRATION + trials
            targets: dict[int, tuple[str, int]] = {}
            timer = None
            torn = rng.random() < 0.5
            # First a sweep: each kind of storage operation of each rank is killed once, rarest first
            # (data writes outnumber the commit protocol's steps a hundredfold). Then the four modes
            # take turns, killing at random operations or moments.
            pending = [(r, k) for r in range(world) for k in _sweep_order(kinds[r], sweep) if (r, k) not in swept]
            if not _CALIBRATION <= step < _CALIBRATION + trials:
                mode = None
            elif pending:
                mode, (victim, kind) = "event-one", pending[0]
                swept.add((victim, kind))
                targets = {victim: (kind, rng.randrange(kinds[victim].count(kind)))}
            else:
                mode = MODES[mixed % len(MODES)]
                mixed += 1
                victims = [rng.randrange(world)] if mode.endswith("-one") else list(range(world))
                if mode.startswith("event"):
                    for r in victims:
                        kind = rng.choice(sorted(set(kinds[r])))
                        targets[r] = (kind, rng.randrange(kinds[r].count(kind)))
                else:
                    timer = (victims, rng.uniform(0.0, save_s))
            expect_step = int(os.path.basename(latest).split("-")[1]) if latest else None
            path = join_url(setup.out_dir, checkpoint_id_for_step(step))
            job = _run_job(ctx, world, setup, step, expect_step, targets if not final else {}, torn, timer)
            trial = f"trial {step} ({mode or 'no kill'})"
            for r in range(world):
                loaded = job.first(r, "loaded")
                if expect_step is not None:  # every rank loads before any kill is armed
                    if loaded is None:
                        report.failures.append(f"{trial}: rank {r} did not load: {job.messages[r]}")
                    elif not loaded[2] or loaded[1] != os.path.basename(latest):
                        report.failures.append(f"{trial}: rank {r} loaded {loaded[1]}, expected "
                                               f"{os.path.basename(latest)} bit-exact (equal: {loaded[2]})")
                    else:
                        report.loads_checked += 1
                counted = job.first(r, "events")
                if counted is not None:
                    kinds[r] = counted[1]
                saved = job.first(r, "saved")
                if saved is not None:
                    save_s = saved[1]
            if job.timed_out:
                report.failures.append(f"{trial}: the job did not finish in {_JOB_TIMEOUT_S} s")
            if final:
                break
            if mode is None and job.killed:
                report.failures.append(f"{trial}: a rank died without being killed: {job.messages}")
            errors = [m for r in range(world) for m in job.messages[r] if m[0] == "error"]
            if not job.killed and errors:
                report.failures.append(f"{trial}: {errors}")
            latest_before = latest
            latest = (_check_tiers(setup, path, latest, report, trial, world) if tiers
                      else _check_storage(setup, path, latest, report, trial))
            if mode is not None:
                report.trials += 1
                report.modes[mode] += 1
                if not job.killed:
                    report.not_killed += 1
                elif latest == path:
                    report.killed_after_commit += 1
                else:
                    report.killed_before_commit += 1
                for point in job.kill_points:
                    if point.startswith("timer"):
                        report.kill_points["timer" + (" (after save)" if "after its save" in point else "")] += 1
                    else:
                        report.kill_points[event_kind(point.split(": ", 1)[1])] += 1
            if report.failures and not keep_going:
                break  # later trials would only repeat the damage this one found
            if log is not None:
                log(f"{trial}: killed ranks {job.killed} at {job.kill_points or '-'}; latest "
                    f"{os.path.basename(latest or '-')} (was {os.path.basename(latest_before or '-')})")
    finally:
        report.seconds = time.monotonic() - started
        if own_dir:
            shutil.rmtree(setup.out_dir, ignore_errors=True)
        if setup.local_root is not None:
            shutil.rmtree(setup.local_root, ignore_errors=True)
    return report


S3_BUCKET = "crash-harness"


def _print_report(report: Report, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**vars(report), "modes": dict(report.modes), "kill_points": dict(report.kill_points)},
                         indent=2))
        return
    print(report.summary())
    print("modes:", dict(report.modes))
    print("kill points:", dict(sorted(report.kill_points.items(), key=lambda kv: -kv[1])))
    for failure in report.failures:
        print("FAILURE:", failure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mib", type=float, default=2.0, help="replicated model size per rank (MiB)")
    parser.add_argument("--output-dir", default=None,
                        help="local directory or URL (s3://...) to save into, empty or new (default: a temp dir)")
    parser.add_argument("--storage-options", default="{}", help="JSON storage options for --output-dir")
    parser.add_argument("--s3", action="store_true",
                        help="start a SeaweedFS on 127.0.0.1 (tests/support/s3_server.py) for this run, save into "
                             f"s3://{S3_BUCKET}/run-<id> on it, and stop it at the end")
    parser.add_argument("--async", dest="use_async", action="store_true",
                        help="async saves (training changes the state while they upload) instead of sync ones")
    parser.add_argument("--verbose", action="store_true", help="print one line per trial")
    parser.add_argument("--keep-going", action="store_true", help="do not stop at the first failing trial")
    parser.add_argument("--tiers", action="store_true",
                        help="save through a local tier (each rank a node with its own, one peer copy) that drains "
                             "to the output dir; kills also hit local commits, peer copies and drains")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.s3 and args.output_dir:
        parser.error("--s3 starts a server of its own: leave out --output-dir")

    def run(out_dir: str | None, options: dict[str, Any]) -> int:
        report = run_trials(args.trials, world=args.world, seed=args.seed, mib=args.mib, out_dir=out_dir,
                            storage_options=options, use_async=args.use_async, keep_going=args.keep_going,
                            log=print if args.verbose else None, tiers=args.tiers)
        _print_report(report, args.json)
        return 1 if report.failures else 0

    if not args.s3:
        return run(args.output_dir, json.loads(args.storage_options))
    from tests.support import s3_server

    with s3_server.running_server("seaweedfs", buckets=[S3_BUCKET], stop_timeout=5) as info:
        options = {"key": info.access_key, "secret": info.secret_key, "endpoint_url": info.endpoint_url,
                   "config_kwargs": {"region_name": info.region}, **json.loads(args.storage_options)}
        return run(f"s3://{S3_BUCKET}/run-{os.getpid()}-{int(time.time())}", options)


if __name__ == "__main__":
    sys.exit(main())
