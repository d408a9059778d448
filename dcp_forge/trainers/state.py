"""The trainer's own progress state, the control flags callbacks set, and what ``train()`` returns."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StatefulGroup", "TrainOutput", "TrainerControl", "TrainerState"]


@dataclass
class TrainerState:
    """Progress that a resumed run must continue from: saved as the ``trainer`` component.

    ``loss_sum`` / ``loss_count`` accumulate training losses since the previous save (the
    "train_loss" a checkpoint is ranked by); ``log_history`` holds one entry per logging step and
    per evaluation. As in HF's ``TrainerState``, callbacks also see ``max_steps`` (the step this
    run ends at), ``is_world_process_zero`` and ``best_model_checkpoint`` (the best preserved
    checkpoint, when checkpoints are ranked); these are set by the trainer, not saved.
    """

    global_step: int = 0
    epoch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    max_steps: int = 0
    is_world_process_zero: bool = True
    best_model_checkpoint: str | None = None

    def state_dict(self) -> dict[str, Any]:
        # The history travels as one JSON string: DCP would otherwise flatten every entry into its
        # own item, and JSON keeps it readable with plain tools.
        return {"global_step": self.global_step, "epoch": self.epoch, "loss_sum": self.loss_sum,
                "loss_count": self.loss_count, "log_history": json.dumps(self.log_history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"global_step", "epoch", "loss_sum", "loss_count", "log_history"} - set(state)
        if missing:
            raise ValueError(f"trainer state is missing {sorted(missing)} (got {sorted(state)})")
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.loss_sum = float(state["loss_sum"])
        self.loss_count = int(state["loss_count"])
        self.log_history = list(json.loads(state["log_history"]))

    def take_mean_loss(self) -> float | None:
        """The mean training loss since the previous save, resetting the accumulator."""
        mean = self.loss_sum / self.loss_count if self.loss_count else None
        self.loss_sum, self.loss_count = 0.0, 0
        return mean


@dataclass
class TrainerControl:
    """Flags callbacks set to steer the loop, with HF's names. ``should_training_stop`` ends the run
    (a stopped run does not save its current state; ``stop(reason)`` also says why);
    ``should_epoch_stop`` ends the current epoch; ``should_log`` / ``should_evaluate`` /
    ``should_save`` request that at the current step (the trainer clears each once done)."""

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False
    stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        """Stop training after this event, saying why (the first reason given wins)."""
        if not self.should_training_stop:
            self.should_training_stop, self.stop_reason = True, reason


@dataclass(frozen=True)
class TrainOutput:
    """What one ``train()`` call did. ``step_losses`` holds the global mean loss of every step this
    call ran (a resumed run starts after its checkpoint's step); ``best_checkpoint`` is the best
    preserved checkpoint, or the newest when none is ranked."""

    global_step: int
    step_losses: list[float]
    stop_reason: str
    last_checkpoint: str | None
    best_checkpoint: str | None
    resumed_from: str | None
    metrics: dict[str, float]

    @property
    def training_loss(self) -> float | None:
        """The mean loss of the steps this call ran (HF's ``TrainOutput.training_loss``)."""
        return sum(self.step_losses) / len(self.step_losses) if self.step_losses else None


class StatefulGroup:
    """Several statefuls saved as one component: ``{name: obj.state_dict()}``.

    DCP calls ``state_dict`` only on top-level values, so nesting statefuls needs this adapter.
    """

    def __init__(self, members: Mapping[str, Any]) -> None:
        for name, member in members.items():
            if not (callable(getattr(member, "state_dict", None)) and callable(getattr(member, "load_state_dict", None))):
                raise ValueError(f"StatefulGroup member {name!r} must have state_dict() and load_state_dict() "
                                 f"(got a {type(member).__name__})")
        self.members = dict(members)

    def state_dict(self) -> dict[str, Any]:
        return {name: member.state_dict() for name, member in self.members.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = set(self.members) - set(state)
        if missing:
            raise ValueError(f"saved state lacks {sorted(missing)} (it has {sorted(state)})")
        for name, member in self.members.items():
            member.load_state_dict(state[name])
