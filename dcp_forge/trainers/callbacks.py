"""Trainer callbacks: hooks into the training loop, optionally with state saved in checkpoints.

Call protocol: every rank calls every hook at the same point with the same arguments (losses and
metrics are global means, identical on all ranks), so a callback decides the same thing everywhere
without communicating. A callback that has ``state_dict()`` / ``load_state_dict()`` is *stateful*:
its state is saved with every checkpoint (component ``callbacks``, REPLICATED) and restored on resume,
keyed by its ``name``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .state import TrainerControl, TrainerState

__all__ = ["DivergenceDetector", "TrainerCallback", "is_stateful"]


class TrainerCallback:
    """Base class: override the hooks you need. ``name`` keys a stateful callback's saved state."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def on_train_begin(self, state: TrainerState, control: TrainerControl) -> None:
        """After set-up and resume, before the first step of this ``train()`` call."""

    def on_step_end(self, state: TrainerState, control: TrainerControl, logs: Mapping[str, float]) -> None:
        """After each optimizer step; ``logs`` has "loss" (global mean) and "learning_rate"."""

    def on_evaluate(self, state: TrainerState, control: TrainerControl, metrics: Mapping[str, float]) -> None:
        """After an evaluation; ``metrics`` are "eval_"-prefixed global means."""

    def on_save(self, state: TrainerState, checkpoint_path: str) -> None:
        """After a checkpoint was saved (with async saves: handed to the background writer)."""

    def on_train_end(self, state: TrainerState, control: TrainerControl) -> None:
        """At the end of ``train()``, also when a callback stopped the run."""


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

    def on_step_end(self, state: TrainerState, control: TrainerControl, logs: Mapping[str, float]) -> None:
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
