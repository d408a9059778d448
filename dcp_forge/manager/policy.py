"""``CheckpointPolicy``: everything a ``CheckpointManager`` needs to know, and nothing about training.

Where checkpoints go, when to save, how many to keep and by which metric to rank them. Frozen and
validated when built (a ``ValueError`` naming the field), so a job fails before it starts rather than
at its first save. Trainers build one from their ``TrainingArguments`` (``checkpoint_policy()``);
any other training loop builds one directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..async_save import AsyncOptions
from ..errors import describe_type
from ..tiers.policy import LocalTier

SAVE_STRATEGIES = ("steps", "epoch", "no")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CheckpointPolicy:
    """``save_strategy`` "steps" saves every ``save_steps`` steps and at the last step; "epoch" at the
    end of every epoch; "no" never. ``save_total_limit`` keeps the newest that many checkpoints (the
    newest and the ``preserve_n_best`` best by ``metric_for_best_model`` are never deleted).
    ``async_save``: saves return once the state is staged and commit in the background;
    ``async_options`` says how they stage and upload (``AsyncOptions``).
    ``validate_replication``: check replicated components across ranks at every save.
    ``training_args_hash``: recorded in each manifest, to tell runs apart. ``storage_options`` go to
    fsspec and never into a manifest. ``local_tier``: a ``LocalTier`` every save commits to first
    (node-local, kept by its own ``keep``), drained to ``output_dir`` (kept by ``save_total_limit``);
    resuming takes the newest checkpoint of either tier, the local copy first (docs/TIERS.md).
    """

    output_dir: str
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    preserve_n_best: int = 0
    metric_for_best_model: str = "train_loss"
    greater_is_better: bool = False
    async_save: bool = False
    async_options: AsyncOptions = field(default_factory=AsyncOptions)
    validate_replication: bool = False
    training_args_hash: str | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    local_tier: LocalTier | None = None

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, os.PathLike):
            object.__setattr__(self, "output_dir", os.fspath(self.output_dir))
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise self._error("output_dir", "a non-empty path or URL")
        if self.save_strategy not in SAVE_STRATEGIES:
            raise self._error("save_strategy", f"one of {', '.join(map(repr, SAVE_STRATEGIES))}")
        if not _is_int(self.save_steps) or self.save_steps < 1:
            raise self._error("save_steps", "a positive int")
        if self.save_total_limit is not None and (not _is_int(self.save_total_limit) or self.save_total_limit < 1):
            raise self._error("save_total_limit", "a positive int or None")
        if not _is_int(self.preserve_n_best) or self.preserve_n_best < 0:
            raise self._error("preserve_n_best", "a non-negative int")
        if not isinstance(self.metric_for_best_model, str) or not self.metric_for_best_model:
            raise self._error("metric_for_best_model", "a metric name")
        for name in ("greater_is_better", "async_save", "validate_replication"):
            if not isinstance(getattr(self, name), bool):
                raise self._error(name, "<bool>")
        if not isinstance(self.async_options, AsyncOptions):
            raise self._error("async_options", "an AsyncOptions")
        if self.training_args_hash is not None and not isinstance(self.training_args_hash, str):
            raise self._error("training_args_hash", "a string or None")
        if not isinstance(self.storage_options, Mapping):
            raise self._error("storage_options", "a mapping")
        object.__setattr__(self, "storage_options", dict(self.storage_options))
        if self.local_tier is not None and not isinstance(self.local_tier, LocalTier):
            raise self._error("local_tier", "a LocalTier or None")
        if self.save_strategy == "no":
            for name, unset in (("save_total_limit", None), ("preserve_n_best", 0), ("async_save", False)):
                if getattr(self, name) != unset:
                    raise ValueError(f"CheckpointPolicy.{name}={getattr(self, name)!r} needs checkpoints, but "
                                     "save_strategy is 'no'")

    def _error(self, name: str, expected: str) -> ValueError:
        return ValueError(f"CheckpointPolicy.{name} must be {expected} (got {describe_type(getattr(self, name))})")

    def __repr__(self) -> str:  # storage_options may hold credentials
        shown = {k: v for k, v in self.__dict__.items() if k != "storage_options"}
        return f"CheckpointPolicy({', '.join(f'{k}={v!r}' for k, v in shown.items())})"
