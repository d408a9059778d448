"""Synthetic datasets and resumable StatefulDataLoader iteration."""

from __future__ import annotations

import io
from itertools import pairwise

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from dcp_forge.trainers.data import (
    BOS_ID,
    EOS_ID,
    FIRST_CONTENT_ID,
    PAD_ID,
    SEP_ID,
    MarkovTokenDataset,
    ReversalPreferenceDataset,
    ReversalSFTDataset,
    RolloutDataset,
    ShardedEpochSampler,
    make_dataloader,
    synthetic_ppo_rollouts,
)
from dcp_forge.trainers.losses import shift_labels, token_logprobs
from dcp_forge.trainers.tiny_lm import TinyLM, TinyLMConfig

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- datasets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: MarkovTokenDataset(64, 16, 50, seed=seed),
        lambda seed: ReversalSFTDataset(64, 16, 50, seed=seed),
        lambda seed: ReversalPreferenceDataset(64, 16, 50, seed=seed),
    ],
)
def test_items_depend_on_seed_and_index_only(make):
    a, b = make(0), make(0)
    assert same(a[7], b[7]) and same(a[3], make(0)[3])  # any instance, any access order
    assert not same(a[7], make(1)[7])
    assert not same(a[7], a[8])
    with pytest.raises(IndexError):
        a[50]


def test_markov_walks_follow_the_chain():
    data = MarkovTokenDataset(32, 24, 20, seed=3, branching=3)
    for i in range(len(data)):
        ids = data[i]["input_ids"].tolist()
        assert all(b in data.successors[a].tolist() for a, b in pairwise(ids))
    assert data.entropy_rate == pytest.approx(1.0986, abs=1e-4)


def test_sft_layout_is_bos_prompt_sep_reversal_eos_padding():
    data = ReversalSFTDataset(64, 20, 30, seed=0, min_prompt_len=2, max_prompt_len=5)
    lengths = set()
    for i in range(len(data)):
        item = data[i]
        ids, prompt_mask, attention = item["input_ids"].tolist(), item["prompt_mask"], item["attention_mask"]
        n = int(prompt_mask.sum()) - 2
        lengths.add(n)
        prompt = ids[1 : n + 1]
        assert ids[0] == BOS_ID and ids[n + 1] == SEP_ID and ids[2 * n + 2] == EOS_ID
        assert ids[n + 2 : 2 * n + 2] == prompt[::-1]
        assert all(FIRST_CONTENT_ID <= t < 64 for t in prompt)
        assert ids[2 * n + 3 :] == [PAD_ID] * (20 - 2 * n - 3)
        assert attention.tolist() == [1] * (2 * n + 3) + [0] * (20 - 2 * n - 3)
        assert prompt_mask.dtype == torch.bool
    assert lengths <= set(range(2, 6)) and len(lengths) > 1


def test_preference_pairs_share_the_prompt_and_differ_in_the_corrupted_tokens():
    data = ReversalPreferenceDataset(64, 20, 30, seed=0, min_prompt_len=3, num_corrupted=2)
    for i in range(len(data)):
        item = data[i]
        assert torch.equal(item["chosen_prompt_mask"], item["rejected_prompt_mask"])
        assert torch.equal(item["chosen_attention_mask"], item["rejected_attention_mask"])
        chosen, rejected = item["chosen_input_ids"], item["rejected_input_ids"]
        differ = (chosen != rejected).nonzero().squeeze(-1).tolist()
        response = (~item["chosen_prompt_mask"] & item["chosen_attention_mask"].bool()).nonzero().squeeze(-1)
        assert len(differ) == 2 and set(differ) <= set(response.tolist())
        assert (rejected[differ] >= FIRST_CONTENT_ID).all()


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: ReversalSFTDataset(5, 16, 10), "vocab_size"),
        (lambda: ReversalSFTDataset(64, 4, 10), "min_prompt_len"),
        (lambda: ReversalSFTDataset(64, 16, 0), "num_samples"),
        (lambda: ReversalPreferenceDataset(64, 16, 10, num_corrupted=2), "num_corrupted"),
        (lambda: MarkovTokenDataset(8, 16, 10, branching=9), "branching"),
        (lambda: RolloutDataset({"a": torch.zeros(3), "b": torch.zeros(4)}), "leading dimension"),
        (lambda: RolloutDataset({"a": torch.zeros(())}), "leading dimension"),
        (lambda: RolloutDataset({"a": torch.zeros(()), "b": torch.zeros(())}), "leading dimension"),
        (
            lambda: make_dataloader(MarkovTokenDataset(8, 4, 10), 2, num_shards=2, shard_index=2),
            "shard_index",
        ),
        (lambda: make_dataloader(MarkovTokenDataset(8, 4, 10), 0), "batch_size"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_ppo_rollouts_align_with_the_logits_and_score_accuracy():
    policy = TinyLM(TinyLMConfig(max_seq_len=16), seed=0)
    data = synthetic_ppo_rollouts(64, 16, 12, seed=0, policy=policy)
    t = data.tensors
    mask = t["action_mask"]
    assert not mask[:, -1].any()
    response = shift_labels(t["input_ids"]) != -100
    assert (mask <= response).all()
    assert (t["advantages"][~mask] == 0).all() and (t["returns"][~mask] == 0).all()
    # The reward is the fraction of correct response tokens (EOS excluded), in [0, 1], and varies.
    rewards = []
    for i in range(len(data)):
        ids = t["input_ids"][i].tolist()
        n = ids.index(SEP_ID) - 1
        correct = sum(a == b for a, b in zip(ids[n + 2 : 2 * n + 2], ids[1 : n + 1][::-1], strict=True))
        rewards.append(correct / n)
        assert t["returns"][i][mask[i]].unique().tolist() == pytest.approx([correct / n])
    assert len(set(rewards)) > 2
    # old_logprobs are the policy's: a PPO step on fresh rollouts starts at ratio 1.
    labels = torch.where(mask, shift_labels(t["input_ids"]), torch.full_like(t["input_ids"], -100))
    with torch.no_grad():
        expected = token_logprobs(policy(t["input_ids"], t["attention_mask"]), labels)
    torch.testing.assert_close(t["old_logprobs"], expected)


def test_ppo_rollouts_without_a_policy_draw_plausible_logprobs():
    t = synthetic_ppo_rollouts(64, 16, 6, seed=0).tensors
    values = t["old_logprobs"][t["action_mask"]]
    assert ((values < 0) & (values > -4.1)).all()
    assert "ref_logprobs" not in t and "old_values" not in t


# -- resumable loaders -----------------------------------------------------------------------------


def collect(loader, epochs: int) -> list[list[dict]]:
    return [list(loader) for _ in range(epochs)]


def roundtrip(state: dict) -> dict:
    """Through torch.save, as a checkpoint would carry it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# Stops: before any batch, mid-epoch, one before the end, on the last batch, in the second epoch.
STOPS = [0, 3, 9, 10, 14]
LOADER_CASES = [
    *(pytest.param(dict(shuffle=False), stop, id=f"sequential-{stop}") for stop in STOPS),
    *(pytest.param(dict(shuffle=True), stop, id=f"shuffle-{stop}") for stop in STOPS),
    *(
        pytest.param(dict(shuffle=True, num_shards=3, shard_index=1), stop, id=f"shard-{stop}")
        for stop in STOPS
    ),
    # Worker processes cost about a second per case: the two stops that differ most.
    *(pytest.param(dict(shuffle=True, num_workers=2), stop, id=f"2workers-{stop}") for stop in (3, 10)),
]


@pytest.mark.parametrize("kwargs, stop_after", LOADER_CASES)
def test_a_restored_loader_yields_exactly_the_remaining_batches(kwargs, stop_after):
    dataset = ReversalSFTDataset(64, 12, 60, seed=0)

    def build() -> StatefulDataLoader:
        return make_dataloader(dataset, 4, seed=11, **kwargs)

    per_epoch = len(build())
    reference = collect(build(), 3)
    interrupted, seen = build(), 0
    while seen < stop_after:  # stop mid-epoch, or right after an epoch's last batch
        for _ in interrupted:
            seen += 1
            if seen == stop_after:
                break
    epoch, offset = divmod(stop_after, per_epoch)
    if offset == 0 and stop_after:  # stopped on the last batch, before the loop saw the end
        epoch, offset = epoch - 1, per_epoch
    state = roundtrip(interrupted.state_dict())

    restored = build()
    restored.load_state_dict(state)
    rest = collect(restored, 3 - epoch)
    expected = [reference[epoch][offset:]] + reference[epoch + 1 :]
    assert [len(e) for e in rest] == [len(e) for e in expected]
    assert all(
        same(a, b) for got, want in zip(rest, expected, strict=True) for a, b in zip(got, want, strict=True)
    )


def test_later_epochs_reshuffle_and_shards_partition_each_epoch():
    dataset = MarkovTokenDataset(64, 4, 30, seed=0)
    first = [b["input_ids"] for b in make_dataloader(dataset, 5, shuffle=True, seed=2)]
    loader = make_dataloader(dataset, 5, shuffle=True, seed=2)
    epochs = [torch.cat([b["input_ids"] for b in loader]) for _ in range(2)]
    assert torch.equal(torch.cat(first), epochs[0]) and not torch.equal(epochs[0], epochs[1])
    for epoch in range(2):
        seen = []
        for shard in range(3):
            sampler = ShardedEpochSampler(30, shuffle=True, seed=2, num_shards=3, shard_index=shard)
            seen += sampler.order(epoch)
        assert sorted(seen) == list(range(30))


def test_iterating_and_restoring_never_touch_the_global_rng():
    dataset = MarkovTokenDataset(64, 4, 30, seed=0)
    before = torch.get_rng_state()
    loader = make_dataloader(dataset, 5, shuffle=True, seed=2)
    next(iter(loader))
    restored = make_dataloader(dataset, 5, shuffle=True, seed=2)
    restored.load_state_dict(loader.state_dict())
    list(restored)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_dataset_without_a_length_is_refused_naming_what_is_needed():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ({"input_ids": torch.zeros(2, dtype=torch.long)} for _ in range(4))

    with pytest.raises(TypeError, match="map-style Dataset with a length .*Stream"):
        make_dataloader(Stream(), 2)
    assert len(RolloutDataset({"a": torch.zeros(3, 2), "b": torch.zeros(3)})) == 3


def test_a_state_from_another_shard_count_is_refused():
    dataset = MarkovTokenDataset(64, 4, 30, seed=0)
    state = make_dataloader(dataset, 5, num_shards=2).state_dict()
    loader = make_dataloader(dataset, 5, num_shards=3)
    loader.load_state_dict(state)
    with pytest.raises(ValueError, match="num_shards"):
        next(iter(loader))
