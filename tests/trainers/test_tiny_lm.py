"""TinyLM on one process: config validation, deterministic init, masking, training, stage splitting."""

from __future__ import annotations

import time

import pytest
import torch

from dcp_forge.trainers.data import MarkovTokenDataset, make_dataloader
from dcp_forge.trainers.strategies import PretrainStrategy
from dcp_forge.trainers.tiny_lm import (
    TinyCritic,
    TinyLM,
    TinyLMConfig,
    split_into_stages,
    stage_layer_ranges,
    tensor_parallel_plan,
)

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

CONFIG = TinyLMConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=32)


def tokens(batch: int = 4, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("vocab_size", {"vocab_size": 0}),
        ("d_model", {"d_model": 30, "n_heads": 4}),
        ("n_layers", {"n_layers": -1}),
        ("n_heads", {"n_heads": 1.5}),
        ("max_seq_len", {"max_seq_len": True}),
        ("dropout", {"dropout": 1.0}),
        ("d_ff", {"d_ff": 0}),
    ],
)
def test_config_validation_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        TinyLMConfig(**kwargs)


def test_init_is_deterministic_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a, b, c = TinyLM(CONFIG, seed=3), TinyLM(CONFIG, seed=3), TinyLM(CONFIG, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.q_proj.weight"], sc["blocks.0.attn.q_proj.weight"])


def test_forward_shape_and_causality():
    model = TinyLM(CONFIG, seed=0).eval()
    x = tokens()
    logits = model(x)
    assert logits.shape == (4, 16, CONFIG.vocab_size)
    changed = x.clone()
    changed[:, 10] = (changed[:, 10] + 1) % CONFIG.vocab_size
    other = model(changed)
    assert torch.equal(logits[:, :10], other[:, :10])  # the future cannot leak backwards
    assert not torch.allclose(logits[:, 10:], other[:, 10:])


def test_attention_mask_hides_padding_and_never_yields_nan():
    model = TinyLM(CONFIG, seed=0).eval()
    x = tokens(batch=2, seq=8)
    mask = torch.ones_like(x)
    mask[:, :3] = 0  # left padding: rows of padded queries must not become NaN
    logits = model(x, mask)
    assert torch.isfinite(logits).all()
    repadded = x.clone()
    repadded[:, :3] = 7  # different padding tokens, same real tokens
    assert torch.allclose(logits[:, 3:], model(repadded, mask)[:, 3:], atol=1e-6)


def test_sequence_longer_than_max_seq_len_is_rejected():
    with pytest.raises(ValueError, match="max_seq_len"):
        TinyLM(CONFIG)(tokens(seq=CONFIG.max_seq_len + 1))


def test_tied_embeddings_share_the_weight_and_cannot_be_pipelined():
    model = TinyLM(TinyLMConfig(tie_embeddings=True), seed=0)
    assert model.lm_head.weight is model.embed.tok.weight
    with pytest.raises(ValueError, match="tie_embeddings"):
        split_into_stages(model, 2)


def test_critic_returns_one_value_per_position():
    assert TinyCritic(CONFIG, seed=0)(tokens()).shape == (4, 16)


def test_100_steps_at_batch_8_seq_32_are_fast_and_learn(one_thread):
    dataset = MarkovTokenDataset(CONFIG.vocab_size, 32, num_samples=800, seed=0)
    loader = make_dataloader(dataset, batch_size=8, shuffle=True, seed=0)
    model = TinyLM(CONFIG, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    strategy = PretrainStrategy()
    losses = []
    # CPU time, not wall time: the budget is about the model's size, and a shared CI machine can
    # stretch wall time arbitrarily.
    start = time.process_time()
    for batch in loader:
        loss, _ = strategy.compute_loss(model, strategy.prepare_batch(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    elapsed = time.process_time() - start
    assert len(losses) == 100
    assert elapsed < 10, f"100 steps took {elapsed:.1f} s of CPU time"
    # Starts at ln(64) ~ 4.16; the chain's floor is ln(2) ~ 0.69.
    assert losses[0] > 4.0
    assert sum(losses[-10:]) / 10 < 1.5


@pytest.mark.parametrize(
    "n_layers, n_stages, expected", [(3, 1, [3]), (3, 2, [2, 1]), (5, 3, [2, 2, 1]), (4, 4, [1] * 4)]
)
def test_stage_layer_ranges_are_contiguous_and_balanced(n_layers, n_stages, expected):
    ranges = stage_layer_ranges(n_layers, n_stages)
    assert [len(r) for r in ranges] == expected
    assert [i for r in ranges for i in r] == list(range(n_layers))


@pytest.mark.parametrize("n_stages", [0, 4])
def test_stage_count_must_fit_the_layers(n_stages):
    with pytest.raises(ValueError, match="n_stages"):
        split_into_stages(TinyLM(CONFIG), n_stages)


@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_stages_chain_to_the_full_model_and_partition_its_names(n_stages):
    model = TinyLM(CONFIG, seed=0)
    stages = split_into_stages(model, n_stages)
    x = tokens()
    hidden = x
    for stage in stages:
        hidden = stage(hidden)
    assert torch.allclose(hidden, model(x), atol=1e-6)
    names = [k for s in stages for k in s.state_dict()]
    assert sorted(names) == sorted(model.state_dict())
    full = model.state_dict()
    assert all(torch.equal(v, full[k]) for s in stages for k, v in s.state_dict().items())
    # Deep copies: training a stage must not move the source model.
    assert all(
        p.data_ptr() != q.data_ptr() for s in stages for p in s.parameters() for q in model.parameters()
    )


def test_tensor_parallel_plan_names_existing_linear_layers():
    model = TinyLM(CONFIG)
    modules = dict(model.named_modules())
    plan = tensor_parallel_plan(model)
    assert len(plan) == 6 * CONFIG.n_layers
    assert all(isinstance(modules[name], torch.nn.Linear) for name in plan)
