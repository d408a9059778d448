"""Pluggable training strategies: what a training step optimises, apart from how it runs.

Call protocol, on every rank that runs the model, once per batch::

    batch = strategy.prepare_batch(batch)          # pure: adds labels / masks, never mutates the input
    loss, metrics = strategy.compute_loss(model, batch)
    loss.backward()                                 # the trainer owns backward, clipping, the optimizer

``compute_loss`` runs the model exactly once per call (DPO concatenates chosen and rejected), so a
DDP-wrapped model sees one forward per backward. A pipeline trainer, which never calls the whole model,
uses ``TokenLossStrategy.loss_from_logits`` as the schedule's ``loss_fn`` after ``prepare_batch``.

Strategies keep no training state of their own. Models a strategy holds besides the policy (DPO's
frozen reference, PPO's critic) are listed by ``auxiliary_modules()``, so a trainer can give trainable
ones to the optimizer and declare them as checkpoint components.

Batch keys (all tensors, batch-first):

- pretrain: ``input_ids``, optional ``attention_mask`` (1 = real token), optional ``labels``;
- SFT: ``input_ids``, ``prompt_mask`` (True on prompt tokens), optional ``attention_mask``;
- DPO: ``chosen_*`` and ``rejected_*`` versions of the SFT keys;
- PPO: ``input_ids``, optional ``attention_mask``, and, aligned with the logits (see ``losses``),
  ``action_mask``, ``old_logprobs``, ``advantages``, plus ``returns`` (critic), ``old_values`` (value
  clipping) and ``ref_logprobs`` (KL term) when those terms are on.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from . import losses
from .losses import IGNORE_INDEX, shift_labels

__all__ = [
    "TrainingStrategy",
    "TokenLossStrategy",
    "PretrainStrategy",
    "SFTStrategy",
    "DPOStrategy",
    "PPOStrategy",
]

Batch = Mapping[str, torch.Tensor]
Metrics = dict[str, float]


def _require(batch: Batch, keys: tuple[str, ...], strategy: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{strategy} needs batch keys {list(keys)}; missing {missing} (got {sorted(batch)})")


class TrainingStrategy(abc.ABC):
    """Lifecycle: ``prepare_batch`` then ``compute_loss`` for each batch; see the module docstring."""

    def prepare_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Derive what ``compute_loss`` needs from a dataloader batch; returns a new dict."""
        return dict(batch)

    @abc.abstractmethod
    def compute_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        """Scalar loss to call ``backward`` on, and detached float metrics (``"loss"`` among them)."""

    def compute_metrics(self, model: nn.Module, batch: Batch) -> Metrics:
        """Evaluation: the training metrics computed without building a graph."""
        with torch.no_grad():
            return self.compute_loss(model, batch)[1]

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        """Models this strategy holds besides the policy, by name. Trainable ones have parameters
        with ``requires_grad``; frozen ones have none."""
        return {}


class TokenLossStrategy(TrainingStrategy):
    """Next-token cross entropy over the positions ``prepare_batch`` labels."""

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return losses.token_cross_entropy(logits, labels)

    def compute_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        _require(batch, ("input_ids", "labels"), type(self).__name__)
        logits = model(batch["input_ids"], batch.get("attention_mask"))
        loss = self.loss_from_logits(logits, batch["labels"])
        tokens = int((batch["labels"] != IGNORE_INDEX).sum())
        return loss, {"loss": float(loss.detach()), "tokens": float(tokens)}


@dataclass(frozen=True, eq=False)
class PretrainStrategy(TokenLossStrategy):
    """Language modelling: every real token after the first is a target."""

    def prepare_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        _require(batch, ("input_ids",), "PretrainStrategy")
        out = dict(batch)
        if "labels" not in out:
            out["labels"] = shift_labels(batch["input_ids"], batch.get("attention_mask"))
        return out


@dataclass(frozen=True, eq=False)
class SFTStrategy(TokenLossStrategy):
    """Supervised fine-tuning: cross entropy on response tokens only (``prompt_mask`` False)."""

    def prepare_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        _require(batch, ("input_ids", "prompt_mask"), "SFTStrategy")
        out = dict(batch)
        out["labels"] = _response_labels(batch, "")
        return out


def _response_labels(batch: Batch, prefix: str) -> torch.Tensor:
    """Labels on the response tokens of ``{prefix}input_ids``: not prompt, not padding."""
    target = ~batch[f"{prefix}prompt_mask"].to(torch.bool)
    attention = batch.get(f"{prefix}attention_mask")
    if attention is not None:
        target = target & attention.to(torch.bool)
    return shift_labels(batch[f"{prefix}input_ids"], target)


@dataclass(frozen=True, eq=False)
class DPOStrategy(TrainingStrategy):
    """Direct Preference Optimization against a frozen reference model.

    The reference is frozen when the strategy is built (``requires_grad_(False)``, eval mode) and
    always run under ``no_grad``; it must not share parameters with the policy. Build it as a copy of
    the initial policy: ``DPOStrategy(copy.deepcopy(policy), beta=0.1)``.
    """

    reference_model: nn.Module = field(repr=False)
    beta: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.reference_model, nn.Module):
            raise ValueError(
                f"DPOStrategy.reference_model must be an nn.Module (got {type(self.reference_model).__name__})"
            )
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ValueError(f"DPOStrategy.beta must be a positive number (got {self.beta!r})")
        self.reference_model.requires_grad_(False)
        self.reference_model.eval()

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        return {"reference": self.reference_model}

    def prepare_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        keys = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in ("input_ids", "prompt_mask"))
        _require(batch, keys, "DPOStrategy")
        if batch["chosen_input_ids"].shape != batch["rejected_input_ids"].shape:
            raise ValueError(
                "DPOStrategy: chosen_input_ids and rejected_input_ids must have the same shape (got "
                f"{tuple(batch['chosen_input_ids'].shape)} and {tuple(batch['rejected_input_ids'].shape)})"
            )
        out = dict(batch)
        for side in ("chosen", "rejected"):
            out[f"{side}_labels"] = _response_labels(batch, f"{side}_")
        return out

    def _check_not_shared(self, model: nn.Module) -> None:
        # Cheap next to a forward pass (one id per parameter tensor), so it runs on every step.
        reference = {id(p) for p in self.reference_model.parameters()}
        if model is self.reference_model or any(id(p) in reference for p in model.parameters()):
            raise ValueError(
                "DPOStrategy.reference_model shares parameters with the policy being trained; "
                "pass a copy (copy.deepcopy(policy)) so the reference stays frozen"
            )

    def compute_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        _require(batch, ("chosen_labels", "rejected_labels"), "DPOStrategy (after prepare_batch)")
        self._check_not_shared(model)
        n = batch["chosen_input_ids"].shape[0]
        # One forward over both halves: a DDP model must see one forward per backward.
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        attention = None
        if "chosen_attention_mask" in batch:
            attention = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        policy = losses.sequence_logprobs(model(input_ids, attention), labels)
        with torch.no_grad():
            reference = losses.sequence_logprobs(self.reference_model(input_ids, attention), labels)
        loss, chosen_rewards, rejected_rewards = losses.dpo_loss(
            policy[:n], policy[n:], reference[:n], reference[n:], self.beta
        )
        margin = chosen_rewards - rejected_rewards
        return loss, {
            "loss": float(loss.detach()),
            "chosen_reward": float(chosen_rewards.mean()),
            "rejected_reward": float(rejected_rewards.mean()),
            "reward_margin": float(margin.mean()),
            "reward_accuracy": float((margin > 0).float().mean()),
        }


@dataclass(frozen=True, eq=False)
class PPOStrategy(TrainingStrategy):
    """PPO's clipped surrogate on rollout batches, with optional entropy, KL and value terms.

    loss = policy_loss - entropy_coef * entropy + kl_coef * KL(policy || reference)
           + vf_coef * value_loss

    The KL term uses ``ref_logprobs`` recorded with the rollout (no reference model is run here). The
    value term needs a ``critic`` (``critic(input_ids, attention_mask) -> (B, T)`` values aligned like
    the logits); the critic is trainable and listed by ``auxiliary_modules``.
    """

    clip_range: float = 0.2
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    vf_coef: float = 0.0
    value_clip_range: float | None = None
    critic: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.clip_range, (int, float)) and 0 < self.clip_range < 1):
            raise ValueError(f"PPOStrategy.clip_range must be in (0, 1) (got {self.clip_range!r})")
        for name in ("kl_coef", "entropy_coef", "vf_coef"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"PPOStrategy.{name} must be a non-negative number (got {value!r})")
        if self.value_clip_range is not None and not self.value_clip_range > 0:
            raise ValueError(
                f"PPOStrategy.value_clip_range must be positive or None (got {self.value_clip_range!r})"
            )
        if (self.vf_coef > 0) != (self.critic is not None):
            raise ValueError(
                "PPOStrategy.vf_coef > 0 and PPOStrategy.critic go together: the value loss needs a critic "
                f"and a critic is only trained through it (got vf_coef={self.vf_coef}, "
                f"critic={type(self.critic).__name__ if self.critic is not None else None})"
            )

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        return {"critic": self.critic} if self.critic is not None else {}

    def _needed_keys(self) -> tuple[str, ...]:
        keys = ["input_ids", "action_mask", "old_logprobs", "advantages"]
        if self.kl_coef > 0:
            keys.append("ref_logprobs")
        if self.vf_coef > 0:
            keys.append("returns")
            if self.value_clip_range is not None:
                keys.append("old_values")
        return tuple(keys)

    def prepare_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        _require(batch, self._needed_keys(), "PPOStrategy")
        action_mask = batch["action_mask"].to(torch.bool)
        if action_mask[:, -1].any():
            raise ValueError(
                "PPOStrategy: action_mask is aligned with the logits, so its last column (which predicts "
                "past the end of the sequence) must be False"
            )
        out = dict(batch)
        out["action_mask"] = action_mask
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        labels[:, :-1] = batch["input_ids"][:, 1:]
        out["labels"] = labels.masked_fill(~action_mask, IGNORE_INDEX)
        return out

    def compute_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        _require(batch, ("labels",) + self._needed_keys(), "PPOStrategy (after prepare_batch)")
        mask = batch["action_mask"]
        attention = batch.get("attention_mask")
        logits = model(batch["input_ids"], attention)
        logprobs = losses.token_logprobs(logits, batch["labels"])
        policy_loss, clip_fraction, approx_kl = losses.ppo_policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], mask, self.clip_range
        )
        loss = policy_loss
        metrics = {
            "policy_loss": float(policy_loss.detach()),
            "clip_fraction": float(clip_fraction),
            "approx_kl": float(approx_kl),
        }
        if self.entropy_coef > 0:
            entropy = losses.masked_mean(losses.token_entropy(logits), mask)
            loss = loss - self.entropy_coef * entropy
            metrics["entropy"] = float(entropy.detach())
        if self.kl_coef > 0:
            kl = losses.kl_penalty(logprobs, batch["ref_logprobs"], mask)
            loss = loss + self.kl_coef * kl
            metrics["kl"] = float(kl.detach())
        if self.critic is not None:
            values = self.critic(batch["input_ids"], attention)
            value_loss = losses.ppo_value_loss(
                values, batch["returns"], mask, batch.get("old_values"), self.value_clip_range
            )
            loss = loss + self.vf_coef * value_loss
            metrics["value_loss"] = float(value_loss.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics
