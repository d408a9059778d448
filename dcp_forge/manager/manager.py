"""CheckpointManager: when to save, what to keep, where to resume from.

It owns one ``CheckpointCoordinator`` over the trainer's declared components and adds the policy
around it, as a ``CheckpointPolicy`` says: the save schedule, crediting checkpoints with
the ranking metric (``retention.MetricCredit``), ``save_total_limit`` retention with best-N
preservation (``retention.plan_retention``), and resuming.

Call protocol: every rank builds its manager at the same point of the program (building the
coordinator is collective) and calls ``prepare_output_dir``, ``resume``, ``save``, ``settle`` and
``close`` together. Storage housekeeping (discarding uncommitted leftovers, reading manifests, deleting what
retention drops) runs on rank 0 only; its outcome is broadcast, so every rank sees the same answer.
The pure ``should_save`` / ``observe`` need no communication.

Each checkpoint's manifest ``extra`` records ``{"checkpoint_id", "step", "epoch", "metric_name",
"metric", "logs"}``; retention only ever considers (and deletes) checkpoints carrying that record,
so a manager never touches checkpoints another tool put into the same ``output_dir``.

With ``async_save`` a save returns once the state is staged (``CheckpointCoordinator.async_save``);
the checkpoint commits in the background, and retention for it runs when the manager next settles:
at the next save, at the end of training (``settle``) or when closed. Until then ``last_checkpoint``
names the previous committed one.

With a ``local_tier`` (docs/TIERS.md) ``save_total_limit`` rules ``output_dir`` (the remote tier) and
the tier's ``keep`` the local one. Retention in ``output_dir`` sees the checkpoints drained by then: the
one still draining counts from the next save on (and at ``close``, which waits for the last drain).
Resuming takes the newest checkpoint committed and intact in either tier, the local copy first.
With ``policy.async_options`` staging "overlapped", a loop of one's own declares its mutation points
on ``manager.coordinator`` (``install_step_hook(optimizer)``, ``mutating()``); the trainers do it
themselves.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ..coordinator import CheckpointCoordinator, read_manifest
from ..core.components import StateComponent
from ..errors import DeclarationTypeError, describe_type
from ..storage import (
    check_output_dir,
    delete_checkpoint,
    discard_partial_checkpoints,
    list_checkpoints,
    redact_url,
)
from .policy import CheckpointPolicy
from .retention import CheckpointRecord, MetricCredit, RetentionPlan, RetentionPolicy, plan_retention

__all__ = ["CheckpointManager", "CheckpointPolicy"]

logger = logging.getLogger(__name__)


def checkpoint_id_for_step(step: int) -> str:
    return f"checkpoint-{step}"


def step_of_checkpoint_id(checkpoint_id: str) -> int | None:
    """The step a ``checkpoint-<step>`` id was saved at; None for any other id."""
    prefix, _, step = checkpoint_id.rpartition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() else None


class CheckpointManager:
    """Checkpoint policy for one training run over ``components`` (see the module docstring)."""

    def __init__(self, policy: CheckpointPolicy, components: Sequence[StateComponent],
                 process_groups: Mapping[str, Any] | None = None) -> None:
        if not isinstance(policy, CheckpointPolicy):
            raise TypeError(f"'policy' must be a CheckpointPolicy (got {type(policy).__name__}); a trainer's "
                            "TrainingArguments give one with .checkpoint_policy()")
        self.policy = policy
        self.retention = RetentionPolicy(policy.save_total_limit, policy.preserve_n_best, policy.greater_is_better)
        self.coordinator = CheckpointCoordinator(components, process_groups, output_dir=policy.output_dir,
                                                 storage_options=policy.storage_options,
                                                 training_args_hash=policy.training_args_hash,
                                                 local_tier=policy.local_tier,
                                                 async_options=policy.async_options)
        self.credit = MetricCredit()
        self.last_checkpoint: str | None = None
        self.last_saved_step: int | None = None
        self.deleted: list[str] = []
        self.preserved: tuple[str, ...] = ()
        self._in_flight: Any = None  # the AsyncSaveHandle of an uncommitted async save

    @property
    def rank(self) -> int:
        return self.coordinator.rank

    # --- schedules (pure) ----------------------------------------------------------------------
    def should_save(self, step: int, *, epoch_end: bool = False, final: bool = False) -> bool:
        """Whether to save after ``step``: at epoch ends ("epoch"), every ``save_steps`` steps and at
        the final step ("steps"), never twice for one step."""
        if self.policy.save_strategy == "no" or step == self.last_saved_step or step == 0:
            return False
        if self.policy.save_strategy == "epoch":
            return epoch_end
        return final or step % self.policy.save_steps == 0

    def observe(self, metrics: Mapping[str, float]) -> None:
        """Account logged or evaluated metrics for ranking the next checkpoint."""
        name = self.policy.metric_for_best_model
        if name in metrics:
            self.credit = self.credit.observe(metrics[name], self.policy.greater_is_better)

    # --- state (saved with the trainer component) ---------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"pending_metric": self.credit.pending, "last_saved_step": self.last_saved_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pending = state["pending_metric"]
        self.credit = MetricCredit(None if pending is None else float(pending))
        self.last_saved_step = None if state["last_saved_step"] is None else int(state["last_saved_step"])

    # --- storage ------------------------------------------------------------------------------
    def prepare_output_dir(self, resuming: bool) -> list[str]:
        """Before training: drop uncommitted leftovers of a crashed save (they would block saving the
        same id again), and refuse to start fresh over committed checkpoints of an earlier run.
        Returns the discarded paths."""
        policy = self.policy

        def housekeeping() -> tuple[list[str], list[str]]:
            discarded = discard_partial_checkpoints(policy.output_dir, policy.storage_options)
            existing = list_checkpoints(policy.output_dir, policy.storage_options)
            return discarded, existing

        discarded, existing = self.coordinator.run_on_coordinator(housekeeping)
        tiers = self.coordinator.tiers
        if tiers is not None:  # the same for the local tier, on every node
            discarded = discarded + tiers.discard_uncommitted(self.coordinator.group)
            existing = existing + [f"{c.checkpoint_id} (local tier)" for c in tiers.committed(self.coordinator.group)]
        for path in discarded:
            if self.rank == 0:
                logger.warning("discarded uncommitted checkpoint %s (left by an interrupted save)",
                               redact_url(path))
        if existing and not resuming and policy.save_strategy != "no":
            raise ValueError(
                f"output_dir {redact_url(policy.output_dir)} already holds {len(existing)} "
                f"committed checkpoint(s) (newest: {redact_url(existing[-1])}); set resume_from_checkpoint=True "
                "to continue that run, or choose an empty output_dir")
        return discarded

    def resume(self, target: Literal[True] | str | os.PathLike) -> str | None:
        """Load ``target`` (True: the latest committed checkpoint, None when there is none; a path:
        that checkpoint) into the components. Returns the loaded path. Collective."""
        if target is True and self.coordinator.tiers is not None:
            return self._resume_tiered()
        if target is True:
            latest = self.coordinator.run_on_coordinator(self._latest_to_resume)
            if latest is None:
                return None
            checkpoint: str = latest
        elif isinstance(target, (str, os.PathLike)):
            checkpoint = os.fspath(target)
            self._refuse_newer_checkpoints_than(checkpoint)
        else:  # False, say: not resuming is the caller's decision, made before calling
            raise DeclarationTypeError(f"CheckpointManager.resume takes True or a checkpoint path "
                                       f"(got {describe_type(target)})")
        self.settle()
        path = os.fspath(self.coordinator.load_checkpoint(checkpoint))
        self.last_checkpoint = path
        return path

    def _resume_tiered(self) -> str | None:
        """Resume from the newest checkpoint committed and intact in either tier (the local copy first).
        Local checkpoints newer than it could not be loaded: they are deleted, so the run can save those
        steps again. Drains a crash interrupted start again."""
        self.settle()
        tiers, group = self.coordinator.tiers, self.coordinator.group
        if tiers is None:
            raise ValueError("this manager's coordinator has no local tier")
        if not tiers.sources(group, announce=False):
            self.coordinator.run_on_coordinator(
                lambda: check_output_dir(self.policy.output_dir, self.policy.storage_options))
            return None
        path = os.fspath(self.coordinator.load_checkpoint())
        tiers.discard_newer_than_loaded(group)
        tiers.drain_pending(group)
        self.last_checkpoint = path
        return path

    def _latest_to_resume(self) -> str | None:
        """The newest committed checkpoint; None (start from scratch) only where output_dir can be a
        run that has saved nothing yet: a mistyped bucket or path raises (``check_output_dir``)."""
        found = list_checkpoints(self.policy.output_dir, self.policy.storage_options)
        if found:
            return found[-1]
        check_output_dir(self.policy.output_dir, self.policy.storage_options)
        return None

    def _refuse_newer_checkpoints_than(self, target: str) -> None:
        """Resuming from an older checkpoint than output_dir's newest would reach a step whose
        checkpoint already exists, and that save would fail hours into the run: refuse up front."""
        resumed_step = step_of_checkpoint_id(posixpath.basename(target.rstrip("/")))
        if resumed_step is None:
            return
        existing = self.coordinator.run_on_coordinator(
            lambda: list_checkpoints(self.policy.output_dir, self.policy.storage_options))
        newer = sorted((step, path) for path in existing
                       if (step := step_of_checkpoint_id(posixpath.basename(path))) is not None and step > resumed_step)
        if newer:
            raise ValueError(
                f"resume_from_checkpoint={redact_url(target)} (step {resumed_step}) is older than "
                f"{len(newer)} checkpoint(s) in output_dir {redact_url(self.policy.output_dir)} (first: "
                f"{redact_url(newer[0][1])}); continuing would collide with them when it saves step "
                f"{newer[0][0]}. Delete them first (dcp_forge.delete_checkpoint) or resume into another output_dir")

    def save(self, *, step: int, epoch: int, logs: Mapping[str, float] | None = None) -> str:
        """Save every component as ``checkpoint-<step>``, then apply retention (with ``async_save``:
        once it has committed, see the module docstring). Returns its path. Collective."""
        self.settle()
        metric, self.credit = self.credit.claim()
        self.last_saved_step = step
        checkpoint_id = checkpoint_id_for_step(step)
        extra = {"checkpoint_id": checkpoint_id, "step": step, "epoch": epoch,
                 "metric_name": self.policy.metric_for_best_model, "metric": metric, "logs": dict(logs or {})}
        if self.policy.async_save:
            self._in_flight = self.coordinator.async_save(checkpoint_id=checkpoint_id,
                                                          validate=self.policy.validate_replication, extra=extra)
            return self.coordinator.checkpoint_path(checkpoint_id)
        path = self.coordinator.save_checkpoint(checkpoint_id=checkpoint_id,
                                                validate=self.policy.validate_replication, extra=extra)
        self._committed(path)
        return path

    def _committed(self, path: str) -> None:
        self.last_checkpoint = path
        self.apply_retention()

    def settle(self) -> None:
        """Wait for the in-flight async save to commit (raising its failure), then apply retention.
        Collective; nothing to do after sync saves."""
        handle, self._in_flight = self._in_flight, None
        if handle is not None:
            self._committed(handle.result())

    def close(self) -> None:
        """Settle, then release the coordinator's staging buffers and process groups. Collective;
        call before ``dist.destroy_process_group()``."""
        try:
            self.settle()
            if self.coordinator.tiers is not None:
                # The last drain ends after the last save's retention ran in either tier (the local tier
                # kept the checkpoint being drained): apply both to what is there now.
                self.coordinator.tiers.wait()
                self.coordinator.tiers.apply_retention(self.coordinator.group)
                self.apply_retention()
        finally:
            self.coordinator.close()

    def records(self) -> list[tuple[CheckpointRecord, str]]:
        """This run's committed checkpoints with their paths, read from storage (rank 0's view)."""
        out = []
        for path in list_checkpoints(self.policy.output_dir, self.policy.storage_options):
            extra = read_manifest(path, self.policy.storage_options).extra
            if not isinstance(extra, Mapping) or "step" not in extra or "checkpoint_id" not in extra:
                continue  # not written by a CheckpointManager: never ours to delete
            metric = extra.get("metric") if extra.get("metric_name") == self.policy.metric_for_best_model else None
            out.append((CheckpointRecord(str(extra["checkpoint_id"]), int(extra["step"]), metric), path))
        return out

    def apply_retention(self) -> RetentionPlan | None:
        """Delete what ``save_total_limit`` no longer keeps (never the newest or a preserved one).
        Collective; rank 0 deletes. Returns the plan (None when nothing is limited or ranked)."""
        if self.retention.save_total_limit is None and self.retention.preserve_n_best == 0:
            return None

        def retain() -> tuple[RetentionPlan, list[str]]:
            records = self.records()
            plan = plan_retention([r for r, _ in records], self.retention)
            paths = {r.checkpoint_id: p for r, p in records}
            for checkpoint_id in plan.delete:
                delete_checkpoint(paths[checkpoint_id], self.policy.storage_options)
                logger.info("retention: deleted %s", redact_url(paths[checkpoint_id]))
            return plan, [paths[c] for c in plan.preserved]

        plan, preserved_paths = self.coordinator.run_on_coordinator(retain)
        self.preserved = tuple(preserved_paths)
        self.deleted.extend(plan.delete)
        return plan

    def best_checkpoint(self) -> str | None:
        """The best preserved checkpoint, else the newest one this manager saved or loaded."""
        return self.preserved[0] if self.preserved else self.last_checkpoint
