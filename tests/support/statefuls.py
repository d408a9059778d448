"""Statefuls shared by tests: the smallest object DCP and dcp_forge treat as a component."""

from __future__ import annotations


class Box:
    """Holds a state dict and returns it as is (live tensors, no copies), like nn.Module.state_dict."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


class Counter:
    """A training step counter: the smallest state with a plain value."""

    def __init__(self, step: int = 0) -> None:
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
