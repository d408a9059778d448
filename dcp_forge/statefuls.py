"""Preparing common training objects so DCP can load into them.

DCP loads *into* the state dict an object returns. A fresh optimizer has no per-parameter state yet,
so it would ask for nothing; and loading the saved keys by value does not help either, because DCP's
flattening turns the optimizer's integer parameter ids into strings. ``ensure_optimizer_state``
creates the state first, as DCP's own (private) ``_init_optim_state`` does.
"""

from __future__ import annotations

from typing import Any

import torch


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
