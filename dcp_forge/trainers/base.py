"""BaseTrainer: the training loop and checkpoint wiring every trainer shares; Trainer: one device.

A trainer is thin: it says how the model is spread over ranks (``_setup_parallelism``), where batches
come from (``_build_train_dataloader``), how a step runs forward and backward, and how each piece of
state is shared (``sharing()``, from which ``get_state_components()`` is built). The loop, the
checkpoint schedule, evaluation, callbacks and resuming live here once.

Call protocol, on every rank:

1. ``__init__``: validates its arguments; no communication.
2. ``setup()`` (``train()`` calls it): collective. Wraps the model, builds the dataloader, optimizer,
   LR scheduler and the ``CheckpointManager`` (whose coordinator construction is collective too).
3. ``train()``: collective. Resumes if asked, runs the loop, saves on schedule; returns TrainOutput.
4. ``evaluate()``, ``save_checkpoint()``, ``load_checkpoint()``: collective, between or after runs.
5. ``close()``: collective, last (before ``dist.destroy_process_group()``): waits for an async save
   in flight and frees the checkpointing groups. A trainer is a context manager that closes itself:
   ``with DDPTrainer(...) as trainer: trainer.train()``.

The loop follows Hugging Face's ``Trainer``: ``train(resume_from_checkpoint=...)``, one
``TrainingArguments`` for every trainer, ``TrainerCallback`` events with HF's names and signatures
(callbacks.py), ``eval_strategy``, ``metric_for_best_model`` and ``load_best_model_at_end``.

Determinism: batches come from ``StatefulDataLoader``s whose order depends only on (seed, epoch),
the global RNGs are seeded once from ``args.seed`` plus the data-parallel rank (model-parallel peers
share a stream, so dropout on their replicated activations agrees), and every loss that callbacks,
logs and checkpoints see is a global mean, identical on all ranks. With dataset, RNG, optimizer and
scheduler state saved, a resumed run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import abc
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..core.components import StateComponent
from ..core.patterns import SharingPattern, ValidationLevel
from ..errors import CheckpointNotFoundError, describe_type
from ..manager.manager import CheckpointManager
from ..rng import RNGState
from ..storage import redact_url
from ..teardown import ClosesOnExit
from .args import TRAINER_FIELDS, TrainingArguments
from .callbacks import TrainerCallback, is_stateful
from .data import make_dataloader
from .state import StatefulGroup, TrainerControl, TrainerState, TrainOutput
from .strategies import PretrainStrategy, TrainingStrategy

__all__ = ["BaseTrainer", "ComponentSharing", "Trainer", "build_lr_scheduler", "seed_everything"]

logger = logging.getLogger(__name__)

_C = TypeVar("_C")

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

# Component keys in checkpoints, in declaration order. Strategy modules (a PPO critic, a DPO
# reference) follow under their own names.
CORE_COMPONENTS = ("model", "optimizer", "scheduler", "dataset", "trainer", "callbacks", "rng")


@dataclass(frozen=True)
class ComponentSharing:
    """How one component is shared: a pattern, its group (PER_GROUP) and replication checking."""

    pattern: SharingPattern
    process_group_name: str | None = None
    validation: ValidationLevel | None = None  # None: not checked at save


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """HF-style schedules: linear warm-up over ``warmup_steps``, then constant, linear decay to 0 or
    cosine decay to 0 at ``total_steps``."""
    warmup, kind = args.warmup_steps, args.lr_scheduler_type

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class BaseTrainer(ClosesOnExit, abc.ABC):
    """The shared loop; see the module docstring for the call protocol.

    ``train_dataset`` / ``eval_dataset``: map-style datasets of dict items (``data.py`` has
    synthetic ones). ``strategy`` turns batches into a loss (default ``PretrainStrategy``).
    ``optimizer_factory(params)`` builds the optimizer (default AdamW at ``args.learning_rate``).
    ``callbacks``: ``TrainerCallback``s (or any object with HF-style ``on_<event>`` methods);
    stateful ones are checkpointed.
    """

    # The trainer-specific TrainingArguments fields (args.TRAINER_FIELDS) this trainer reads; any
    # other one set in its arguments is refused rather than ignored.
    trainer_fields: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(set(cls.trainer_fields) - set(TRAINER_FIELDS))
        if unknown:
            raise TypeError(f"{cls.__name__}.trainer_fields names {unknown}, which are not trainer-specific "
                            f"TrainingArguments fields ({sorted(TRAINER_FIELDS)})")

    def __init__(self, model: nn.Module, args: TrainingArguments, train_dataset: Dataset, *,
                 eval_dataset: Dataset | None = None, strategy: TrainingStrategy | None = None,
                 optimizer_factory: OptimizerFactory | None = None,
                 callbacks: Sequence[TrainerCallback] = ()) -> None:
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"{type(self).__name__} needs args of type TrainingArguments (got {describe_type(args)})")
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be an nn.Module (got a {type(model).__name__})")
        self._refuse_unread_fields(args)
        if args.eval_strategy != "no" and eval_dataset is None:
            raise ValueError(f"TrainingArguments.eval_strategy={args.eval_strategy!r} needs an eval_dataset")
        self.args = args
        self.model = model
        self.train_model: nn.Module = model  # what the forward pass calls (a DDP wrapper, say)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.strategy = strategy if strategy is not None else PretrainStrategy()
        if not isinstance(self.strategy, TrainingStrategy):
            raise TypeError(f"strategy must be a TrainingStrategy (got a {type(self.strategy).__name__})")
        self.optimizer_factory = optimizer_factory or self._default_optimizer
        self.callbacks = list(callbacks)
        names = [callback_name(cb) for cb in self.callbacks if is_stateful(cb)]
        if len(set(names)) != len(names):
            raise ValueError(f"stateful callbacks need distinct names to be checkpointed (got {names})")
        self.aux_modules = dict(self.strategy.auxiliary_modules())
        clash = set(self.aux_modules) & set(CORE_COMPONENTS)
        if clash:
            raise ValueError(f"strategy modules {sorted(clash)} clash with the trainer's component keys")
        self._check_strategy()
        self.state = TrainerState()
        self.control = TrainerControl()
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.train_dataloader: Any = None
        self.manager: CheckpointManager | None = None
        self._rng = RNGState()
        self._manager_state = _ManagerState(self)
        self._callback("on_init_end")

    def _refuse_unread_fields(self, args: TrainingArguments) -> None:
        unread = [name for name in args.trainer_fields_set() if name not in self.trainer_fields]
        if unread:
            name = unread[0]
            readers = sorted({cls.__name__ for cls in _subclasses(BaseTrainer) if name in cls.trainer_fields})
            raise ValueError(f"TrainingArguments.{name}={getattr(args, name)!r} is set, but {type(self).__name__} "
                             f"does not use it (it is for {', '.join(readers) or 'no trainer'}); leave it unset")

    # --- callbacks ------------------------------------------------------------------------------
    def add_callback(self, callback: TrainerCallback) -> None:
        """Add a callback (HF's ``Trainer.add_callback``); before ``setup()`` if it is stateful."""
        if is_stateful(callback):
            name = callback_name(callback)
            if self.manager is not None:
                raise RuntimeError(f"{type(self).__name__}.add_callback: stateful callback {name!r} must be added "
                                   "before setup() (its state is a checkpoint component)")
            if name in {callback_name(cb) for cb in self.callbacks if is_stateful(cb)}:
                raise ValueError(f"stateful callbacks need distinct names to be checkpointed ({name!r} twice)")
        self.callbacks.append(callback)

    def _callback(self, event: str, **kwargs: Any) -> None:
        """Call ``event`` on every callback with HF's arguments: (args, state, control, model=...,
        optimizer=..., lr_scheduler=..., train_dataloader=..., **kwargs)."""
        for cb in self.callbacks:
            hook = getattr(cb, event, None)
            if hook is not None:
                hook(self.args, self.state, self.control, model=self.model, optimizer=self.optimizer,
                     lr_scheduler=self.lr_scheduler, train_dataloader=self.train_dataloader, **kwargs)

    # --- what subclasses provide ----------------------------------------------------------------
    def _check_strategy(self) -> None:  # noqa: B027 (optional hook)
        """Raise if this trainer cannot run ``self.strategy`` (at construction)."""

    def _refuse_trainable_strategy_modules(self) -> None:
        trainable = [n for n, m in self.aux_modules.items() if any(p.requires_grad for p in m.parameters())]
        if trainable:
            raise ValueError(f"{type(self).__name__} cannot train the strategy's modules {trainable} (they "
                             "are not spread over the ranks like the model); use Trainer or DDPTrainer")

    def _setup_parallelism(self) -> None:  # noqa: B027 (optional hook)
        """Collective: spread ``self.model`` over the ranks, set ``self.train_model``."""

    @abc.abstractmethod
    def _build_train_dataloader(self) -> Any:
        """A resumable iterable of batches (StatefulDataLoader or DataloaderDispatcher)."""

    @abc.abstractmethod
    def sharing(self) -> dict[str, ComponentSharing]:
        """How each component in CORE_COMPONENTS (and each strategy module) is shared."""

    def get_process_groups(self) -> dict[str, Any]:
        """Named process groups that PER_GROUP components refer to."""
        return {}

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel coordinate (which shard of the data it trains on)."""
        return 0

    @property
    def dp_size(self) -> int:
        return 1

    def _trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for module in self.aux_modules.values():
            params += [p for p in module.parameters() if p.requires_grad]
        return params

    def _build_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self._trainable_parameters())

    def _optimizer_stateful(self) -> Any:
        return self.optimizer

    def _forward_backward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Run one batch forward and backward; returns this rank's detached loss."""
        loss, _ = self.strategy.compute_loss(self.train_model, self.strategy.prepare_batch(batch))
        self._backward(loss)
        return loss.detach()

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _synchronize_gradients(self) -> None:  # noqa: B027 (optional hook)
        """Make gradients what the optimizer should apply (DDP does it inside backward)."""

    def _global_mean(self, value: torch.Tensor) -> float:
        """The mean of ``value`` over the data-parallel replicas, identical on every rank."""
        return float(value)

    def _eval_batches(self, dataset: Dataset) -> Iterable[Mapping[str, Any]]:
        """This rank's share of ``dataset`` (stateless: rebuilt for each evaluation)."""
        return make_dataloader(dataset, self.args.per_device_eval_batch_size, shuffle=False,
                               drop_last=False, num_shards=self.dp_size, shard_index=self.dp_rank)

    def _evaluate_batch(self, batch: Mapping[str, Any]) -> dict[str, float]:
        return self.strategy.compute_metrics(self.train_model, self.strategy.prepare_batch(batch))

    # --- components -----------------------------------------------------------------------------
    def _statefuls(self) -> dict[str, Any]:
        statefuls = {
            "model": self.model,
            "optimizer": self._optimizer_stateful(),
            "scheduler": self.lr_scheduler,
            "dataset": self.train_dataloader,
            "trainer": StatefulGroup({"progress": self.state, "checkpointing": self._manager_state}),
            "rng": self._rng,
        }
        stateful_callbacks = {callback_name(cb): cb for cb in self.callbacks if is_stateful(cb)}
        if stateful_callbacks:
            statefuls["callbacks"] = StatefulGroup(stateful_callbacks)
        statefuls.update(self.aux_modules)
        return statefuls

    def get_state_components(self) -> list[StateComponent]:
        """The components checkpoints hold, with the patterns of ``sharing()``. After ``setup()``.

        ``save_optimizer_state`` / ``save_scheduler_state`` / ``save_dataset_state`` /
        ``save_rng_state`` False leave that component out (it is neither saved nor resumed).
        """
        if self.optimizer is None:
            raise RuntimeError(f"{type(self).__name__}.get_state_components() needs setup() (or train()) first")
        flags = {"optimizer": self.args.save_optimizer_state, "scheduler": self.args.save_scheduler_state,
                 "dataset": self.args.save_dataset_state, "rng": self.args.save_rng_state}
        sharing = self.sharing()
        components = []
        for key, stateful in self._statefuls().items():
            if not flags.get(key, True):
                continue
            how = sharing[key] if key in sharing else sharing["model"]  # strategy modules follow the model
            components.append(StateComponent(
                key=key, stateful=stateful, sharing_pattern=how.pattern, process_group_name=how.process_group_name,
                validate_replication=how.validation is not None,
                validation_level=how.validation or ValidationLevel.TENSOR))
        return components

    # --- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Collective and idempotent: everything ``train()`` needs, without training."""
        if self.manager is not None:
            return
        self._setup_parallelism()
        seed_everything(self.args.seed + self.dp_rank)
        self.train_dataloader = self._build_train_dataloader()
        if len(self.train_dataloader) == 0:
            raise ValueError(f"{type(self).__name__}: train_dataset yields no full batch of "
                             f"per_device_train_batch_size={self.args.per_device_train_batch_size} on this rank")
        self.optimizer = self._build_optimizer()
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.args, self.total_steps)
        self.manager = CheckpointManager(self.args.checkpoint_policy(), self.get_state_components(), self.get_process_groups())
        # Overlapped async staging copies parameters and optimizer state while the next forward and
        # backward passes run; the optimizer step, where they change, waits for what is left.
        self.manager.coordinator.install_step_hook(self.optimizer)

    def _checkpointing(self) -> CheckpointManager:
        """The checkpoint manager, after ``setup()`` (collective the first time, a no-op after)."""
        self.setup()
        assert self.manager is not None  # setup() builds it, and nothing unsets it
        return self.manager

    @property
    def total_steps(self) -> int:
        if self.args.max_steps is not None:
            return self.args.max_steps
        return self.args.num_train_epochs * len(self.train_dataloader)

    def _default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.args.learning_rate)

    # --- the loop -------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = None) -> TrainOutput:
        """Train to ``max_steps`` (or ``num_train_epochs``), saving on schedule. Collective.

        ``resume_from_checkpoint`` as in HF's ``Trainer.train``: None follows
        ``args.resume_from_checkpoint`` (where True starts fresh when there is nothing to resume);
        True resumes from the latest committed checkpoint in ``output_dir`` and raises
        ``CheckpointNotFoundError`` when there is none; a path resumes from that checkpoint; False
        starts fresh.
        """
        target = self._resume_target(resume_from_checkpoint)
        manager = self._checkpointing()
        manager.prepare_output_dir(resuming=target is not False)
        resumed_from = manager.resume(target) if target is not False else None
        if resume_from_checkpoint is True and resumed_from is None:
            raise CheckpointNotFoundError(f"train(resume_from_checkpoint=True): no committed checkpoint in "
                                          f"output_dir {redact_url(self.args.output_dir)}")
        if resumed_from is not None and manager.rank == 0:
            logger.info("resumed from %s at step %d", redact_url(resumed_from), self.state.global_step)
        self.control = TrainerControl()
        self.state.max_steps = self.total_steps
        self.state.is_world_process_zero = manager.rank == 0
        self._callback("on_train_begin")
        step_losses: list[float] = []
        metrics: dict[str, float] = {}
        self.train_model.train()
        while not self._done() and not self.control.should_training_stop:
            self.control.should_epoch_stop = False
            self._callback("on_epoch_begin")
            epoch_ended = True
            for batch in self.train_dataloader:
                self._callback("on_step_begin")
                loss = self._train_step(batch)
                step_losses.append(loss)
                metrics.update(self._after_step(loss))
                if self.control.should_training_stop or self._done(within_epoch=True):
                    epoch_ended = False
                    break
                if self.control.should_epoch_stop:
                    break
            if epoch_ended:
                self.state.epoch += 1
                self._callback("on_epoch_end")
                if not self.control.should_training_stop:
                    metrics.update(self._log_evaluate_save(None, epoch_end=True))
        if self.control.should_training_stop:
            reason = self.control.stop_reason or "stopped by a callback"
            if manager.rank == 0:
                logger.warning("training stopped at step %d: %s", self.state.global_step, reason)
        else:
            reason = "max_steps" if self.args.max_steps is not None else "num_train_epochs"
            if manager.should_save(self.state.global_step, final=True):
                self.save_checkpoint()
        manager.settle()  # an async save in flight commits (and retention runs) before we report
        self._note_best_checkpoint()
        if self.args.load_best_model_at_end:
            self._load_best_model()
        self._callback("on_train_end")
        return TrainOutput(global_step=self.state.global_step, step_losses=step_losses, stop_reason=reason,
                           last_checkpoint=manager.last_checkpoint,
                           best_checkpoint=manager.best_checkpoint(), resumed_from=resumed_from,
                           metrics=metrics)

    def _resume_target(self, resume_from_checkpoint: bool | str | os.PathLike | None) -> bool | str:
        if resume_from_checkpoint is None:
            return self.args.resume_target
        if isinstance(resume_from_checkpoint, os.PathLike):
            resume_from_checkpoint = os.fspath(resume_from_checkpoint)
        if not isinstance(resume_from_checkpoint, (bool, str)) or resume_from_checkpoint == "":
            raise TypeError(f"train(resume_from_checkpoint=...) must be True/False/None or a checkpoint path "
                            f"(got {describe_type(resume_from_checkpoint)})")
        return resume_from_checkpoint

    def _done(self, within_epoch: bool = False) -> bool:
        if self.args.max_steps is not None:
            return self.state.global_step >= self.args.max_steps
        # Epoch-bounded runs end when the last epoch's loader runs out, so its end-of-epoch save happens.
        return not within_epoch and self.state.epoch >= self.args.num_train_epochs

    def _train_step(self, batch: Mapping[str, Any]) -> float:
        optimizer, scheduler = self.optimizer, self.lr_scheduler
        assert optimizer is not None and scheduler is not None  # train() ran setup(), which builds both
        loss = self._forward_backward(batch)
        self._synchronize_gradients()
        self._callback("on_pre_optimizer_step")
        optimizer.step()
        self._callback("on_optimizer_step")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        return self._global_mean(loss)

    def _after_step(self, loss: float) -> dict[str, float]:
        self.state.loss_sum += loss
        self.state.loss_count += 1
        assert self.lr_scheduler is not None  # train() ran setup(), which builds it
        logs = {"loss": loss, "learning_rate": float(self.lr_scheduler.get_last_lr()[0])}
        self._callback("on_step_end", logs=logs)
        if self.control.should_training_stop:
            return {}
        return self._log_evaluate_save(logs, epoch_end=False)

    def _log_evaluate_save(self, logs: Mapping[str, float] | None, *, epoch_end: bool) -> dict[str, float]:
        """After a step (``logs``) or an epoch end: log, evaluate and save as scheduled or as a
        callback requested through ``control``, in HF's order. Returns the evaluation's metrics."""
        step, args, control, manager = self.state.global_step, self.args, self.control, self._checkpointing()
        if logs is not None and step % args.logging_steps == 0:
            control.should_log = True
        # eval_steps is set whenever eval_strategy is "steps" (TrainingArguments fills it in).
        if (args.eval_strategy == "epoch" and epoch_end) or (
                args.eval_strategy == "steps" and not epoch_end and args.eval_steps is not None
                and step % args.eval_steps == 0):
            control.should_evaluate = True
        if manager.should_save(step, epoch_end=epoch_end, final=not epoch_end and self._done(within_epoch=True)):
            control.should_save = True
        metrics: dict[str, float] = {}
        if control.should_log:
            control.should_log = False
            self.log(dict(logs or {}))
        if control.should_evaluate:
            control.should_evaluate = False
            metrics = self.evaluate()
        if control.should_save:
            control.should_save = False
            # A stopped run saves nothing more; a step is saved once; save_strategy "no" never saves.
            if (not control.should_training_stop and args.save_strategy != "no"
                    and step not in (0, manager.last_saved_step)):
                self.save_checkpoint()
        return metrics

    def log(self, logs: Mapping[str, float]) -> None:
        """Record ``logs`` at this step (with "epoch" and "step") in ``state.log_history``, log them
        on rank 0 and call ``on_log`` (HF's ``Trainer.log``)."""
        entry = {**logs, "epoch": self.state.epoch, "step": self.state.global_step}
        self.state.log_history.append(entry)
        if self.manager is not None and self.manager.rank == 0:
            logger.info("step %d: %s", self.state.global_step,
                        ", ".join(f"{k} {v:.5g}" for k, v in logs.items() if isinstance(v, float)))
        self._callback("on_log", logs=entry)

    # --- evaluation and checkpoints -------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean strategy metrics over ``eval_dataset``, "eval_"-prefixed; counts toward the ranking
        metric of the next checkpoint, is logged (``on_log``) and reported to ``on_evaluate``. Collective."""
        eval_dataset = self.eval_dataset
        if eval_dataset is None:
            raise ValueError(f"{type(self).__name__}.evaluate() needs an eval_dataset")
        manager = self._checkpointing()
        self.train_model.eval()
        sums: dict[str, float] = {}
        batches = 0
        try:
            for batch in self._eval_batches(eval_dataset):
                for key, value in self._evaluate_batch(batch).items():
                    sums[key] = sums.get(key, 0.0) + value
                batches += 1
        finally:
            self.train_model.train()
        keys = sorted(sums)
        local = torch.tensor([sums[k] / max(batches, 1) for k in keys], dtype=torch.float64)
        means = self._global_mean_vector(local)
        metrics = {f"eval_{k}": float(v) for k, v in zip(keys, means, strict=True)}
        manager.observe(metrics)
        self.log(metrics)
        self._callback("on_evaluate", metrics=metrics)
        return metrics

    def _global_mean_vector(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def save_checkpoint(self) -> str:
        """Save every component now as ``checkpoint-<global_step>`` (then apply retention). Collective."""
        manager = self._checkpointing()
        mean_loss = self.state.take_mean_loss()
        logs = {} if mean_loss is None else {"train_loss": mean_loss}
        manager.observe(logs)
        path = manager.save(step=self.state.global_step, epoch=self.state.epoch, logs=logs)
        self._note_best_checkpoint()
        self._callback("on_save", checkpoint_path=path)
        return path

    def _note_best_checkpoint(self) -> None:
        manager = self._checkpointing()
        if manager.retention.preserve_n_best:
            self.state.best_model_checkpoint = manager.best_checkpoint()

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the model (and strategy modules) of the best checkpoint."""
        manager = self._checkpointing()
        best = manager.best_checkpoint()
        if best is None or (best == manager.last_checkpoint and manager.last_saved_step == self.state.global_step):
            return  # the model in memory is the best checkpoint's
        manager.coordinator.load_checkpoint(best, components=["model", *self.aux_modules])
        if manager.rank == 0:
            logger.info("loaded the best model (by %s) from %s", self.args.metric_for_best_model, redact_url(best))

    def load_checkpoint(self, path: str | None = None, strict: bool = True) -> Any:
        """Load a checkpoint (default: the latest committed one) into every component; returns the
        coordinator's path-like ``LoadResult``. Collective."""
        manager = self._checkpointing()
        manager.settle()
        loaded = manager.coordinator.load_checkpoint(path, strict=strict)
        manager.last_checkpoint = os.fspath(loaded)
        return loaded

    def close(self) -> None:
        """Wait for an async save in flight, then free the checkpointing process groups and staging
        buffers. Collective and idempotent; call it before ``dist.destroy_process_group()`` (leaving a
        ``with`` block does)."""
        if self.manager is not None:
            self.manager.close()



def callback_name(callback: Any) -> str:
    """The key a stateful callback's state is saved under."""
    return str(getattr(callback, "name", type(callback).__name__))


def _subclasses(cls: type[_C]) -> list[type[_C]]:
    out: list[type[_C]] = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


class _ManagerState:
    """The manager's resumable bits (pending metric credit, last saved step), as a Stateful that
    exists before the manager does (components are declared while the manager is being built)."""

    def __init__(self, trainer: BaseTrainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return self.trainer.manager.state_dict() if self.trainer.manager else {"pending_metric": None,
                                                                             "last_saved_step": None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        manager = self.trainer.manager
        assert manager is not None  # loads run through the manager's coordinator, so the manager exists
        manager.load_state_dict(state)


class Trainer(BaseTrainer):
    """Single-device training. Every component is GLOBAL except the RNG (PER_RANK,
    so a checkpoint's layout does not change when the job later runs on more ranks)."""

    def _build_train_dataloader(self) -> Any:
        return make_dataloader(self.train_dataset, self.args.per_device_train_batch_size, shuffle=True,
                               seed=self.args.seed, num_workers=self.args.dataloader_num_workers)

    def sharing(self) -> dict[str, ComponentSharing]:
        g = ComponentSharing(SharingPattern.GLOBAL)
        return {"model": g, "optimizer": g, "scheduler": g, "dataset": g, "trainer": g, "callbacks": g,
                "rng": ComponentSharing(SharingPattern.PER_RANK)}
