"""Hugging Face ``transformers.Trainer``: its checkpoints' training state saved and resumed through dcp_forge.

Usage (docs/INTEGRATIONS.md)::

    class MyTrainer(ForgeTrainerMixin, Trainer): ...     # or use ForgeTrainer as is
    trainer = ForgeTrainer(model=model, args=args, train_dataset=data, forge_async_save=True)
    trainer.train()                                       # checkpoint-<step>/ as usual
    trainer.train(resume_from_checkpoint=True)            # the Trainer's own resume

The Trainer keeps its conventions (``output_dir/checkpoint-<step>``, ``save_steps``,
``save_total_limit`` rotation, ``resume_from_checkpoint``, ``trainer_state.json``); what it would
write with ``torch.save`` (model weights, optimizer, LR scheduler, gradient scaler, per-rank RNG)
goes instead into one dcp_forge checkpoint, ``checkpoint-<step>/forge``: checksummed, committed
atomically, every unique byte written once and spread over the ranks, optionally in the background.

How: the Trainer's own save and load hooks, overridden one by one (no copy of its loop):
``_save_optimizer_and_scheduler`` saves every component at once (it runs right before the RNG and
scaler hooks, with no random draw in between), ``_save_rng_state`` / ``_save_scaler`` and the
checkpoint's ``save_model`` then have nothing left to do; ``_load_from_checkpoint`` (weights,
before ``accelerator.prepare``), ``_load_optimizer_and_scheduler`` (after it), ``_load_rng_state``
(where the Trainer restores RNG, at the resumed step) and ``_load_best_model`` each load their
components of it. Components: ``model`` and ``optimizer`` keyed by parameter name (DCP's
``get/set_model_state_dict`` and ``get/set_optimizer_state_dict``, so they reshard), ``scheduler``
and ``scaler`` REPLICATED, ``rng`` PER_RANK.

The data position is the Trainer's own: it resumes by skipping the batches its ``trainer_state.json``
(global step, epoch) says were trained, with the sampler seeded from ``args.seed`` and the RNG state
restored from the ``rng`` component. That file stays the Trainer's, beside the dcp_forge checkpoint,
because ``Trainer.train`` reads it itself; so checkpoints live under ``args.output_dir`` on a local
(or locally mounted) file system. ``save_only_model=True`` checkpoints are the Trainer's own, and so
are DeepSpeed's and FSDP's (the mix-in refuses those set-ups rather than half-handle them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import Trainer

from ..coordinator import CheckpointCoordinator
from ..core.components import StateComponent
from ..core.patterns import SharingPattern
from ..errors import expect_type
from ..rng import RNGState
from ..statefuls import ModelState, OptimizerState

__all__ = ["FORGE_DIR", "ForgeTrainer", "ForgeTrainerMixin", "forge_checkpoint_of"]

# The dcp_forge checkpoint inside each of the Trainer's checkpoint-<step> folders.
FORGE_DIR = "forge"


def forge_checkpoint_of(trainer_checkpoint: str | os.PathLike) -> str:
    """The dcp_forge checkpoint inside the Trainer checkpoint folder ``trainer_checkpoint``."""
    return os.path.join(os.fspath(trainer_checkpoint), FORGE_DIR)


class _Current:
    """A component whose object the Trainer replaces (wraps, re-creates) between saves: resolved at
    each ``state_dict`` / ``load_state_dict`` call."""

    def __init__(self, resolve: Callable[[], Any]) -> None:
        self.resolve = resolve

    def state_dict(self) -> dict[str, Any]:
        return self.resolve().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resolve().load_state_dict(state)


def _unwrapped_optimizer(optimizer: Any) -> Any:
    """accelerate's ``AcceleratedOptimizer`` wraps the torch optimizer DCP's helpers need."""
    return getattr(optimizer, "optimizer", optimizer)


# Type checkers see the mix-in as the Trainer it is mixed into (its hooks override the Trainer's and call
# them through super()); at run time it stays a plain mix-in, placed before any Trainer subclass.
if TYPE_CHECKING:
    _TrainerHost = Trainer
else:
    _TrainerHost = object


class ForgeTrainerMixin(_TrainerHost):
    """``transformers.Trainer`` mix-in (put it first among the bases) checkpointing through dcp_forge.

    ``forge_storage_options``: fsspec options (unused for local paths); ``forge_async_save``: a save
    returns once the state is staged and commits in the background (the next save, a load and the end
    of ``train`` wait for it); ``forge_validate_replication``: check at every save that the replicated
    components agree across ranks. Call protocol: the Trainer's; every rank runs ``train`` together.
    """

    def __init__(self, *args: Any, forge_storage_options: Mapping[str, Any] | None = None,
                 forge_async_save: bool = False, forge_validate_replication: bool = False, **kwargs: Any) -> None:
        expect_type("forge_storage_options", forge_storage_options, Mapping, optional=True)
        expect_type("forge_async_save", forge_async_save, bool)
        expect_type("forge_validate_replication", forge_validate_replication, bool)
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(f"{type(self).__name__}: ForgeTrainerMixin checkpoints single-device and DDP training; "
                             "with DeepSpeed or FSDP the Trainer's checkpoints are the engine's own (use the "
                             "plain Trainer there)")
        self.forge_storage_options = dict(forge_storage_options or {})
        self.forge_async_save = forge_async_save
        self.forge_validate_replication = forge_validate_replication
        self._forge_coordinator: CheckpointCoordinator | None = None
        self._forge_in_checkpoint = False

    # --- the coordinator ------------------------------------------------------------------------
    def _forge_model(self) -> torch.nn.Module:
        """The model a checkpoint saves or loads into: there from construction, or made by ``model_init``
        when ``train`` starts, before any checkpoint."""
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} has no model yet: checkpoints are saved and loaded "
                               "during train()")
        return self.model

    def forge_components(self) -> list[StateComponent]:
        """What a checkpoint holds (objects resolved at each save and load: the Trainer re-creates its
        optimizer and scheduler per ``train`` call)."""
        validate = self.forge_validate_replication
        components = [
            StateComponent("model", _Current(lambda: ModelState(self._forge_model())), SharingPattern.REPLICATED,
                           validate_replication=validate),
            StateComponent("optimizer", _Current(lambda: OptimizerState(self._forge_model(),
                                                                    _unwrapped_optimizer(self.optimizer))),
                           SharingPattern.REPLICATED, validate_replication=validate),
            StateComponent("scheduler", _Current(lambda: self.lr_scheduler), SharingPattern.REPLICATED),
            StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
        ]
        if getattr(self.accelerator, "scaler", None) is not None:
            components.append(StateComponent("scaler", _Current(lambda: self.accelerator.scaler),
                                             SharingPattern.REPLICATED))
        return components

    def forge_coordinator(self) -> CheckpointCoordinator:
        """This Trainer's coordinator, built at its first save or load (collective)."""
        if self._forge_coordinator is None:
            # transformers types output_dir as its constructor argument (None: the default), which
            # TrainingArguments.__post_init__ always replaces with a path.
            output_dir = cast(str, self.args.output_dir)
            self._forge_coordinator = CheckpointCoordinator(
                self.forge_components(), output_dir=output_dir, storage_options=self.forge_storage_options)
        return self._forge_coordinator

    def forge_close(self) -> None:
        """Wait for the save in flight (raising its failure) and free the coordinator. Collective;
        ``train`` calls it at its end."""
        coordinator, self._forge_coordinator = self._forge_coordinator, None
        if coordinator is not None:
            coordinator.close()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            output = super().train(*args, **kwargs)
        except BaseException as err:
            try:
                self.forge_close()
            except Exception as close_error:  # keep training's error; say what closing found
                err.add_note(f"while handling it, closing the dcp_forge coordinator raised: {close_error!r}")
            raise
        self.forge_close()
        return output

    def _forge_load(self, checkpoint: str, components: list[str]) -> None:
        coordinator = self.forge_coordinator()
        declared = {c.key for c in coordinator.components}
        coordinator.load_checkpoint(forge_checkpoint_of(checkpoint), components=[c for c in components if c in declared])

    # --- save hooks ---------------------------------------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._forge_in_checkpoint = not self.args.save_only_model
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._forge_in_checkpoint = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self._forge_in_checkpoint:
            return  # a checkpoint's weights are its dcp_forge "model" component
        super().save_model(output_dir, _internal_call=_internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        coordinator = self.forge_coordinator()
        path = forge_checkpoint_of(output_dir)
        # The Trainer writes trainer_state.json into output_dir next, before an async save has created it.
        os.makedirs(output_dir, exist_ok=True)
        if self.forge_async_save:
            coordinator.async_save(checkpoint_path=path, validate=self.forge_validate_replication)
        else:
            coordinator.save_checkpoint(checkpoint_path=path, validate=self.forge_validate_replication)

    def _save_rng_state(self, output_dir: str) -> None:
        """Saved with the other components by ``_save_optimizer_and_scheduler``."""

    def _save_scaler(self, output_dir: str) -> None:
        """Saved with the other components by ``_save_optimizer_and_scheduler``."""

    # --- load hooks ---------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self._forge_load(resume_from_checkpoint, ["model"])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            self._forge_load(checkpoint, ["optimizer", "scheduler", "scaler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        """Loaded with the optimizer and scheduler by ``_load_optimizer_and_scheduler``."""

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            self._forge_load(checkpoint, ["rng"])

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None:  # the Trainer calls this only once it has recorded a best checkpoint
            raise RuntimeError(f"{type(self).__name__}: no best checkpoint recorded to load")
        self._forge_load(best, ["model"])


class ForgeTrainer(ForgeTrainerMixin, Trainer):
    """``transformers.Trainer`` checkpointing through dcp_forge (see the module docstring)."""
