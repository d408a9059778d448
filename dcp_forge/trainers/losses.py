"""Pure loss math for the training strategies: tensors in, tensors out, no models and no state.

Alignment convention used throughout: every per-token tensor is aligned with the logits, so column
``t`` describes the prediction made at position ``t``, i.e. the token at ``t + 1``. ``labels[:, t]``
is that token, or ``IGNORE_INDEX`` where the position does not count (prompt, padding, the last
position). Masks given alongside per-token tensors use the same alignment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "shift_labels",
    "masked_mean",
    "token_cross_entropy",
    "token_logprobs",
    "sequence_logprobs",
    "token_entropy",
    "dpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "kl_penalty",
]

# PyTorch's cross_entropy default, so labels built here work with F.cross_entropy unchanged.
IGNORE_INDEX = -100


def shift_labels(input_ids: torch.Tensor, target_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels aligned with the logits: ``labels[:, t] = input_ids[:, t + 1]``.

    ``target_mask`` is aligned with ``input_ids`` (``target_mask[:, j]`` says whether token ``j`` is
    a target); tokens it excludes, and the last position (which has no next token), get IGNORE_INDEX.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    targets = input_ids[:, 1:]
    if target_mask is not None:
        targets = targets.masked_fill(~target_mask[:, 1:].to(torch.bool), IGNORE_INDEX)
    labels[:, :-1] = targets
    return labels


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true; 0 when nothing is selected.

    ``torch.where`` (not multiplication) so that whatever sits at masked positions — even inf or NaN
    in a padded rollout — cannot leak into the result.
    """
    mask = mask.to(torch.bool)
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / mask.sum().clamp(min=1)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the positions whose label is not IGNORE_INDEX."""
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return masked_mean(losses, labels.reshape(-1) != IGNORE_INDEX)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) log-probability of each label; 0 where the label is IGNORE_INDEX."""
    valid = labels != IGNORE_INDEX
    # gather needs a valid index everywhere; ignored positions are zeroed below.
    safe = labels.clamp(min=0)
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logps, torch.zeros((), dtype=logps.dtype, device=logps.device))


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum of the labels' log-probabilities per sequence: log p(response | prompt)."""
    return token_logprobs(logits, labels).sum(dim=-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, T) entropy of the predicted next-token distribution."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    return -(logps.exp() * logps).sum(dim=-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al., 2023), from per-sequence log-probabilities.

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged over the batch.
    Returns (loss, chosen_rewards, rejected_rewards); the rewards ``beta * (pi - ref)`` are detached,
    for logging.
    """
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(beta * margin).mean()
    chosen_rewards = (beta * (policy_chosen - reference_chosen)).detach()
    rejected_rewards = (beta * (policy_rejected - reference_rejected)).detach()
    return loss, chosen_rewards, rejected_rewards


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate objective (Schulman et al., 2017), as a loss to minimise.

    loss = mean over masked tokens of max(-A * r, -A * clip(r, 1 - eps, 1 + eps)), r = exp(lp - old).
    Returns (loss, clip_fraction, approx_kl); the last two are detached diagnostics, approx_kl being
    the non-negative estimator E[(r - 1) - log r].
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    old_values: torch.Tensor | None = None,
    clip_range: float | None = None,
) -> torch.Tensor:
    """0.5 * squared error to the returns, with PPO's optional value clipping around ``old_values``."""
    loss = (values - returns) ** 2
    if clip_range is not None:
        if old_values is None:
            raise ValueError("ppo_value_loss: clip_range needs old_values (got None)")
        clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


def kl_penalty(logprobs: torch.Tensor, reference_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) per token with the unbiased, non-negative k3 estimator
    exp(ref - lp) - (ref - lp) - 1 (Schulman's "Approximating KL divergence"), masked mean."""
    delta = reference_logprobs - logprobs
    return masked_mean(torch.exp(delta) - delta - 1.0, mask)
