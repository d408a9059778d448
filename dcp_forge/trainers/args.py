"""Training arguments: frozen, validated when built, Hugging Face names where HF has one.

``TrainingArguments`` holds what every trainer needs; ``DDPTrainingArguments`` and
``PipelineTrainingArguments`` add their trainer's knobs. An invalid value or combination raises a
``ValueError`` naming the field when the arguments are built, so a job fails before it starts, not at
its first save.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import describe_type
from ..manager.policy import SAVE_STRATEGIES, CheckpointPolicy

__all__ = ["TrainingArguments", "DDPTrainingArguments", "PipelineTrainingArguments"]

LR_SCHEDULER_TYPES = ("constant", "linear", "cosine")
PIPELINE_SCHEDULES = ("1F1B", "GPipe")

# Fields that say where or whether to resume, not what is trained: they stay out of the hash the
# manifest records, so a resumed job's checkpoints carry the same training_args_hash as the original's.
# storage_options may hold credentials, which must never reach a manifest, hashed or not.
_UNHASHED = frozenset({"output_dir", "resume_from_checkpoint", "storage_options", "async_save"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_error(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"TrainingArguments.{name} must be {expected} (got {describe_type(value)})")


@dataclass(frozen=True)
class TrainingArguments:
    """What to train for how long, and when to checkpoint, evaluate and log.

    Checkpointing: ``save_strategy`` "steps" saves every ``save_steps`` steps and at the last step;
    "epoch" at the end of every epoch; "no" never. ``save_total_limit`` keeps the newest that many
    checkpoints (the newest one and the ``preserve_n_best`` best by ``metric_for_best_model`` are
    never deleted). ``resume_from_checkpoint``: True resumes from the latest committed checkpoint in
    ``output_dir`` (starting fresh if there is none), a path resumes from that checkpoint.
    ``save_*_state`` False leaves that component out of checkpoints (and out of resuming).

    ``metric_for_best_model``: "train_loss" (mean training loss since the previous save) or an
    evaluation metric "eval_<name>" (needs ``eval_steps``); a checkpoint is credited with the best
    value of that metric seen since the previous save, so a best evaluation between two saves still
    preserves the next checkpoint.

    ``async_save``: saves return as soon as the state is staged and finish in the background (the
    next save, the end of training and retention wait for them).
    """

    output_dir: str = "./checkpoints"
    max_steps: int | None = None
    num_train_epochs: int = 1
    per_device_batch_size: int = 8
    learning_rate: float = 1e-3
    seed: int = 0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    preserve_n_best: int = 0
    metric_for_best_model: str = "train_loss"
    greater_is_better: bool = False
    resume_from_checkpoint: bool | str | None = None
    save_optimizer_state: bool = True
    save_scheduler_state: bool = True
    save_dataset_state: bool = True
    save_rng_state: bool = True
    async_save: bool = False
    validate_replication: bool = True
    eval_steps: int | None = None
    logging_steps: int = 10
    dataloader_num_workers: int = 0
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, os.PathLike):
            object.__setattr__(self, "output_dir", os.fspath(self.output_dir))
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise _field_error("output_dir", "a non-empty path or URL", self.output_dir)
        for name in ("num_train_epochs", "per_device_batch_size", "save_steps", "logging_steps"):
            self._check_positive_int(name)
        for name in ("max_steps", "save_total_limit", "eval_steps"):
            if getattr(self, name) is not None:
                self._check_positive_int(name, "a positive int or None")
        for name in ("seed", "warmup_steps", "preserve_n_best", "dataloader_num_workers"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise _field_error(name, "a non-negative int", value)
        lr = self.learning_rate
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
            raise _field_error("learning_rate", "a positive finite number", lr)
        self._check_choice("save_strategy", SAVE_STRATEGIES)
        self._check_choice("lr_scheduler_type", LR_SCHEDULER_TYPES)
        for name in ("greater_is_better", "save_optimizer_state", "save_scheduler_state", "save_dataset_state",
                     "save_rng_state", "async_save", "validate_replication"):
            if not isinstance(getattr(self, name), bool):
                raise _field_error(name, "<bool>", getattr(self, name))
        resume = self.resume_from_checkpoint
        if isinstance(resume, os.PathLike):
            object.__setattr__(self, "resume_from_checkpoint", os.fspath(resume))
        elif not (resume is None or isinstance(resume, (bool, str))) or resume == "":
            raise _field_error("resume_from_checkpoint", "True/False/None or a checkpoint path", resume)
        if not isinstance(self.storage_options, Mapping):
            raise _field_error("storage_options", "a mapping", self.storage_options)
        object.__setattr__(self, "storage_options", dict(self.storage_options))
        self._check_combinations()

    def _check_positive_int(self, name: str, expected: str = "a positive int") -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < 1:
            raise _field_error(name, expected, value)

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise _field_error(name, f"one of {', '.join(map(repr, choices))}", value)

    def _check_combinations(self) -> None:
        if self.save_strategy == "no":
            for name, unset in (("save_total_limit", None), ("preserve_n_best", 0), ("async_save", False)):
                if getattr(self, name) != unset:
                    raise ValueError(
                        f"TrainingArguments.{name}={getattr(self, name)!r} needs checkpoints, but "
                        "save_strategy is 'no'")
        metric = self.metric_for_best_model
        if not isinstance(metric, str) or not (metric == "train_loss" or metric.startswith("eval_")):
            raise _field_error("metric_for_best_model", "'train_loss' or an evaluation metric 'eval_<name>'",
                               metric)
        if self.preserve_n_best and metric.startswith("eval_") and self.eval_steps is None:
            raise ValueError(
                f"TrainingArguments.eval_steps must be set: metric_for_best_model={metric!r} is an "
                f"evaluation metric and preserve_n_best={self.preserve_n_best} ranks checkpoints by it")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps and self.lr_scheduler_type != "constant":
            raise ValueError(
                f"TrainingArguments.warmup_steps={self.warmup_steps} must be below max_steps={self.max_steps} "
                f"for lr_scheduler_type={self.lr_scheduler_type!r}")

    @property
    def resume_target(self) -> bool | str:
        """False (start fresh), True (latest committed checkpoint, if any) or a checkpoint path."""
        return self.resume_from_checkpoint or False

    def checkpoint_policy(self) -> CheckpointPolicy:
        """What the trainer's ``CheckpointManager`` needs: where, when, what to keep, which metric ranks."""
        return CheckpointPolicy(
            output_dir=self.output_dir, save_strategy=self.save_strategy, save_steps=self.save_steps,
            save_total_limit=self.save_total_limit, preserve_n_best=self.preserve_n_best,
            metric_for_best_model=self.metric_for_best_model, greater_is_better=self.greater_is_better,
            async_save=self.async_save, validate_replication=self.validate_replication,
            training_args_hash=self.training_hash(), storage_options=self.storage_options)

    def to_dict(self) -> dict[str, Any]:
        """Every field except storage_options (which may hold credentials)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "storage_options"}

    def training_hash(self) -> str:
        """A short stable hash of what is trained (not where it is stored or whether it resumes)."""
        fields = {k: v for k, v in self.to_dict().items() if k not in _UNHASHED}
        fields["class"] = type(self).__name__
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DDPTrainingArguments(TrainingArguments):
    """``dispatch_batches``: True, rank 0 loads each global batch and scatters a slice to every rank
    (dataset state GLOBAL); False, every rank loads its own shard (dataset state PER_RANK)."""

    dispatch_batches: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.dispatch_batches, bool):
            raise _field_error("dispatch_batches", "<bool>", self.dispatch_batches)


@dataclass(frozen=True)
class PipelineTrainingArguments(TrainingArguments):
    """``n_microbatches`` per batch (must divide ``per_device_batch_size``), the ``pipeline_schedule``
    ("1F1B" or "GPipe"), and for DP×PP the ``pipeline_parallel_size`` (None: every rank is a stage)."""

    n_microbatches: int = 2
    pipeline_schedule: str = "1F1B"
    pipeline_parallel_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive_int("n_microbatches")
        if self.pipeline_parallel_size is not None:
            self._check_positive_int("pipeline_parallel_size", "a positive int or None")
        self._check_choice("pipeline_schedule", PIPELINE_SCHEDULES)
        if self.per_device_batch_size % self.n_microbatches:
            raise ValueError(
                f"TrainingArguments.n_microbatches={self.n_microbatches} must divide "
                f"per_device_batch_size={self.per_device_batch_size}")
