"""Model and optimizer state under any parallelism (plain, FSDP2, DTensor placements): deterministic
training steps, the full state gathered for comparison, and the comparison."""

from __future__ import annotations

import torch

from dcp_forge.statefuls import ModelState, OptimizerState


def train(model, opt, steps: int = 2) -> None:
    """Deterministic gradients, the same whatever the world size and placement."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        for _, p in sorted(model.named_parameters()):
            full = torch.randn(p.shape, generator=gen)
            p.grad = distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full
        opt.step()
        opt.zero_grad()


def full_state(model, opt) -> dict:
    """Every value of model and optimizer state, DTensors gathered (collective)."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif hasattr(value, "full_tensor"):
            out[prefix] = value.full_tensor()
        else:
            out[prefix] = value

    walk("model", ModelState(model).state_dict())
    walk("optimizer", OptimizerState(model, opt).state_dict())
    return out


def mismatches(expected: dict, got: dict) -> list[str]:
    bad = sorted(set(expected) ^ set(got))
    for key, value in expected.items():
        other = got.get(key)
        same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
        if key in got and not same:
            bad.append(key)
    return bad
