"""State dicts that are hard to save exactly, and how tests compare them."""

from __future__ import annotations

import torch


def tricky_state(seed: int) -> dict:
    """Small tensors, views (offset, strided, transposed), tensors sharing one storage, python values."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(64, 96, generator=gen)
    flat = torch.randn(4096, generator=gen)
    shared = torch.arange(50, dtype=torch.int64) * (seed + 1)
    return {
        "base": base,
        "row_view": base[3:9],  # offset view into base's storage
        "col_view": base[:, 5],  # strided view
        "transposed": base.t(),
        "flat": flat,
        "flat_as_matrix": flat.view(64, 64),  # same storage, other shape
        "shared_a": shared,
        "shared_b": shared[10:20],
        "half": torch.randn(33, generator=gen).half(),
        "scalar": torch.tensor(float(seed)),
        "step": seed,
        "name": f"run-{seed}",
        "nested": {"lr": 0.1 * seed, "history": [seed, seed + 1]},
    }


def mutate_in_place(state: dict) -> None:
    """Change every tensor in place (and every value reachable in place), as a training step would."""
    for value in state.values():
        if isinstance(value, torch.Tensor):
            value.add_(7)
    state["nested"]["history"].append(-1)


def snapshot(state):
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, list):
        return [snapshot(v) for v in state]
    return state


def assert_same(got, want, where="state"):
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    else:
        assert got == want, where


def empty_like_state(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        out[k] = torch.zeros_like(v) if isinstance(v, torch.Tensor) else (
            empty_like_state(v) if isinstance(v, dict) else None)
    return out
