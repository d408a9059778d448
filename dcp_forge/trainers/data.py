"""Synthetic datasets that need no downloads, and resumable dataloaders over them.

Every dataset is map-style and computes item ``i`` from ``(seed, i)`` alone, so an item is the same in
any process, in any order, after any restart; all resumable state lives in torchdata's
``StatefulDataLoader`` (sampler position and shuffle generator), which ``make_dataloader`` builds.

The languages are learnable, so the loss visibly falls:

- ``MarkovTokenDataset``: a seeded sparse Markov chain (each token has ``branching`` equally likely
  successors); the best achievable loss is ``entropy_rate`` = ln(branching), far below ln(vocab_size).
- ``ReversalSFTDataset``: ``BOS prompt SEP reversed(prompt) EOS PAD...``; the prompt is masked.
- ``ReversalPreferenceDataset``: the same prompts with the correct reversal as "chosen" and a
  corrupted one as "rejected".
- ``synthetic_ppo_rollouts``: reversal attempts with per-sample corruption rates, rewarded by their
  accuracy, packed as PPO rollout tensors (see ``strategies`` for the key alignment).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sized

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from .losses import IGNORE_INDEX, shift_labels, token_logprobs

__all__ = [
    "PAD_ID",
    "BOS_ID",
    "SEP_ID",
    "EOS_ID",
    "FIRST_CONTENT_ID",
    "MarkovTokenDataset",
    "ReversalSFTDataset",
    "ReversalPreferenceDataset",
    "RolloutDataset",
    "synthetic_ppo_rollouts",
    "ShardedEpochSampler",
    "make_dataloader",
]

PAD_ID, BOS_ID, SEP_ID, EOS_ID = 0, 1, 2, 3
FIRST_CONTENT_ID = 4


# Stream kinds, so the per-item streams never coincide with the dataset-wide ones.
_ITEM, _TABLE, _NOISE, _SHUFFLE = 0, 1, 2, 3


def _generator(seed: int, kind: int, index: int = 0) -> torch.Generator:
    """A generator for one (seed, kind, index) triple. SeedSequence mixes the words, so neighbouring
    indices or seeds give unrelated streams (``manual_seed(seed + i)`` would make seed 1 item 0 equal
    seed 0 item 1)."""
    words = [seed & 0xFFFF_FFFF_FFFF_FFFF, kind, index]  # SeedSequence takes non-negative ints only
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int (got {value!r})")


class MarkovTokenDataset(Dataset):
    """``{"input_ids": LongTensor(seq_len)}`` walks of a seeded sparse Markov chain over the vocabulary."""

    def __init__(
        self, vocab_size: int, seq_len: int, num_samples: int, seed: int = 0, branching: int = 2
    ) -> None:
        _check_positive(
            "MarkovTokenDataset",
            vocab_size=vocab_size,
            seq_len=seq_len,
            num_samples=num_samples,
            branching=branching,
        )
        if branching > vocab_size:
            raise ValueError(
                f"MarkovTokenDataset: branching must be <= vocab_size={vocab_size} (got {branching})"
            )
        self.vocab_size, self.seq_len, self.num_samples = vocab_size, seq_len, num_samples
        self.seed, self.branching = seed, branching
        table_gen = _generator(seed, _TABLE)
        self.successors = torch.stack(
            [torch.randperm(vocab_size, generator=table_gen)[:branching] for _ in range(vocab_size)]
        )
        self._table = self.successors.tolist()  # list indexing is what the per-token walk needs

    @property
    def entropy_rate(self) -> float:
        """Per-token cross entropy of a model that has learnt the chain perfectly."""
        return math.log(self.branching)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"MarkovTokenDataset index {index} out of range [0, {self.num_samples})")
        gen = _generator(self.seed, _ITEM, index)
        start = int(torch.randint(self.vocab_size, (1,), generator=gen))
        choices = torch.randint(self.branching, (self.seq_len - 1,), generator=gen).tolist()
        tokens = [start]
        for c in choices:
            tokens.append(self._table[tokens[-1]][c])
        return {"input_ids": torch.tensor(tokens, dtype=torch.long)}


class _ReversalTask:
    """Shared layout of the reversal datasets: ``BOS prompt SEP response EOS PAD...``."""

    def __init__(
        self,
        owner: str,
        vocab_size: int,
        seq_len: int,
        num_samples: int,
        seed: int,
        min_prompt_len: int,
        max_prompt_len: int | None,
    ) -> None:
        _check_positive(
            owner,
            vocab_size=vocab_size,
            seq_len=seq_len,
            num_samples=num_samples,
            min_prompt_len=min_prompt_len,
        )
        if vocab_size < FIRST_CONTENT_ID + 2:
            raise ValueError(f"{owner}: vocab_size must be >= {FIRST_CONTENT_ID + 2} (got {vocab_size})")
        longest = (seq_len - 3) // 2  # BOS, SEP and EOS around two copies of the prompt
        max_prompt_len = longest if max_prompt_len is None else max_prompt_len
        if not min_prompt_len <= max_prompt_len <= longest:
            raise ValueError(
                f"{owner}: need min_prompt_len <= max_prompt_len <= (seq_len - 3) // 2 = {longest} "
                f"(got min_prompt_len={min_prompt_len}, max_prompt_len={max_prompt_len}, seq_len={seq_len})"
            )
        self.owner = owner
        self.vocab_size, self.seq_len, self.num_samples, self.seed = vocab_size, seq_len, num_samples, seed
        self.min_prompt_len, self.max_prompt_len = min_prompt_len, max_prompt_len

    def check_index(self, index: int) -> None:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{self.owner} index {index} out of range [0, {self.num_samples})")

    def prompt(self, gen: torch.Generator) -> torch.Tensor:
        n = int(torch.randint(self.min_prompt_len, self.max_prompt_len + 1, (1,), generator=gen))
        return torch.randint(FIRST_CONTENT_ID, self.vocab_size, (n,), generator=gen)

    def corrupt(self, response: torch.Tensor, positions: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Replace ``response[positions]`` with a different content token each."""
        out = response.clone()
        n_content = self.vocab_size - FIRST_CONTENT_ID
        # An offset in [1, n_content) modulo the content range never maps a token onto itself.
        offsets = torch.randint(1, n_content, (len(positions),), generator=gen)
        out[positions] = (response[positions] - FIRST_CONTENT_ID + offsets) % n_content + FIRST_CONTENT_ID
        return out

    def layout(
        self, prompt: torch.Tensor, response: torch.Tensor, prefix: str = ""
    ) -> dict[str, torch.Tensor]:
        body = torch.cat(
            [torch.tensor([BOS_ID]), prompt, torch.tensor([SEP_ID]), response, torch.tensor([EOS_ID])]
        )
        input_ids = torch.full((self.seq_len,), PAD_ID, dtype=torch.long)
        input_ids[: len(body)] = body
        positions = torch.arange(self.seq_len)
        return {
            f"{prefix}input_ids": input_ids,
            f"{prefix}attention_mask": (positions < len(body)).long(),
            # BOS, prompt and SEP are context; the response and EOS are what the model must produce.
            f"{prefix}prompt_mask": positions < len(prompt) + 2,
        }


class ReversalSFTDataset(Dataset):
    """SFT pairs: ``input_ids``, ``attention_mask`` (long, 1 = real) and ``prompt_mask`` (bool)."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        num_samples: int,
        seed: int = 0,
        min_prompt_len: int = 1,
        max_prompt_len: int | None = None,
    ) -> None:
        self.task = _ReversalTask(
            "ReversalSFTDataset", vocab_size, seq_len, num_samples, seed, min_prompt_len, max_prompt_len
        )

    def __len__(self) -> int:
        return self.task.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.task.check_index(index)
        prompt = self.task.prompt(_generator(self.task.seed, _ITEM, index))
        return self.task.layout(prompt, prompt.flip(0))


class ReversalPreferenceDataset(Dataset):
    """DPO pairs: ``chosen_*`` (correct reversal) and ``rejected_*`` (``num_corrupted`` response tokens
    replaced), each with ``input_ids``, ``attention_mask`` and ``prompt_mask``; same prompt, same length."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        num_samples: int,
        seed: int = 0,
        min_prompt_len: int = 1,
        max_prompt_len: int | None = None,
        num_corrupted: int = 1,
    ) -> None:
        self.task = _ReversalTask(
            "ReversalPreferenceDataset",
            vocab_size,
            seq_len,
            num_samples,
            seed,
            min_prompt_len,
            max_prompt_len,
        )
        _check_positive("ReversalPreferenceDataset", num_corrupted=num_corrupted)
        if num_corrupted > min_prompt_len:
            raise ValueError(
                f"ReversalPreferenceDataset: num_corrupted must be <= min_prompt_len={min_prompt_len} "
                f"(got {num_corrupted}): every rejected response must differ from the chosen one"
            )
        self.num_corrupted = num_corrupted

    def __len__(self) -> int:
        return self.task.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.task.check_index(index)
        gen = _generator(self.task.seed, _ITEM, index)
        prompt = self.task.prompt(gen)
        chosen = prompt.flip(0)
        positions = torch.randperm(len(chosen), generator=gen)[: self.num_corrupted]
        rejected = self.task.corrupt(chosen, positions, gen)
        return {
            **self.task.layout(prompt, chosen, "chosen_"),
            **self.task.layout(prompt, rejected, "rejected_"),
        }


class RolloutDataset(Dataset):
    """A map-style view of a dict of equally long tensors: item ``i`` is ``{k: v[i]}``."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("RolloutDataset: tensors must not be empty")
        lengths = {k: v.shape[0] if v.dim() else None for k, v in tensors.items()}
        distinct = set(lengths.values())
        length = distinct.pop() if len(distinct) == 1 else None
        if length is None:
            raise ValueError(f"RolloutDataset: every tensor needs the same leading dimension (got {lengths})")
        self.tensors = dict(tensors)
        self._length: int = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}


@torch.no_grad()
def _model_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return token_logprobs(model(input_ids, attention_mask), labels)
    finally:
        model.train(was_training)


def synthetic_ppo_rollouts(
    vocab_size: int,
    seq_len: int,
    num_samples: int,
    seed: int = 0,
    policy: nn.Module | None = None,
    reference: nn.Module | None = None,
    critic: nn.Module | None = None,
) -> RolloutDataset:
    """Reversal attempts scored by accuracy, as PPO rollout tensors.

    Each sample corrupts its response with a rate drawn per sample, so rewards (fraction of correct
    response tokens) spread over [0, 1]. Keys: ``input_ids``, ``attention_mask``, ``action_mask``,
    ``old_logprobs``, ``advantages`` (batch-normalised reward on every action), ``returns`` (the
    reward), plus ``ref_logprobs`` with a ``reference`` and ``old_values`` with a ``critic``.
    ``old_logprobs`` come from ``policy`` when given (so the first PPO step has ratio 1), otherwise
    they are drawn at random in [-4, -0.05].
    """
    task = _ReversalTask("synthetic_ppo_rollouts", vocab_size, seq_len, num_samples, seed, 1, None)
    rows, rewards = [], []
    for index in range(num_samples):
        gen = _generator(seed, _ITEM, index)
        prompt = task.prompt(gen)
        correct = prompt.flip(0)
        wrong = torch.rand(len(correct), generator=gen) < torch.rand((), generator=gen)
        rows.append(task.layout(prompt, task.corrupt(correct, wrong.nonzero().squeeze(-1), gen)))
        rewards.append(1.0 - wrong.float().mean())
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    response = ~batch.pop("prompt_mask") & batch["attention_mask"].bool()
    labels = shift_labels(batch["input_ids"], response)
    action_mask = labels != IGNORE_INDEX
    reward = torch.stack(rewards)
    advantage = (reward - reward.mean()) / (reward.std() + 1e-6) if num_samples > 1 else reward * 0
    zeros = torch.zeros(action_mask.shape)
    out = {
        **batch,
        "action_mask": action_mask,
        "advantages": torch.where(action_mask, advantage[:, None], zeros),
        "returns": torch.where(action_mask, reward[:, None], zeros),
    }
    if policy is not None:
        out["old_logprobs"] = _model_logprobs(policy, batch["input_ids"], batch["attention_mask"], labels)
    else:
        draw = torch.rand(action_mask.shape, generator=_generator(seed, _NOISE)) * -3.95 - 0.05
        out["old_logprobs"] = torch.where(action_mask, draw, zeros)
    if reference is not None:
        out["ref_logprobs"] = _model_logprobs(reference, batch["input_ids"], batch["attention_mask"], labels)
    if critic is not None:
        with torch.no_grad():
            values = critic(batch["input_ids"], batch["attention_mask"])
        out["old_values"] = torch.where(action_mask, values, zeros)
    return RolloutDataset(out)


class ShardedEpochSampler(Sampler[int]):
    """Shard ``shard_index`` of ``num_shards`` of a per-epoch order, with its position as state.

    The order of epoch ``e`` is a pure function of ``(seed, e)`` (a permutation, or 0..n-1 without
    shuffling); shard ``s`` takes positions ``s, s + num_shards, ...`` of it, cut so every shard has the
    same length and ranks in lockstep never wait on each other. Each ``iter()`` starts the next epoch;
    ``state_dict()`` is ``{"epoch", "yielded", "num_shards"}`` of the current one.

    Why not StatefulDataLoader's own shuffling: in torchdata 0.11, after ``load_state_dict`` with
    ``num_workers=0`` the shuffle generator is one draw away from an uninterrupted run's, so every
    epoch after the resumed one is permuted differently; and ``StatefulDistributedSampler`` leaves the
    epoch out of its state. Deriving each epoch's order from ``(seed, epoch)`` makes restore exact
    whatever the worker count.
    """

    def __init__(
        self, length: int, *, shuffle: bool = True, seed: int = 0, num_shards: int = 1, shard_index: int = 0
    ) -> None:
        _check_positive("ShardedEpochSampler", length=length, num_shards=num_shards)
        if not 0 <= shard_index < num_shards:
            raise ValueError(
                f"ShardedEpochSampler: shard_index must be in [0, num_shards={num_shards}) (got {shard_index})"
            )
        if length < num_shards:
            raise ValueError(
                f"ShardedEpochSampler: length={length} leaves some of the {num_shards} shards empty"
            )
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.num_shards, self.shard_index = num_shards, shard_index
        self.epoch, self.yielded = -1, 0  # no epoch started yet
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.length // self.num_shards

    def order(self, epoch: int) -> list[int]:
        """This shard's indices for ``epoch``."""
        if self.shuffle:
            full = torch.randperm(self.length, generator=_generator(self.seed, _SHUFFLE, epoch))
        else:
            full = torch.arange(self.length)
        return full[self.shard_index :: self.num_shards][: len(self)].tolist()

    def __iter__(self) -> Iterator[int]:
        # Claim the epoch now, not at the first next(): state_dict() must describe the new epoch as
        # soon as the loader has asked for it.
        self.epoch, self.yielded = self._resume if self._resume is not None else (self.epoch + 1, 0)
        self._resume = None
        return self._walk(self.epoch, self.yielded)

    def _walk(self, epoch: int, start: int) -> Iterator[int]:
        for index in self.order(epoch)[start:]:
            if epoch != self.epoch:  # a newer iter() has replaced this one
                return
            self.yielded += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": max(self.epoch, 0), "yielded": self.yielded, "num_shards": self.num_shards}

    def load_state_dict(self, state_dict: Mapping[str, int]) -> None:
        if state_dict.get("num_shards") != self.num_shards:
            raise ValueError(
                f"ShardedEpochSampler.load_state_dict: num_shards must match the saved state "
                f"(saved {state_dict.get('num_shards')}, this sampler has {self.num_shards})"
            )
        epoch, yielded = int(state_dict["epoch"]), int(state_dict["yielded"])
        if not 0 <= yielded <= len(self):
            raise ValueError(
                f"ShardedEpochSampler.load_state_dict: yielded must be in [0, {len(self)}] (got {yielded})"
            )
        # Applied by the next iter(), which the loader makes right after loading.
        self._resume = (epoch, yielded)
        self.epoch, self.yielded = epoch, yielded


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    num_shards: int = 1,
    shard_index: int = 0,
) -> StatefulDataLoader:
    """A resumable ``StatefulDataLoader`` over shard ``shard_index`` of ``num_shards`` of ``dataset``.

    Order comes from a ``ShardedEpochSampler`` (see there for why), so ``state_dict()`` taken at any
    step and loaded into a fresh loader built with the same arguments yields exactly the batches the
    original would have, this epoch and the following ones. A private generator, seeded from
    ``seed``, feeds the loader's worker seeds, so iterating never draws from the global RNG that a
    checkpoint's RNG state covers.
    """
    _check_positive("make_dataloader", batch_size=batch_size)
    if not isinstance(dataset, Sized):  # the sampler orders the indices 0 .. len(dataset) - 1
        raise TypeError(f"make_dataloader: dataset must be a map-style Dataset with a length (got a "
                        f"{type(dataset).__name__} without __len__)")
    sampler = ShardedEpochSampler(
        len(dataset), shuffle=shuffle, seed=seed, num_shards=num_shards, shard_index=shard_index
    )
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        drop_last=drop_last,
    )
