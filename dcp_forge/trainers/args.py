"""Training arguments: one frozen class every trainer accepts, validated when built, with Hugging
Face's names and meanings where HF has the same knob.

Fields only some trainers read (``TRAINER_FIELDS``: ``dispatch_batches``, ``n_microbatches``,
``pipeline_schedule``, ``pipeline_parallel_size``) default to None, meaning "this trainer's default";
the trainer that reads one validates it, and a trainer that does not read a field that is set refuses
the arguments, so a knob can never be silently ignored. An invalid value or combination raises a
``ValueError`` naming the field when the arguments are built, so a job fails before it starts, not at
its first save.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..async_save import STAGING_MODES, UPLOAD_MODES, AsyncOptions
from ..errors import describe_type
from ..manager.policy import SAVE_STRATEGIES, CheckpointPolicy
from ..tiers.policy import LocalTier

__all__ = ["TRAINER_FIELDS", "TrainingArguments"]

LR_SCHEDULER_TYPES = ("constant", "linear", "cosine")
PIPELINE_SCHEDULES = ("1F1B", "GPipe")
EVAL_STRATEGIES = ("no", "steps", "epoch")

# Trainer-specific fields and the value a trainer that reads one uses when it is left unset (None).
TRAINER_FIELDS: Mapping[str, Any] = {
    "dispatch_batches": True,
    "n_microbatches": 2,
    "pipeline_schedule": "1F1B",
    "pipeline_parallel_size": None,
}

# The ranking metric that needs no evaluation: the mean training loss since the previous save.
TRAIN_LOSS = "train_loss"

# Fields that say where or whether to resume, not what is trained: they stay out of the hash the
# manifest records, so a resumed job's checkpoints carry the same training_args_hash as the original's.
# storage_options may hold credentials, which must never reach a manifest, hashed or not.
_UNHASHED = frozenset({"output_dir", "resume_from_checkpoint", "storage_options", "async_save", "async_staging",
                       "async_upload", "async_lazy_min_bytes", "local_tier"})


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
    ``output_dir`` (starting fresh if there is none, so one command restarts a failed job), a path
    resumes from that checkpoint; ``train(resume_from_checkpoint=...)`` overrides it as in HF.
    ``save_*_state`` False leaves that component out of checkpoints (and out of resuming).

    Evaluation (as in HF): ``eval_strategy`` "no", "steps" (every ``eval_steps`` steps; default
    ``logging_steps``) or "epoch" (at every epoch end), over ``eval_dataset`` in batches of
    ``per_device_eval_batch_size``.

    ``metric_for_best_model`` (as in HF): an evaluation metric, "eval_"-prefixed if it is not already
    ("loss" means "eval_loss"), or "train_loss", the mean training loss since the previous save.
    Default: "eval_loss" when evaluating, else "train_loss". ``greater_is_better`` defaults to False
    for metrics ending in "loss", else True. A checkpoint is credited with the best value of the
    metric seen since the previous save, so a best evaluation between two saves still preserves the
    next checkpoint. ``load_best_model_at_end`` (as in HF): after training, load the model of the
    best checkpoint (it is never deleted); evaluation and saving must then run on the same schedule.

    ``async_save``: saves return as soon as the state is staged and finish in the background (the
    next save, the end of training and retention wait for them). ``async_staging`` "overlapped": a
    save returns once the small state is copied, and the large tensors are copied during the next
    forward and backward passes (the optimizer step waits for what is left; see ``AsyncOptions``);
    "blocking" (default) copies everything at the call; ``async_lazy_min_bytes``: the storage size
    from which a tensor is copied during those passes (smaller ones, and everything that is not a
    tensor, at the call). ``async_upload`` "process": the upload runs in an upload process per rank
    instead of a thread of the training process. ``local_tier`` (a ``LocalTier``, or
    its node-local directory): saves commit there first and drain to ``output_dir`` in the background;
    resuming reads the local (or a peer node's) copy first (docs/TIERS.md).

    Trainer-specific (None: the trainer's default, ``TRAINER_FIELDS``; a trainer refuses fields it
    does not read): ``dispatch_batches`` (DDPTrainer, FSDPTrainer): True, rank 0 loads each global
    batch and scatters a slice to every rank (dataset state GLOBAL); False, every rank loads its own
    shard (dataset state PER_RANK). ``n_microbatches`` per batch (pipeline trainers; must divide the
    batch sizes), ``pipeline_schedule`` ("1F1B" or "GPipe"), ``pipeline_parallel_size`` (DPPPTrainer:
    stages per pipeline replica).
    """

    output_dir: str = "./checkpoints"
    max_steps: int | None = None
    num_train_epochs: int = 1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    learning_rate: float = 1e-3
    seed: int = 0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    preserve_n_best: int = 0
    eval_strategy: str = "no"
    eval_steps: int | None = None
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    load_best_model_at_end: bool = False
    resume_from_checkpoint: bool | str | None = None
    save_optimizer_state: bool = True
    save_scheduler_state: bool = True
    save_dataset_state: bool = True
    save_rng_state: bool = True
    async_save: bool = False
    async_staging: str = "blocking"
    async_upload: str = "thread"
    async_lazy_min_bytes: int = AsyncOptions.lazy_min_bytes
    validate_replication: bool = True
    logging_steps: int = 10
    dataloader_num_workers: int = 0
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    local_tier: LocalTier | str | None = None
    dispatch_batches: bool | None = None
    n_microbatches: int | None = None
    pipeline_schedule: str | None = None
    pipeline_parallel_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, os.PathLike):
            object.__setattr__(self, "output_dir", os.fspath(self.output_dir))
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise _field_error("output_dir", "a non-empty path or URL", self.output_dir)
        if self.max_steps == -1 and _is_int(self.max_steps):  # HF's spelling of "not set"
            object.__setattr__(self, "max_steps", None)
        for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size", "save_steps",
                     "logging_steps"):
            self._check_positive_int(name)
        for name in ("max_steps", "save_total_limit", "eval_steps", "n_microbatches", "pipeline_parallel_size"):
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
        self._check_choice("eval_strategy", EVAL_STRATEGIES)
        self._check_choice("lr_scheduler_type", LR_SCHEDULER_TYPES)
        self._check_choice("async_staging", STAGING_MODES)
        self._check_choice("async_upload", UPLOAD_MODES)
        if not _is_int(self.async_lazy_min_bytes) or self.async_lazy_min_bytes < 0:
            raise _field_error("async_lazy_min_bytes", "a non-negative int", self.async_lazy_min_bytes)
        if self.pipeline_schedule is not None:
            self._check_choice("pipeline_schedule", PIPELINE_SCHEDULES)
        for name in ("save_optimizer_state", "save_scheduler_state", "save_dataset_state", "save_rng_state",
                     "async_save", "validate_replication", "load_best_model_at_end"):
            if not isinstance(getattr(self, name), bool):
                raise _field_error(name, "<bool>", getattr(self, name))
        for name in ("greater_is_better", "dispatch_batches"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise _field_error(name, "<bool> or None", getattr(self, name))
        resume = self.resume_from_checkpoint
        if isinstance(resume, os.PathLike):
            object.__setattr__(self, "resume_from_checkpoint", os.fspath(resume))
        elif not (resume is None or isinstance(resume, (bool, str))) or resume == "":
            raise _field_error("resume_from_checkpoint", "True/False/None or a checkpoint path", resume)
        if not isinstance(self.storage_options, Mapping):
            raise _field_error("storage_options", "a mapping", self.storage_options)
        object.__setattr__(self, "storage_options", dict(self.storage_options))
        if isinstance(self.local_tier, (str, os.PathLike)):
            object.__setattr__(self, "local_tier", LocalTier(os.fspath(self.local_tier)))
        elif self.local_tier is not None and not isinstance(self.local_tier, LocalTier):
            raise _field_error("local_tier", "a LocalTier, a local directory or None", self.local_tier)
        self._resolve_evaluation()
        self._check_combinations()

    def _check_positive_int(self, name: str, expected: str = "a positive int") -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < 1:
            raise _field_error(name, expected, value)

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise _field_error(name, f"one of {', '.join(map(repr, choices))}", value)

    def _resolve_evaluation(self) -> None:
        """HF's defaults: eval_steps from logging_steps, the metric "eval_"-prefixed, its direction."""
        if self.eval_strategy == "steps" and self.eval_steps is None:
            object.__setattr__(self, "eval_steps", self.logging_steps)
        if self.eval_strategy != "steps" and self.eval_steps is not None:
            raise ValueError(f"TrainingArguments.eval_steps={self.eval_steps} has no effect with "
                             f"eval_strategy={self.eval_strategy!r}; set eval_strategy='steps'")
        metric = self.metric_for_best_model
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise _field_error("metric_for_best_model", "a metric name", metric)
        object.__setattr__(self, "metric_for_best_model", self.ranking_metric)
        object.__setattr__(self, "greater_is_better", self.ranking_greater_is_better)

    # metric_for_best_model and greater_is_better hold these values once built; the properties give
    # them their resolved types (str, bool).
    @property
    def ranking_metric(self) -> str:
        """``metric_for_best_model`` with HF's default ("eval_loss" when evaluating, else "train_loss")
        and the "eval_" prefix applied."""
        metric = self.metric_for_best_model
        if metric is None:
            return "eval_loss" if self.eval_strategy != "no" else TRAIN_LOSS
        return metric if metric == TRAIN_LOSS or metric.startswith("eval_") else f"eval_{metric}"

    @property
    def ranking_greater_is_better(self) -> bool:
        """``greater_is_better``, by default False for a metric ending in "loss", else True."""
        if self.greater_is_better is None:
            return not self.ranking_metric.endswith("loss")
        return self.greater_is_better

    def _check_combinations(self) -> None:
        if self.save_strategy == "no":
            for name, unset in (("save_total_limit", None), ("preserve_n_best", 0), ("async_save", False),
                                ("async_staging", "blocking"), ("async_upload", "thread"),
                                ("async_lazy_min_bytes", AsyncOptions.lazy_min_bytes),
                                ("load_best_model_at_end", False)):
                if getattr(self, name) != unset:
                    raise ValueError(
                        f"TrainingArguments.{name}={getattr(self, name)!r} needs checkpoints, but "
                        "save_strategy is 'no'")
        if not self.async_save:
            for name, unset in (("async_staging", "blocking"), ("async_upload", "thread"),
                                ("async_lazy_min_bytes", AsyncOptions.lazy_min_bytes)):
                if getattr(self, name) != unset:
                    raise ValueError(f"TrainingArguments.{name}={getattr(self, name)!r} applies to async saves; "
                                     "set async_save=True")
        metric = self.metric_for_best_model
        ranked = self.preserve_n_best or self.load_best_model_at_end
        if ranked and metric != TRAIN_LOSS and self.eval_strategy == "no":
            raise ValueError(
                f"TrainingArguments.eval_strategy must be 'steps' or 'epoch': metric_for_best_model={metric!r} "
                "is an evaluation metric, and checkpoints are ranked by it (preserve_n_best="
                f"{self.preserve_n_best}, load_best_model_at_end={self.load_best_model_at_end})")
        if self.load_best_model_at_end and metric != TRAIN_LOSS:
            # As in HF: every checkpoint then carries the evaluation of its own step.
            if self.eval_strategy != self.save_strategy:
                raise ValueError(
                    f"TrainingArguments.load_best_model_at_end needs eval_strategy ({self.eval_strategy!r}) "
                    f"and save_strategy ({self.save_strategy!r}) to match")
            # Both strategies "steps": eval_steps is set (eval_steps is None otherwise).
            if self.eval_steps is not None and self.save_steps % self.eval_steps:
                raise ValueError(
                    f"TrainingArguments.load_best_model_at_end needs save_steps={self.save_steps} to be a "
                    f"multiple of eval_steps={self.eval_steps}")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps and self.lr_scheduler_type != "constant":
            raise ValueError(
                f"TrainingArguments.warmup_steps={self.warmup_steps} must be below max_steps={self.max_steps} "
                f"for lr_scheduler_type={self.lr_scheduler_type!r}")

    @property
    def resume_target(self) -> bool | str:
        """False (start fresh), True (latest committed checkpoint, if any) or a checkpoint path."""
        return self.resume_from_checkpoint or False

    def trainer_field(self, name: str) -> Any:
        """A trainer-specific field's value, or the default a trainer that reads it uses."""
        value = getattr(self, name)
        return TRAINER_FIELDS[name] if value is None else value

    def trainer_fields_set(self) -> list[str]:
        """The trainer-specific fields given a value (each must be read by the trainer)."""
        return [name for name in TRAINER_FIELDS if getattr(self, name) is not None]

    def checkpoint_policy(self) -> CheckpointPolicy:
        """What the trainer's ``CheckpointManager`` needs: where, when, what to keep, which metric ranks.
        With ``load_best_model_at_end`` the best checkpoint is preserved (as in HF)."""
        return CheckpointPolicy(
            output_dir=self.output_dir, save_strategy=self.save_strategy, save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            preserve_n_best=max(self.preserve_n_best, int(self.load_best_model_at_end)),
            metric_for_best_model=self.ranking_metric, greater_is_better=self.ranking_greater_is_better,
            async_save=self.async_save, validate_replication=self.validate_replication,
            async_options=AsyncOptions(staging=self.async_staging, upload=self.async_upload,
                                       lazy_min_bytes=self.async_lazy_min_bytes),
            training_args_hash=self.training_hash(), storage_options=self.storage_options,
            local_tier=self.local_tier if isinstance(self.local_tier, LocalTier) else None)

    def to_dict(self) -> dict[str, Any]:
        """Every field except storage_options (which may hold credentials)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "storage_options"}

    def training_hash(self) -> str:
        """A short stable hash of what is trained (not where it is stored or whether it resumes)."""
        fields = {k: v for k, v in self.to_dict().items() if k not in _UNHASHED}
        fields["class"] = type(self).__name__
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


DEPRECATED_ALIASES = ("DDPTrainingArguments", "PipelineTrainingArguments")


def deprecated_alias(name: str) -> type[TrainingArguments]:
    """``TrainingArguments`` under a name it had before every trainer shared one class."""
    warnings.warn(f"{name} is deprecated: every trainer takes TrainingArguments, which now holds its fields",
                  DeprecationWarning, stacklevel=3)
    return TrainingArguments


def __getattr__(name: str) -> Any:
    if name in DEPRECATED_ALIASES:
        return deprecated_alias(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
