"""Statefuls for common training state: ``TrainingProgress`` (the step, epoch and data consumed),
and ``ModelState`` / ``OptimizerState``, which prepare a model and its optimizer so DCP can save and
load them in a form that reshards.

DCP loads *into* the state dict an object returns. A fresh optimizer has no per-parameter state yet,
so it would ask for nothing; and loading the saved keys by value does not help either, because DCP's
flattening turns the optimizer's integer parameter ids into strings. ``ensure_optimizer_state``
creates the state first, as DCP's own (private) ``_init_optim_state`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .errors import StateMismatchError, describe_type


def _check_count(owner: str, name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StateMismatchError(f"{owner}.{name} must be a non-negative int (got {describe_type(value)})")
    return value


@dataclass
class TrainingProgress:
    """How far training got: optimizer steps taken, epochs completed, samples and tokens consumed.

    A Stateful to declare beside the model, so a resumed run continues its step count (and its
    schedules, logs and checkpoint names) where the checkpoint left off::

        progress = TrainingProgress()
        StateComponent("progress", progress, SharingPattern.REPLICATED)  # GLOBAL in one process
        for batch in loader:  # after coord.load_checkpoint(), progress.step is the saved step
            train_step(batch)
            progress.advance(samples=len(batch), tokens=batch.numel())  # global counts: the same everywhere

    Every rank counts the same global numbers (pass the global batch's samples and tokens), so the
    component is REPLICATED under data parallelism and can be checked for replication at save.
    """

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_count("TrainingProgress", f.name, getattr(self, f.name))

    def advance(self, *, samples: int = 0, tokens: int = 0, steps: int = 1) -> None:
        """Account ``steps`` optimizer steps that consumed ``samples`` samples and ``tokens`` tokens."""
        for name, value in (("steps", steps), ("samples", samples), ("tokens", tokens)):
            _check_count("TrainingProgress.advance", name, value)
        self.step += steps
        self.samples_seen += samples
        self.tokens_seen += tokens

    def end_epoch(self) -> None:
        """Count one more completed epoch."""
        self.epoch += 1

    def state_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names = [f.name for f in fields(self)]
        missing = sorted(set(names) - set(state))
        if missing:
            raise StateMismatchError(f"TrainingProgress state is missing {missing} (got {sorted(state)})")
        values = {name: _check_count("TrainingProgress", name, state[name]) for name in names}
        for name, value in values.items():
            setattr(self, name, value)


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its optimizer state (with a zero-lr, zero-grad step) if it has none."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(p.grad is not None for p in params):
        return  # mid-step: creating state now would consume real gradients
    for p in params:
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    saved_lrs = []
    for group in optimizer.param_groups:
        if "lr" in group:
            saved_lrs.append(group["lr"])
            group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
    optimizer.step()
    for group in optimizer.param_groups:
        if "lr" in group:
            group["lr"] = saved_lrs.pop(0)
    optimizer.zero_grad(set_to_none=True)


def prepare_for_load(stateful: Any) -> None:
    """Make ``stateful.state_dict()`` list every key a checkpoint of it may hold."""
    if isinstance(stateful, torch.optim.Optimizer):
        ensure_optimizer_state(stateful)


class ModelState:
    """A model's state dict in canonical FQN form (DCP's ``get/set_model_state_dict``).

    Wrapper prefixes (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``) are removed and FSDP2 /
    TP parameters stay DTensors, so a checkpoint saved under one wrapper and parallelism loads under
    another and reshards to the current placement. Declare it GLOBAL when parameters are DTensors,
    REPLICATED for a DDP-style replicated model.
    """

    def __init__(self, model: torch.nn.Module, options: StateDictOptions | None = None) -> None:
        self.model = model
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=self.options)


class OptimizerState:
    """Optimizer state keyed by parameter FQN (DCP's ``get/set_optimizer_state_dict``).

    ``torch.optim.Optimizer.state_dict()`` keys state by parameter *position*, which only maps back
    onto the same model under the same wrapping; keyed by FQN, with DTensor moments for FSDP2 / TP
    parameters, the state reshards like the model. Missing per-parameter state (a fresh optimizer)
    is created before loading, so every saved key has a destination. Declare it like its model.
    """

    def __init__(self, model: torch.nn.Module, optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
                 options: StateDictOptions | None = None) -> None:
        self.model = model
        self.optimizers = optimizers if isinstance(optimizers, torch.optim.Optimizer) else tuple(optimizers)
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizers, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizers, state_dict, options=self.options)
