"""Trainer callbacks: hooks into the training loop, optionally with state saved in checkpoints.

The events and their signatures follow Hugging Face's ``transformers.TrainerCallback``
(``on_step_end(args, state, control, **kwargs)`` ...). Call protocol: every rank calls every event at
the same point with the same arguments (losses and metrics are global means, identical on all
ranks), so a callback decides the same thing everywhere without communicating. A callback that has
``state_dict()`` / ``load_state_dict()`` is *stateful*: its state is saved with every checkpoint
(component ``callbacks``, REPLICATED) and restored on resume, keyed by its ``name``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .args import TrainingArguments
from .state import TrainerControl, TrainerState

__all__ = ["CALLBACK_EVENTS", "DivergenceDetector", "TrainerCallback", "is_stateful"]


class TrainerCallback:
    """Base class: override the events you need. Hugging Face's ``TrainerCallback`` shape: every event
    is ``on_<event>(self, args, state, control, **kwargs)``, and the trainer passes ``model``,
    ``optimizer``, ``lr_scheduler`` and ``train_dataloader`` as keyword arguments to each. Events,
    in order::

        on_init_end                       end of the trainer's __init__
        on_train_begin                    after set-up and resume, before the first step of train()
          on_epoch_begin                  (also for the rest of an epoch a resumed run continues)
            on_step_begin
            on_pre_optimizer_step         gradients synchronised, before optimizer.step()
            on_optimizer_step             after optimizer.step()
            on_step_end                   kwarg logs: {"loss": global mean, "learning_rate"}
            on_log                        on logging steps; kwarg logs
            on_evaluate                   after an evaluation; kwarg metrics ("eval_"-prefixed)
            on_save                       after a save; kwarg checkpoint_path (async: handed off)
          on_epoch_end
        on_train_end                      also when a callback stopped the run

    A callback steers the loop through ``control``: ``should_training_stop`` (or
    ``control.stop(reason)``) ends the run without saving the current state; ``should_log``,
    ``should_evaluate`` and ``should_save`` set in ``on_step_end`` / ``on_epoch_end`` log, evaluate or
    save at this step even off schedule. ``name`` keys a stateful callback's saved state.
    """

    @property
    def name(self) -> str:
        return type(self).__name__

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """At the end of the trainer's ``__init__``."""

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        """After set-up and resume, before the first step of this ``train()`` call."""

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """At the end of ``train()``, also when a callback stopped the run."""

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        """Before the first step of an epoch (or of what a resumed run has left of it)."""

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """After the last step of an epoch (``state.epoch`` already counts it)."""

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        """Before each training step's forward pass."""

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        """After the gradients are synchronised across ranks, before ``optimizer.step()``."""

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        """After ``optimizer.step()``, before the gradients are cleared."""

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """After each optimizer step; kwarg ``logs`` has "loss" (global mean) and "learning_rate"."""

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               **kwargs: Any) -> None:
        """On logging steps (every ``logging_steps``); kwarg ``logs`` (also appended to ``state.log_history``)."""

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """After an evaluation; kwarg ``metrics`` are "eval_"-prefixed global means."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """After a checkpoint was saved (async saves: handed to the background writer); kwarg
        ``checkpoint_path``."""


CALLBACK_EVENTS = tuple(name for name in vars(TrainerCallback) if name.startswith("on_"))


def is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


class DivergenceDetector(TrainerCallback):
    """Stops the run when the loss is NaN/inf, or when it exceeds ``spike_factor`` times a moving
    baseline for ``patience`` consecutive steps.

    The baseline is an exponential moving average of the losses that were not spikes (smoothing
    ``ema_beta``), so a spike never raises the bar for the next one; no spike is judged during the
    first ``warmup_steps`` steps, while the baseline settles. The state (baseline, counters, the
    trip) is saved with every checkpoint, so a resumed run judges exactly as the original would.

    A stopped run saves nothing more, so nothing after the divergence can displace a good
    checkpoint; ``TrainOutput.best_checkpoint`` names the one to resume from (the best by
    ``metric_for_best_model`` when ``preserve_n_best`` > 0, else the newest).
    """

    def __init__(self, *, spike_factor: float = 3.0, ema_beta: float = 0.9, warmup_steps: int = 10,
                 patience: int = 1, monitor: str = "loss") -> None:
        if not (isinstance(spike_factor, (int, float)) and spike_factor > 1):
            raise ValueError(f"DivergenceDetector.spike_factor must be a number > 1 (got {spike_factor!r})")
        if not (isinstance(ema_beta, (int, float)) and 0 <= ema_beta < 1):
            raise ValueError(f"DivergenceDetector.ema_beta must be in [0, 1) (got {ema_beta!r})")
        for field_name, value, low in (("warmup_steps", warmup_steps, 0), ("patience", patience, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"DivergenceDetector.{field_name} must be an int >= {low} (got {value!r})")
        self.spike_factor, self.ema_beta = float(spike_factor), float(ema_beta)
        self.warmup_steps, self.patience, self.monitor = warmup_steps, patience, monitor
        self.baseline: float | None = None
        self.seen = 0
        self.consecutive_spikes = 0
        self.tripped_at: int | None = None
        self.reason: str | None = None

    def judge(self, loss: float) -> str | None:
        """Account one loss; returns why the run diverged, or None. Pure apart from this object."""
        self.seen += 1
        if not math.isfinite(loss):
            return f"{self.monitor} is {loss}"
        if self.baseline is not None and self.seen > self.warmup_steps and loss > self.spike_factor * self.baseline:
            self.consecutive_spikes += 1
            if self.consecutive_spikes >= self.patience:
                return (f"{self.monitor} {loss:.4g} exceeded {self.spike_factor:g}x its moving baseline "
                        f"{self.baseline:.4g} for {self.consecutive_spikes} step(s)")
            return None
        self.consecutive_spikes = 0
        self.baseline = loss if self.baseline is None else self.ema_beta * self.baseline + (1 - self.ema_beta) * loss
        return None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        logs: Mapping[str, float] = kwargs.get("logs") or {}
        if self.monitor not in logs or self.tripped_at is not None:
            return
        reason = self.judge(float(logs[self.monitor]))
        if reason is not None:
            self.tripped_at, self.reason = state.global_step, reason
            control.stop(f"divergence at step {state.global_step}: {reason}")

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "seen": self.seen, "consecutive_spikes": self.consecutive_spikes,
                "tripped_at": self.tripped_at, "reason": self.reason}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.baseline = None if state["baseline"] is None else float(state["baseline"])
        self.seen = int(state["seen"])
        self.consecutive_spikes = int(state["consecutive_spikes"])
        self.tripped_at = None if state["tripped_at"] is None else int(state["tripped_at"])
        self.reason = state["reason"]
