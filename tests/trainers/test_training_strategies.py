"""Strategies and their loss math against small hand computations, and where gradients may flow."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcp_forge.trainers import losses
from dcp_forge.trainers.data import ReversalPreferenceDataset, synthetic_ppo_rollouts
from dcp_forge.trainers.losses import IGNORE_INDEX
from dcp_forge.trainers.strategies import DPOStrategy, PPOStrategy, PretrainStrategy, SFTStrategy
from dcp_forge.trainers.tiny_lm import TinyCritic, TinyLM, TinyLMConfig

LN3 = math.log(3.0)


class FixedLogits(nn.Module):
    """A "model" whose output is a trainable tensor: gradients show which positions count."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone().float())

    def forward(self, input_ids, attention_mask=None):
        assert input_ids.shape == self.logits.shape[:2]
        return self.logits


def reference_logprob(logits: torch.Tensor, input_ids: torch.Tensor, positions) -> float:
    """Independent of the code under test: sum of log softmax(logits[t])[input_ids[t + 1]]."""
    total = 0.0
    for t in positions:
        row = logits[t].tolist()
        norm = math.log(sum(math.exp(v) for v in row))
        total += row[int(input_ids[t + 1])] - norm
    return total


# -- pure loss math --------------------------------------------------------------------------------


def test_shift_labels_aligns_targets_with_logits():
    ids = torch.tensor([[5, 6, 7, 8]])
    assert shift_labels_list(ids) == [[6, 7, 8, IGNORE_INDEX]]
    assert shift_labels_list(ids, torch.tensor([[0, 1, 1, 0]])) == [[6, 7, IGNORE_INDEX, IGNORE_INDEX]]


def shift_labels_list(ids, mask=None):
    return losses.shift_labels(ids, mask).tolist()


def test_token_cross_entropy_by_hand():
    # p(token 1) = 3/4 at position 0, p(token 0) = 3/4 at position 1, position 2 ignored.
    logits = torch.tensor([[[0.0, LN3], [LN3, 0.0], [100.0, -100.0]]])
    labels = torch.tensor([[1, 0, IGNORE_INDEX]])
    assert losses.token_cross_entropy(logits, labels).item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_token_cross_entropy_with_nothing_to_predict_is_zero_not_nan():
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    loss = losses.token_cross_entropy(logits, torch.full((1, 2), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_dpo_loss_by_hand():
    beta = 0.5
    # margin = (pi_c - ref_c) - (pi_r - ref_r) = (-1 + 1.5) - (-2 + 1.5) = 1
    loss, chosen, rejected = losses.dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), beta
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)), rel=1e-6)
    assert chosen.item() == pytest.approx(0.25) and rejected.item() == pytest.approx(-0.25)


def test_ppo_policy_loss_by_hand():
    ratios = torch.tensor([[1.5, 0.5, 1.0, 1.1]])
    logprobs = ratios.log().requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, 2.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, clip_fraction, approx_kl = losses.ppo_policy_loss(
        logprobs, torch.zeros(1, 4), advantages, mask, 0.2
    )
    # max(-A r, -A clip(r)): -1.2 (clipped), 0.8 (clipped), -2.0, 1.1
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.0 + 1.1) / 4, rel=1e-6)
    assert clip_fraction.item() == pytest.approx(0.5)
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.0, 1.1)) / 4
    assert approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)
    loss.backward()
    # Clipped tokens get no gradient; the others get d(-A r)/d(log r) / 4 = -A r / 4.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, -0.5, 0.275]]))


def test_ppo_value_loss_by_hand():
    values, returns = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.5, 1.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert losses.ppo_value_loss(values, returns, mask).item() == pytest.approx(0.5 * 0.25)
    # Clipped around 0.5 to 0.7 both: max(0.25, 0.64) twice.
    clipped = losses.ppo_value_loss(values, returns, mask, torch.tensor([[0.5, 0.5]]), 0.2)
    assert clipped.item() == pytest.approx(0.5 * 0.64)
    with pytest.raises(ValueError, match="old_values"):
        losses.ppo_value_loss(values, returns, mask, None, 0.2)


def test_kl_penalty_and_entropy_by_hand():
    lp = torch.tensor([[-1.0, -2.0]])
    mask = torch.tensor([[True, False]])
    expected = math.exp(-0.1) + 0.1 - 1
    assert losses.kl_penalty(lp, lp - 0.1, mask).item() == pytest.approx(expected, rel=1e-5)
    assert losses.kl_penalty(lp, lp, mask).item() == 0.0
    uniform = torch.zeros(1, 2, 5)
    torch.testing.assert_close(losses.token_entropy(uniform), torch.full((1, 2), math.log(5)))


# -- pretraining and SFT ---------------------------------------------------------------------------


def test_pretrain_loss_ignores_padding_and_gives_it_no_gradient():
    ids = torch.tensor([[4, 5, 6, 0]])
    batch = PretrainStrategy().prepare_batch(
        {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    )
    assert batch["labels"].tolist() == [[5, 6, IGNORE_INDEX, IGNORE_INDEX]]
    logits = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))
    model = FixedLogits(logits)
    loss, metrics = PretrainStrategy().compute_loss(model, batch)
    assert loss.item() == pytest.approx(-reference_logprob(logits[0], ids[0], [0, 1]) / 2, rel=1e-5)
    assert metrics["tokens"] == 2.0
    loss.backward()
    assert model.logits.grad[0, 2:].abs().sum() == 0
    assert model.logits.grad[0, :2].abs().sum() > 0


def test_pretrain_loss_from_logits_is_plain_shifted_cross_entropy():
    model = TinyLM(TinyLMConfig(), seed=0)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    strategy = PretrainStrategy()
    logits = model(ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    got = strategy.loss_from_logits(logits, strategy.prepare_batch({"input_ids": ids})["labels"])
    torch.testing.assert_close(got, expected)


def test_sft_counts_response_tokens_only():
    # BOS a SEP b EOS PAD: targets are b (predicted at 2) and EOS (predicted at 3).
    ids = torch.tensor([[1, 7, 2, 7, 3, 0]])
    batch = {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]),
        "prompt_mask": torch.tensor([[True, True, True, False, False, False]]),
    }
    strategy = SFTStrategy()
    prepared = strategy.prepare_batch(batch)
    assert prepared["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 3, IGNORE_INDEX, IGNORE_INDEX]]
    assert "labels" not in batch  # prepare_batch returns a new dict
    logits = torch.randn(1, 6, 10, generator=torch.Generator().manual_seed(2))
    model = FixedLogits(logits)
    loss, _ = strategy.compute_loss(model, prepared)
    assert loss.item() == pytest.approx(-reference_logprob(logits[0], ids[0], [2, 3]) / 2, rel=1e-5)
    loss.backward()
    grad = model.logits.grad[0].abs().sum(-1)
    assert grad[[0, 1, 4, 5]].sum() == 0 and (grad[[2, 3]] > 0).all()


def test_missing_batch_keys_are_named():
    with pytest.raises(KeyError, match="prompt_mask"):
        SFTStrategy().prepare_batch({"input_ids": torch.zeros(1, 3, dtype=torch.long)})


# -- DPO -------------------------------------------------------------------------------------------


def dpo_batch(n: int = 4, seq_len: int = 16):
    data = ReversalPreferenceDataset(64, seq_len, n, seed=0, min_prompt_len=2)
    items = [data[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_dpo_strategy_by_hand_with_fixed_logits():
    batch = DPOStrategy(FixedLogits(torch.zeros(2, 16, 64)), beta=0.1).prepare_batch(dpo_batch(n=1))
    gen = torch.Generator().manual_seed(3)
    policy_logits, reference_logits = (
        torch.randn(2, 16, 64, generator=gen),
        torch.randn(2, 16, 64, generator=gen),
    )
    strategy = DPOStrategy(FixedLogits(reference_logits), beta=0.1)
    policy = FixedLogits(policy_logits)
    loss, metrics = strategy.compute_loss(policy, batch)

    def logp(logits, side, row):
        ids = batch[f"{side}_input_ids"][0]
        positions = [t for t in range(15) if batch[f"{side}_labels"][0, t] != IGNORE_INDEX]
        return reference_logprob(logits[row], ids, positions)

    margin = (logp(policy_logits, "chosen", 0) - logp(reference_logits, "chosen", 0)) - (
        logp(policy_logits, "rejected", 1) - logp(reference_logits, "rejected", 1)
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.1 * margin)), rel=1e-5)
    assert metrics["reward_margin"] == pytest.approx(0.1 * margin, rel=1e-4)


def test_dpo_starts_at_ln2_trains_the_policy_and_never_the_reference():
    policy = TinyLM(TinyLMConfig(max_seq_len=16), seed=0)
    strategy = DPOStrategy(copy.deepcopy(policy), beta=0.5)
    reference = strategy.auxiliary_modules()["reference"]
    frozen = {k: v.clone() for k, v in reference.state_dict().items()}
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    batch = strategy.prepare_batch(dpo_batch())
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    first, _ = strategy.compute_loss(policy, batch)
    assert first.item() == pytest.approx(math.log(2), rel=1e-5)  # policy == reference: margin 0
    for _ in range(3):
        loss, metrics = strategy.compute_loss(policy, batch)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in reference.parameters())
        optimizer.step()
    assert strategy.compute_metrics(policy, batch)["loss"] < first.item()
    assert all(torch.equal(v, frozen[k]) for k, v in reference.state_dict().items())


def test_dpo_rejects_a_reference_that_shares_the_policy_parameters():
    policy = TinyLM(TinyLMConfig(max_seq_len=16), seed=0)
    batch = dpo_batch()
    for reference in (policy, nn.Sequential(policy)):
        strategy = DPOStrategy(reference)
        with pytest.raises(ValueError, match="shares parameters"):
            strategy.compute_loss(policy, strategy.prepare_batch(batch))


@pytest.mark.parametrize("beta", [0, -1.0, "0.1"])
def test_dpo_validates_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        DPOStrategy(TinyLM(TinyLMConfig()), beta=beta)


# -- PPO -------------------------------------------------------------------------------------------

CFG = TinyLMConfig(max_seq_len=16)


def rollouts(policy=None, **kw):
    data = synthetic_ppo_rollouts(64, 16, 4, seed=1, policy=policy, **kw)
    return dict(data.tensors)


def test_ppo_strategy_by_hand_at_ratio_one():
    policy = TinyLM(CFG, seed=0)
    batch = rollouts(policy=policy, reference=policy)  # old = ref = current log-probs
    batch["ref_logprobs"] = batch["ref_logprobs"] - 0.1
    strategy = PPOStrategy(clip_range=0.2, kl_coef=0.5, entropy_coef=0.01)
    prepared = strategy.prepare_batch(batch)
    loss, metrics = strategy.compute_loss(policy, prepared)
    mask = prepared["action_mask"]
    policy_loss = -prepared["advantages"][mask].mean().item()  # ratio 1: -mean(A)
    kl = math.exp(-0.1) + 0.1 - 1
    with torch.no_grad():
        entropy = (
            losses.token_entropy(policy(batch["input_ids"], batch["attention_mask"]))[mask].mean().item()
        )
    assert metrics["policy_loss"] == pytest.approx(policy_loss, abs=1e-5)
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-6) and metrics["clip_fraction"] == 0.0
    assert metrics["kl"] == pytest.approx(kl, rel=1e-4)
    assert loss.item() == pytest.approx(policy_loss + 0.5 * kl - 0.01 * entropy, abs=1e-5)


def test_ppo_masked_tokens_contribute_nothing():
    gen = torch.Generator().manual_seed(4)
    batch = rollouts()
    model = FixedLogits(torch.randn(4, 16, 64, generator=gen))
    strategy = PPOStrategy(clip_range=0.2, entropy_coef=0.1)
    prepared = strategy.prepare_batch(batch)
    loss, _ = strategy.compute_loss(model, prepared)
    loss.backward()
    mask = prepared["action_mask"]
    assert model.logits.grad[~mask].abs().sum() == 0
    assert model.logits.grad[mask].abs().sum() > 0
    # Wild values where the mask is off change nothing.
    noisy = dict(prepared)
    for key, value in (("old_logprobs", -50.0), ("advantages", 1e6)):
        noisy[key] = torch.where(mask, prepared[key], torch.full_like(prepared[key], value))
    assert strategy.compute_loss(model, noisy)[0].item() == loss.item()


def test_ppo_value_term_trains_the_critic_only_through_vf_coef():
    policy, critic = TinyLM(CFG, seed=0), TinyCritic(CFG, seed=1)
    batch = rollouts(policy=policy, critic=critic)
    strategy = PPOStrategy(vf_coef=0.5, value_clip_range=0.2, critic=critic)
    assert strategy.auxiliary_modules() == {"critic": critic}
    loss, metrics = strategy.compute_loss(policy, strategy.prepare_batch(batch))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.value_head.parameters())
    with_value = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    plain = PPOStrategy()
    plain.compute_loss(policy, plain.prepare_batch(batch))[0].backward()
    # The value term moves the critic, never the policy.
    assert all(torch.equal(a, p.grad) for a, p in zip(with_value, policy.parameters(), strict=True))
    mask = batch["action_mask"]
    with torch.no_grad():
        values = critic(batch["input_ids"], batch["attention_mask"])
    expected = 0.5 * ((values - batch["returns"]) ** 2)[mask].mean().item()  # old_values = values: no clip
    assert metrics["value_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"clip_range": 0}, "clip_range"),
        ({"clip_range": 1.5}, "clip_range"),
        ({"kl_coef": -0.1}, "kl_coef"),
        ({"entropy_coef": -1}, "entropy_coef"),
        ({"vf_coef": 0.5}, "vf_coef"),
        ({"critic": nn.Linear(1, 1)}, "vf_coef"),
        ({"value_clip_range": 0.0}, "value_clip_range"),
    ],
)
def test_ppo_validates_its_configuration(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PPOStrategy(**kwargs)


def test_ppo_needs_ref_logprobs_for_kl_and_a_logit_aligned_action_mask():
    batch = rollouts()
    with pytest.raises(KeyError, match="ref_logprobs"):
        PPOStrategy(kl_coef=0.1).prepare_batch(batch)
    bad = dict(batch)
    bad["action_mask"] = bad["action_mask"].clone()
    bad["action_mask"][:, -1] = True
    with pytest.raises(ValueError, match="last column"):
        PPOStrategy().prepare_batch(bad)


def test_compute_metrics_builds_no_graph():
    policy = TinyLM(CFG, seed=0)
    batch = PretrainStrategy().prepare_batch({"input_ids": torch.randint(0, 64, (2, 8))})
    metrics = PretrainStrategy().compute_metrics(policy, batch)
    assert isinstance(metrics["loss"], float)
    assert all(p.grad is None for p in policy.parameters())
