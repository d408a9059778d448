"""Starting a run from Hugging Face weights: safetensors files (local or any storage URL) loaded into
a model that may already be sharded (FSDP2, tensor parallelism), no rank ever holding the whole model.

The way torchtitan's ``initial_load_in_hf`` does it: take the model's own state dict (DTensor shards
stay shards), rename it to the weights' names, and ``dcp.load`` it with a storage reader for
safetensors (``SafetensorsReader``), which reads for each shard only the bytes of its box. The
model is built with its final sharding first (on the meta device, then ``to_empty``), so it never
exists whole.

Only the model is touched: optimizer, scheduler, data and RNG state stay as they are (fresh), which
is what a run that starts from pretrained weights wants; later resumes load dcp_forge checkpoints.

Exact or refused: each weight must have the destination's shape; a dtype change is allowed when it
loses nothing (bf16 → fp32), otherwise only with ``allow_cast=True``. Model keys that no weight fills
are an error (``strict``), except keys tied to one that is filled (a model with tied embeddings
loads from weights that hold them once, as ``save_pretrained`` writes them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from .._torch_compat import single_process_dcp
from ..errors import (
    ComponentDeclarationError,
    MissingComponentError,
    StateMismatchError,
    UnexpectedComponentError,
    first_rank_failure,
)
from ..statefuls import ModelState
from ..storage import ReadStats, SafetensorsReader, redact_url
from .export_hf import KeyMap, apply_key_map


@dataclass(frozen=True)
class HFLoadResult:
    """What ``load_hf_into`` did on this rank.

    ``loaded``: model keys filled from the weights; ``tied``: model keys filled through a key they
    share memory with; ``missing``: model keys nothing filled (kept as they were; only with
    ``strict=False``); ``unexpected``: weight names with no model key (not read; only with
    ``strict=False``); ``read``: what this rank read from storage (bytes, per weight, and its largest
    temporary buffer).
    """

    loaded: tuple[str, ...]
    tied: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    read: ReadStats


def lossless_cast(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every value of ``source`` is exactly a value of ``target`` (bf16 → fp32: yes)."""
    if source == target:
        return True
    same_kind = (source.is_floating_point == target.is_floating_point
                 and source.is_complex == target.is_complex)
    return same_kind and source != torch.bool and torch.promote_types(source, target) == target


def _storage_identity(value: Any) -> tuple | None:
    """What two state-dict values that share memory (tied weights) have in common; None if empty."""
    if not isinstance(value, torch.Tensor):
        return None
    local = value.to_local() if hasattr(value, "to_local") else value
    if local.numel() == 0 or local.device.type == "meta":
        return None
    return (local.device, local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape),
            local.stride(), local.dtype)


def load_hf_into(target: torch.nn.Module | ModelState, url: str | os.PathLike, *,
                 storage_options: Mapping[str, Any] | None = None, key_map: KeyMap | None = None,
                 strict: bool = True, allow_cast: bool = False, thread_count: int = 2,
                 max_gap_bytes: int | None = None, process_group: Any = None) -> HFLoadResult:
    """Load the safetensors weights at ``url`` into ``target`` (a module, or a ``ModelState`` whose
    options are used) and return what was loaded.

    ``key_map`` renames weight names to the model's (a mapping renames those it holds; a callable
    returns the model key, or None to skip the weight). With a process group initialised this is
    collective: every rank of ``process_group`` (default: the world) calls it, and each reads only
    its own shards. ``max_gap_bytes``: see ``SafetensorsReader``.
    """
    state = target if isinstance(target, ModelState) else ModelState(target)
    where = redact_url(url)
    reader = SafetensorsReader(url, storage_options, thread_count=thread_count, max_gap_bytes=max_gap_bytes)
    reader.read_metadata()
    model_state = state.state_dict()

    requests: dict[str, Any] = {}
    destination: dict[str, str] = {}  # weight name -> model key
    unexpected: list[str] = []
    for name, item in reader.items.items():
        key = apply_key_map(name, key_map)
        if key is None:
            continue
        if key not in model_state:
            unexpected.append(name)
            continue
        if key in destination.values():
            other = next(n for n, k in destination.items() if k == key)
            raise ComponentDeclarationError(f"{where}: weights {other!r} and {name!r} both map to model key {key!r}")
        value = model_state[key]
        if not isinstance(value, torch.Tensor):
            raise StateMismatchError(f"{where}: weight {name!r} maps to model key {key!r}, which holds a "
                                     f"{type(value).__name__}, not a tensor")
        if tuple(value.shape) != item.tensor.shape:
            raise StateMismatchError(f"{where}: weight {name!r} has shape {list(item.tensor.shape)}, model key "
                                     f"{key!r} expects {list(value.shape)}")
        if not allow_cast and not lossless_cast(item.tensor.dtype, value.dtype):
            raise StateMismatchError(f"{where}: weight {name!r} is {item.tensor.dtype}, model key {key!r} is "
                                     f"{value.dtype}; the cast would lose information (pass allow_cast=True to "
                                     "cast anyway)")
        requests[name] = value
        destination[name] = key

    filled = set(destination.values())
    filled_storage = {_storage_identity(model_state[k]) for k in filled} - {None}
    tied = sorted(k for k in model_state if k not in filled and _storage_identity(model_state[k]) in filled_storage)
    missing = sorted(set(model_state) - filled - set(tied))
    if strict and unexpected:
        raise UnexpectedComponentError(f"{where} holds {len(unexpected)} weight(s) with no model key: "
                                       f"{sorted(unexpected)[:8]} (map them with key_map, or pass strict=False)")
    if strict and missing:
        raise MissingComponentError(f"{where} holds no weight for {len(missing)} model key(s): {missing[:8]} "
                                    "(map them with key_map, or pass strict=False to keep their values)")
    try:
        with single_process_dcp(not (dist.is_available() and dist.is_initialized())):
            dcp.load(requests, storage_reader=reader, planner=DefaultLoadPlanner(flatten_state_dict=False),
                     process_group=process_group)
    except BaseException as exc:  # DCP wraps errors in CheckpointException (a BaseException)
        original = first_rank_failure(exc)
        if original is None:
            raise
        raise original from exc
    state.load_state_dict(model_state)
    return HFLoadResult(tuple(sorted(filled)), tuple(tied), tuple(missing), tuple(sorted(unexpected)),
                        reader.stats)
