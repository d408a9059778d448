"""Which checkpoints to keep: pure functions over checkpoint records, property-tested.

Two rules decide what survives a save:

- ``save_total_limit``: the newest ``save_total_limit`` checkpoints are kept;
- ``preserve_n_best``: the ``n`` checkpoints with the best metric are kept, whatever their age.

The newest checkpoint is always kept (it is what a crashed job resumes from), and a checkpoint is
never deleted because of another one's metric alone. Checkpoints without a metric (or with NaN/inf)
are never "best".

Evaluation and saving run on independent schedules, so a checkpoint is credited with the best value
of the ranking metric observed since the previous save (``MetricCredit``): a best evaluation between
two saves preserves the next checkpoint, the closest state after it that exists on storage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeGuard

__all__ = ["CheckpointRecord", "MetricCredit", "RetentionPlan", "RetentionPolicy", "best_checkpoints",
           "plan_retention"]


def _finite(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value)


@dataclass(frozen=True)
class CheckpointRecord:
    """A committed checkpoint as retention sees it. ``step`` orders checkpoints of one run."""

    checkpoint_id: str
    step: int
    metric: float | None = None


@dataclass(frozen=True)
class RetentionPolicy:
    save_total_limit: int | None = None
    preserve_n_best: int = 0
    greater_is_better: bool = False

    def __post_init__(self) -> None:
        limit = self.save_total_limit
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"RetentionPolicy.save_total_limit must be a positive int or None (got {limit!r})")
        n = self.preserve_n_best
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"RetentionPolicy.preserve_n_best must be a non-negative int (got {n!r})")


@dataclass(frozen=True)
class RetentionPlan:
    keep: tuple[str, ...]  # oldest first
    preserved: tuple[str, ...]  # best first
    delete: tuple[str, ...]  # oldest first


def best_checkpoints(records: Sequence[CheckpointRecord], n: int, greater_is_better: bool) -> tuple[str, ...]:
    """Ids of the ``n`` records with the best finite metric, best first; on a tie the earlier step
    wins (it reached that value first)."""
    ranked = [(r.metric, r) for r in records if _finite(r.metric)]
    ranked.sort(key=lambda pair: (-pair[0] if greater_is_better else pair[0], pair[1].step))
    return tuple(r.checkpoint_id for _, r in ranked[:n])


def plan_retention(records: Sequence[CheckpointRecord], policy: RetentionPolicy) -> RetentionPlan:
    """What to keep and delete among ``records`` (any order; ids unique)."""
    ordered = sorted(records, key=lambda r: r.step)
    ids = [r.checkpoint_id for r in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError(f"plan_retention: checkpoint ids must be unique (got {ids})")
    preserved = best_checkpoints(ordered, policy.preserve_n_best, policy.greater_is_better)
    if policy.save_total_limit is None or not ordered:
        return RetentionPlan(tuple(ids), preserved, ())
    keep = set(ids[-policy.save_total_limit:]) | set(preserved)
    return RetentionPlan(tuple(i for i in ids if i in keep), preserved,
                         tuple(i for i in ids if i not in keep))


@dataclass(frozen=True)
class MetricCredit:
    """The best value of the ranking metric observed since the previous save (None: none yet)."""

    pending: float | None = None

    def observe(self, value: float, greater_is_better: bool) -> MetricCredit:
        """Account one observation; non-finite values (a diverged eval) never become the credit."""
        if not _finite(value):
            return self
        value = float(value)
        if self.pending is None or (value > self.pending if greater_is_better else value < self.pending):
            return MetricCredit(value)
        return self

    def claim(self) -> tuple[float | None, MetricCredit]:
        """At a save: the value to credit the new checkpoint with, and the emptied credit."""
        return self.pending, MetricCredit()
