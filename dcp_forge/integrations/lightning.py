"""PyTorch Lightning: checkpoints of ``Trainer.fit`` saved and resumed through dcp_forge.

Usage (docs/INTEGRATIONS.md)::

    trainer = Trainer(strategy=ForgeDDPStrategy(),            # or ForgeSingleDeviceStrategy(device="cpu")
                      plugins=[ForgeCheckpointIO(async_save=True, storage_options={...})],
                      default_root_dir="s3://bucket/run-7")
    trainer.fit(model, ckpt_path=None or "<a checkpoint path>")

Every checkpoint path Lightning chooses (``ModelCheckpoint``'s ``epoch=0-step=100.ckpt``) becomes a
dcp_forge checkpoint directory: checksummed, committed atomically, written once per unique byte and
spread over the ranks, on local disk or any fsspec URL, in the background with ``async_save``.

Why a strategy hook besides the ``CheckpointIO`` plugin: a ``CheckpointIO`` alone cannot express two
things a DCP checkpoint needs, and Lightning's own DCP users (``FSDPStrategy``,
``ModelParallelStrategy``) solve them in the strategy too:

- Lightning's stock strategies call ``CheckpointIO.save_checkpoint`` on global rank 0 only, while a
  DCP save is collective (every rank writes its share). ``ForgeCheckpointing`` calls it on every rank.
- ``CheckpointIO.load_checkpoint`` gets a path and nothing else, while DCP loads *into* existing
  state (it needs the model's and optimizers' tensors as targets). ``ForgeCheckpointing`` restores
  after ``setup`` (when the optimizers exist) and hands the live state to the plugin as target.

It also keeps optimizer state keyed by parameter name (DCP's ``get_optimizer_state_dict``), as
``FSDPStrategy`` does, instead of ``Optimizer.state_dict()``'s parameter positions: positions are
integer keys, which DCP's flattening turns into strings.

What a checkpoint holds, as components: ``model`` (the LightningModule's state dict) and
``optimizers`` (one state per optimizer, by index) REPLICATED, so every rank writes a share and any
world size loads them; ``lightning`` GLOBAL: the rest of Lightning's checkpoint dict (epoch,
global step, loops, callbacks, LR schedulers, hyper-parameters) as one ``torch.save`` blob, read
back with Lightning's ``weights_only`` choice.

Limits: a path is saved once (a committed checkpoint is never overwritten, so ``ModelCheckpoint``
needs file names that differ per save: keep ``{step}`` in ``filename`` and leave ``save_last`` off);
``save_weights_only`` checkpoints cannot be resumed with ``ckpt_path`` (they hold no optimizer
state); the module and optimizers must not be DTensor-sharded (use ``ModelParallelStrategy`` there).
"""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from ..coordinator import CheckpointCoordinator
from ..core.components import StateComponent
from ..core.patterns import SharingPattern
from ..errors import DeclarationTypeError, describe_type, expect_type
from ..statefuls import ensure_optimizer_state
from ..storage import delete_checkpoint, redact_url

__all__ = ["ForgeCheckpointIO", "ForgeCheckpointing", "ForgeDDPStrategy", "ForgeSingleDeviceStrategy"]

_MODEL, _OPTIMIZERS, _LIGHTNING = "model", "optimizers", "lightning"


class _Slot:
    """A component's state, replaced at every save (the coordinator's declaration stays fixed)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def _to_blob(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


class ForgeCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` saving and loading through a ``CheckpointCoordinator``.

    Use it with a ``ForgeCheckpointing`` strategy (see the module docstring). ``storage_options`` go to
    fsspec (s3 keys, endpoint); ``async_save``: a save returns once the state is staged and commits in
    the background (the next save, a load, a removal of that path and ``teardown`` wait for it);
    ``validate_replication``: check at every save that the model and optimizer state agree across
    ranks. Call protocol: every rank calls ``save_checkpoint`` / ``load_checkpoint`` together (the
    strategy does); ``remove_checkpoint`` runs on rank 0, as Lightning calls it.
    """

    def __init__(self, storage_options: Mapping[str, Any] | None = None, *, async_save: bool = False,
                 validate_replication: bool = False, thread_count: int = 2) -> None:
        expect_type("storage_options", storage_options, Mapping, optional=True)
        expect_type("async_save", async_save, bool)
        expect_type("validate_replication", validate_replication, bool)
        expect_type("thread_count", thread_count, int)
        self.storage_options = dict(storage_options or {})
        self.async_save = async_save
        self.validate_replication = validate_replication
        self.thread_count = thread_count
        self.strategy: ForgeCheckpointing | None = None  # set by the strategy before it calls us
        self._slots = {_MODEL: _Slot(), _OPTIMIZERS: _Slot(), _LIGHTNING: _Slot()}
        self._coordinator: CheckpointCoordinator | None = None
        self._in_flight: Any = None

    def _checkpointing(self) -> ForgeCheckpointing:
        """The strategy that calls us, which provides the live state a load fills."""
        if self.strategy is None:
            raise RuntimeError(
                "ForgeCheckpointIO saves and loads collectively, into the live model and optimizers: use it with "
                "a strategy that includes ForgeCheckpointing (ForgeDDPStrategy, ForgeSingleDeviceStrategy); "
                f"Lightning's {type(self).__name__} was called by a strategy without it")
        return self.strategy

    def _coordinator_for(self, path: str | os.PathLike) -> CheckpointCoordinator:
        """The coordinator, built at the first save or load (collective: every rank is here)."""
        self._checkpointing()  # refuses a strategy without ForgeCheckpointing before anything is built
        if self._coordinator is None:
            components = [StateComponent(key, self._slots[key], SharingPattern.REPLICATED,
                                         validate_replication=self.validate_replication)
                          for key in (_MODEL, _OPTIMIZERS)]
            components.append(StateComponent(_LIGHTNING, self._slots[_LIGHTNING], SharingPattern.GLOBAL))
            self._coordinator = CheckpointCoordinator(
                components, output_dir=posixpath.dirname(os.fspath(path).rstrip("/")) or ".",
                storage_options=self.storage_options, thread_count=self.thread_count)
        return self._coordinator

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        """Save Lightning's checkpoint dict as the dcp_forge checkpoint ``path``. Collective."""
        if storage_options is not None:
            raise TypeError("ForgeCheckpointIO takes its storage_options when built "
                            "(ForgeCheckpointIO(storage_options=...)), not per save_checkpoint call")
        expect_type("checkpoint", checkpoint, dict)
        coordinator = self._coordinator_for(path)
        rest = dict(checkpoint)
        model = rest.pop("state_dict", {})
        optimizers = rest.pop("optimizer_states", [])
        self._slots[_MODEL].state = dict(model)
        self._slots[_OPTIMIZERS].state = {str(i): state for i, state in enumerate(optimizers)}
        self._slots[_LIGHTNING].state = {"checkpoint": _to_blob(rest)}
        if self.async_save:
            self._in_flight = coordinator.async_save(checkpoint_path=path, validate=self.validate_replication)
        else:
            coordinator.save_checkpoint(checkpoint_path=path, validate=self.validate_replication)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load ``path`` into the live model and optimizers the strategy provides; returns Lightning's
        checkpoint dict. Collective. ``map_location`` is not needed: tensors load where their
        targets live."""
        coordinator = self._coordinator_for(path)
        target = self._checkpointing().checkpoint_target()
        self._slots[_MODEL].state = target["state_dict"]
        self._slots[_OPTIMIZERS].state = {str(i): s for i, s in enumerate(target["optimizer_states"])}
        self._slots[_LIGHTNING].state = {"checkpoint": b""}
        coordinator.load_checkpoint(path)
        blob = self._slots[_LIGHTNING].state["checkpoint"]
        if not isinstance(blob, bytes):
            raise DeclarationTypeError(f"{redact_url(path)}: component 'lightning' must hold Lightning's checkpoint "
                                       f"as bytes (found {describe_type(blob)}); was it saved by ForgeCheckpointIO?")
        checkpoint = torch.load(io.BytesIO(blob), weights_only=weights_only)
        optimizers = self._slots[_OPTIMIZERS].state
        checkpoint["state_dict"] = self._slots[_MODEL].state
        checkpoint["optimizer_states"] = [optimizers[str(i)] for i in range(len(optimizers))]
        return checkpoint

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Delete the checkpoint ``path`` (waiting first if it is the one still committing)."""
        handle = self._in_flight
        if handle is not None and handle.checkpoint_path == os.fspath(path):
            handle.result()
        delete_checkpoint(path, self.storage_options)

    def teardown(self) -> None:
        """End of ``fit``: wait for the save in flight (raising its failure), free the coordinator."""
        coordinator, self._coordinator, self._in_flight = self._coordinator, None, None
        if coordinator is not None:
            coordinator.close()


class ForgeCheckpointing:
    """Strategy mix-in for ``ForgeCheckpointIO`` (see the module docstring): saves on every rank,
    restores after ``setup`` into the live state, keeps optimizer state keyed by parameter name.

    Put it first among the bases of a Lightning ``Strategy`` subclass, as ``ForgeDDPStrategy`` does.
    """

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # DCP loads into the optimizers' state, which exists only after setup

    def _forge_io(self: Any) -> ForgeCheckpointIO:
        checkpoint_io = self.checkpoint_io
        if not isinstance(checkpoint_io, ForgeCheckpointIO):
            raise TypeError(f"{type(self).__name__} needs plugins=[ForgeCheckpointIO(...)] "
                            f"(its checkpoint_io is a {type(checkpoint_io).__name__})")
        checkpoint_io.strategy = self
        return checkpoint_io

    def optimizer_state(self: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the real one
        return get_optimizer_state_dict(self.lightning_module, optimizer)

    def load_optimizer_state_dict(self: Any, checkpoint: Mapping[str, Any]) -> None:
        states = checkpoint["optimizer_states"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"the checkpoint holds {len(states)} optimizer state(s), the LightningModule "
                             f"configures {len(self.optimizers)}")
        for optimizer, state in zip(self.optimizers, states, strict=True):
            set_optimizer_state_dict(self.lightning_module, optimizer, state)

    def checkpoint_target(self: Any) -> dict[str, Any]:
        """The live state a load fills: the module's state dict and every optimizer's (created first
        if the optimizer has not stepped yet)."""
        for optimizer in self.optimizers:
            ensure_optimizer_state(optimizer)
        return {"state_dict": self.lightning_module.state_dict(),
                "optimizer_states": [self.optimizer_state(o) for o in self.optimizers]}

    def save_checkpoint(self: Any, checkpoint: dict[str, Any], filepath: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        self._forge_io().save_checkpoint(checkpoint, self.broadcast(filepath), storage_options=storage_options)

    def load_checkpoint(self: Any, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        return self._forge_io().load_checkpoint(self.broadcast(checkpoint_path), weights_only=weights_only)


class ForgeDDPStrategy(ForgeCheckpointing, DDPStrategy):
    """``DDPStrategy`` checkpointing through ``ForgeCheckpointIO``."""


class ForgeSingleDeviceStrategy(ForgeCheckpointing, SingleDeviceStrategy):
    """``SingleDeviceStrategy`` checkpointing through ``ForgeCheckpointIO``."""


def _check_strategy_base() -> None:
    # The mix-in overrides these Strategy methods; a Lightning release renaming them must fail loudly.
    for name in ("save_checkpoint", "load_checkpoint", "optimizer_state", "load_optimizer_state_dict",
                 "restore_checkpoint_after_setup"):
        if not hasattr(Strategy, name):
            raise ImportError(f"dcp_forge.integrations.lightning: lightning's Strategy has no {name!r}; "
                              "this Lightning release is not supported")


_check_strategy_base()
