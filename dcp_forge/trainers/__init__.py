"""Trainers for dcp_forge: TrainingArguments, CheckpointManager and thin trainers for every parallelism,
plus a tiny causal LM, synthetic data and training strategies so demos and tests need no downloads.

Each trainer declares its state with ``get_state_components()`` / ``get_process_groups()`` (the
sharing patterns of its parallelism) and checkpoints through a ``CheckpointManager``; see ``base.py`` for the
call protocol. Every trainer takes one ``TrainingArguments``, and the loop follows Hugging Face's
``Trainer`` (``train(resume_from_checkpoint=...)``, ``TrainerCallback`` events, ``eval_strategy``,
``load_best_model_at_end``); a trainer is a context manager that closes itself. Needs the
``trainers`` extra (torchdata); ``AccelTrainer`` also needs ``accelerate``.
"""

from typing import Any

from ..manager.manager import CheckpointManager
from ..manager.retention import CheckpointRecord, MetricCredit, RetentionPolicy, plan_retention
from . import args as _args
from .args import TrainingArguments
from .base import BaseTrainer, ComponentSharing, Trainer
from .callbacks import DivergenceDetector, TrainerCallback
from .data_parallel import AccelTrainer, DDPTrainer, FSDPTrainer
from .dispatch import DataloaderDispatcher
from .pipeline import DPPPTrainer, PipelineTrainer
from .state import TrainerControl, TrainerState, TrainOutput
from .strategies import DPOStrategy, PPOStrategy, PretrainStrategy, SFTStrategy, TrainingStrategy
from .tensor_parallel import DPTPTrainer
from .tiny_lm import TinyLM, TinyLMConfig

__all__ = [
    "AccelTrainer", "BaseTrainer", "CheckpointManager", "ComponentSharing", "CheckpointRecord", "DDPTrainer",
    "DPOStrategy", "DPPPTrainer", "DPTPTrainer", "DataloaderDispatcher", "DivergenceDetector", "FSDPTrainer",
    "MetricCredit", "PPOStrategy", "PipelineTrainer", "PretrainStrategy",
    "RetentionPolicy", "SFTStrategy", "TinyLM", "TinyLMConfig", "TrainOutput", "Trainer",
    "TrainerCallback", "TrainerControl", "TrainerState", "TrainingArguments", "TrainingStrategy", "plan_retention",
]


def __getattr__(name: str) -> Any:
    if name in _args.DEPRECATED_ALIASES:  # old names of TrainingArguments, with a DeprecationWarning
        return _args.deprecated_alias(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
