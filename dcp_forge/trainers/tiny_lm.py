"""A tiny causal language model, defined here so demos and tests need no downloads.

Pre-norm transformer: token + learned position embedding, ``n_layers`` blocks of causal self-attention
and a GELU MLP, a final LayerNorm and an LM head (tied to the token embedding or not).

Three ways to run it across ranks, each kept as a function over the plain model so the single-device
model stays the one source of truth:

- ``split_into_stages`` cuts it into pipeline stages for ``torch.distributed.pipelining``;
- ``tensor_parallel_plan`` / ``apply_tensor_parallel`` shard the attention and MLP projections
  (Megatron style: column-parallel in, row-parallel out) on a 1-D tensor-parallel mesh;
- ``apply_fsdp2`` shards it with FSDP2's ``fully_shard``, one unit per block plus the root; it runs
  on CPU/gloo, alone or across the data-parallel dimension of a TP model (DP×TP).

Parameter names (FQNs) of a stage are the full model's names, so a pipeline checkpoint's keys are a
partition of the single-device model's keys.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

if TYPE_CHECKING:
    from torch.distributed.tensor.parallel import ParallelStyle

__all__ = [
    "TinyLMConfig",
    "TinyLM",
    "TinyCritic",
    "TinyLMStage",
    "split_into_stages",
    "stage_layer_ranges",
    "tensor_parallel_plan",
    "apply_tensor_parallel",
    "apply_fsdp2",
]

# GPT-2's init scale: small enough that a freshly built model predicts near-uniform logits.
_INIT_STD = 0.02


@dataclass(frozen=True)
class TinyLMConfig:
    vocab_size: int = 64
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    max_seq_len: int = 64
    dropout: float = 0.0
    # None means 4 * d_model, the usual transformer MLP width.
    d_ff: int | None = None
    # Untied by default: a tied head shares the first stage's embedding with the last stage,
    # which pipeline parallelism cannot express without extra communication.
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TinyLMConfig.{name} must be a positive int (got {value!r})")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TinyLMConfig.d_model must be divisible by n_heads (got d_model={self.d_model}, "
                f"n_heads={self.n_heads})"
            )
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff < 1):
            raise ValueError(f"TinyLMConfig.d_ff must be a positive int or None (got {self.d_ff!r})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TinyLMConfig.dropout must be in [0, 1) (got {self.dropout!r})")

    @property
    def ff_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with separate q/k/v projections.

    Separate projections (rather than one fused qkv matrix) let tensor parallelism shard each
    column-wise so every rank holds whole heads; the number of local heads is read from the projected
    tensor's width, so the same code runs unsharded and sharded.
    """

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        d = config.d_model
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.ff_dim)
        self.fc_out = nn.Linear(config.ff_dim, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), attn_mask))
        return x + self.drop(self.mlp(self.ln2(x)))


class Embedding(nn.Module):
    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.max_seq_len = config.max_seq_len

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.max_seq_len:
            raise ValueError(f"input_ids has {t} positions; TinyLMConfig.max_seq_len is {self.max_seq_len}")
        positions = torch.arange(t, device=input_ids.device)
        return self.drop(self.tok(input_ids) + self.pos(positions))


def _attention_mask(t: int, device: torch.device, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean (B or 1, 1, T, T) mask: True where a query may attend to a key.

    Every query may attend to itself even when it is padding, so no row is fully masked: a fully
    masked row makes softmax return NaN, which would poison the gradients of real tokens too.
    """
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    if padding_mask is None:
        return causal[None, None]
    keys = padding_mask.to(torch.bool)[:, None, None, :]
    diagonal = torch.eye(t, dtype=torch.bool, device=device)
    return causal[None, None] & (keys | diagonal)


def _init_weights(module: nn.Module, seed: int) -> None:
    """Deterministic init from ``seed`` alone, without touching the global RNG."""
    gen = torch.Generator().manual_seed(seed)
    # named_modules is ordered by registration, so the draw order is fixed for a given config.
    for _, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, 0.0, _INIT_STD, generator=gen)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, 0.0, _INIT_STD, generator=gen)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class _Backbone(nn.Module):
    """Embedding, blocks and final norm: what the LM and the critic share."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, d_model) final-norm hidden states. ``attention_mask``: (B, T), 1 = real token."""
        x = self.embed(input_ids)
        mask = _attention_mask(input_ids.shape[1], input_ids.device, attention_mask)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


class TinyLM(_Backbone):
    """``TinyLM(config, seed)(input_ids, attention_mask=None) -> logits`` of shape (B, T, vocab_size).

    Logit ``[:, t]`` predicts token ``t + 1``. Two models built with the same config and seed have
    identical parameters.
    """

    def __init__(self, config: TinyLMConfig, seed: int = 0) -> None:
        # nn.Linear's default init draws from the global RNG; fork it so that building a model does not
        # shift the random stream the training loop (dropout, sampling) sees afterwards.
        with torch.random.fork_rng(devices=[]):
            super().__init__(config)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        _init_weights(self, seed)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.tok.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask))


class TinyCritic(_Backbone):
    """A value model for PPO: the same backbone with a scalar head, ``(B, T)`` values."""

    def __init__(self, config: TinyLMConfig, seed: int = 0) -> None:
        with torch.random.fork_rng(devices=[]):  # as in TinyLM
            super().__init__(config)
            self.value_head = nn.Linear(config.d_model, 1)
        _init_weights(self, seed)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.value_head(self.hidden_states(input_ids, attention_mask)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------
# Pipeline parallelism


class TinyLMStage(nn.Module):
    """One pipeline stage of a TinyLM: a contiguous run of blocks, plus the embedding on the first
    stage and the final norm + LM head on the last.

    ``forward`` takes token ids on the first stage and hidden states elsewhere; it has no attention
    mask because pipelining passes only tensors between stages and pretraining batches are unpadded.
    Blocks live in a ModuleDict keyed by their index in the full model, so parameter names match it.
    """

    def __init__(self, model: TinyLM, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.config = model.config
        self.embed = model.embed if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        mask = _attention_mask(x.shape[1], x.device, None)
        for block in self.blocks.values():
            x = block(x, mask)
        if self.lm_head is not None and self.norm is not None:  # both belong to the last stage
            x = self.lm_head(self.norm(x))
        return x


def stage_layer_ranges(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous, balanced block ranges: the first ``n_layers % n_stages`` stages get one extra."""
    if n_stages < 1 or n_stages > n_layers:
        raise ValueError(f"n_stages must be in [1, n_layers={n_layers}] (got {n_stages})")
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def split_into_stages(model: TinyLM, n_stages: int) -> list[TinyLMStage]:
    """Cut ``model`` into ``n_stages`` stages for ``torch.distributed.pipelining.PipelineStage``.

    Each stage owns a deep copy of its part, so a rank can keep its stage and drop the rest (and the
    stages never alias each other's parameters). Chaining the stages reproduces ``model(input_ids)``.
    """
    if model.config.tie_embeddings and n_stages > 1:
        raise ValueError(
            "TinyLMConfig.tie_embeddings must be False to split into more than one pipeline stage: "
            "the first and last stage would share the embedding weight"
        )
    ranges = stage_layer_ranges(model.config.n_layers, n_stages)
    return [
        copy.deepcopy(TinyLMStage(model, layers, first=(s == 0), last=(s == n_stages - 1)))
        for s, layers in enumerate(ranges)
    ]


# ---------------------------------------------------------------------------------------------------
# Tensor parallelism


def tensor_parallel_plan(model: _Backbone) -> dict[str, ParallelStyle]:
    """``parallelize_module`` plan: q/k/v and fc_in column-parallel, out_proj and fc_out row-parallel.

    Each block then needs one all-reduce in attention and one in the MLP; embeddings, norms and the
    head stay replicated (they are tiny, and replicating them keeps the loss code unchanged).
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, ParallelStyle] = {}
    for i in range(len(model.blocks)):
        prefix = f"blocks.{i}"
        for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"):
            plan[f"{prefix}.{name}"] = ColwiseParallel()
        for name in ("attn.out_proj", "mlp.fc_out"):
            plan[f"{prefix}.{name}"] = RowwiseParallel()
    return plan


def apply_tensor_parallel(model: _Backbone, tp_mesh: DeviceMesh) -> _Backbone:
    """Shard ``model`` in place over the 1-D ``tp_mesh`` and return it.

    Projections in the plan become DTensors; the rest (embeddings, norms, head) stay plain tensors that
    every tensor-parallel rank holds in full and updates identically, since the column-parallel input
    hooks all-reduce their gradients.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    size = tp_mesh.size()
    config = model.config
    for field, value in (("n_heads", config.n_heads), ("d_ff", config.ff_dim)):
        if value % size:
            raise ValueError(
                f"TinyLMConfig.{field}={value} must be divisible by the tensor-parallel size {size}"
            )
    parallelize_module(model, tp_mesh, tensor_parallel_plan(model))  # in place (it returns model)
    return model


def apply_fsdp2(model: _Backbone, dp_mesh: DeviceMesh, *, reshard_after_forward: bool = True) -> _Backbone:
    """Shard ``model`` in place with FSDP2 over the 1-D ``dp_mesh`` and return it.

    One FSDP unit per block, so only one block's parameters are gathered at a time, and the root
    for the embeddings, final norm and head. Apply ``apply_tensor_parallel`` first for DP×TP.
    """
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    return model
