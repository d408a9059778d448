"""Exporting a checkpoint's model as Hugging Face weights: what ``transformers``' ``from_pretrained``
loads, written with bounded memory.

The output is what ``save_pretrained`` writes (``format/safetensors.py``): ``model.safetensors``, or
``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_size`` bytes and
``model.safetensors.index.json``, shards filled in the order the model's state dict had when it was
saved, so a model saved through ``ModelState`` exports into the same files ``save_pretrained`` makes.

Tensors are read a batch of at most ``buffer_size`` bytes at a time (a tensor larger than that is
a batch of its own) through ``ForgeStorageReader``: the checkpoint's records are cross-checked and
every stored item's checksum verified, and chunks of one tensor written by different ranks (FSDP2
or tensor-parallel DTensors, row-cut replicated tensors) are assembled by DCP's load planning, at
whatever world size the checkpoint was saved. Each batch is written into its file and dropped
before the next is read, so peak memory is about one batch (plus its cast copy when ``dtype``
changes it), never the model; the files stream to local disk or straight to object storage.

Names: the component prefix (``model.``) is removed; so are the segments torch wrappers insert
(``_orig_mod`` of ``torch.compile``, ``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``) and a
``module.`` prefix that every name carries (DDP). ``ModelState`` saves names without them already.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_local_load_plan
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from ..core.keys import top_level_key
from ..errors import ComponentDeclarationError, IntegrityError, MissingComponentError
from ..format.safetensors import (
    INDEX_NAME,
    SHARD_NAME_RE,
    WEIGHTS_NAME,
    TensorSpec,
    dtype_name,
    encode_header,
    encode_index,
    parse_size,
    plan_shards,
    shard_file_names,
    tensor_order,
)
from ..storage import ForgeStorageReader, StorageBackend, byte_view, join_url, open_backend, redact_url

DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_BUFFER_SIZE = 1024**3
# What transformers writes into every weight file's metadata (and checks when loading).
FILE_METADATA = {"format": "pt"}
# Module names torch wrappers insert into parameter names.
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
DTYPE_ALIASES: Mapping[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}

KeyMap = Mapping[str, str] | Callable[[str], str | None]


@dataclass(frozen=True)
class ExportedTensor:
    """One tensor of the export: its name in the checkpoint and in the files, dtypes and shape."""

    fqn: str
    spec: TensorSpec  # name, dtype and shape as written
    stored_dtype: torch.dtype


@dataclass(frozen=True)
class HFExport:
    """What ``export_hf`` wrote: the weight files (in shard order), the index if there is one, the
    tensor count, the bytes of tensor data, and the non-tensor values left out (safetensors holds
    tensors only)."""

    url: str
    files: tuple[str, ...]
    index: str | None
    tensors: int
    total_size: int
    skipped: tuple[str, ...]


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` → ``torch.bfloat16``; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = DTYPE_ALIASES.get(str(value).lower().removeprefix("torch."))
    if dtype is None:
        raise ValueError(f"'dtype' must be one of {sorted(DTYPE_ALIASES)} (got {value!r})")
    return dtype


def apply_key_map(name: str, key_map: KeyMap | None) -> str | None:
    """``name`` renamed by ``key_map``: a mapping renames the names it holds and keeps the others, a
    callable returns the new name or None to leave the tensor out."""
    if key_map is None:
        return name
    if isinstance(key_map, Mapping):
        return key_map.get(name, name)
    return key_map(name)


def unwrapped_names(names: Sequence[str]) -> list[str]:
    """``names`` without the segments torch wrappers insert, and without a ``module.`` prefix when
    every name has one."""
    out = [".".join(s for s in n.split(".") if s not in WRAPPER_SEGMENTS) for n in names]
    if out and all(n.startswith("module.") for n in out):
        out = [n[len("module."):] for n in out]
    return out


def plan_export(metadata: Metadata, component: str, *, dtype: torch.dtype | None = None,
                key_map: KeyMap | None = None, exclude: Sequence[str] = (), where: str = "checkpoint"
                ) -> tuple[list[ExportedTensor], list[str]]:
    """The tensors of ``component`` to export, in saved state-dict order, and the fqns of its
    non-tensor values (left out). Raises before anything is written when a name collides, a dtype
    cannot be stored, or the component holds nothing."""
    prefix = component + "."
    fqns = [fqn for fqn in metadata.state_dict_metadata if fqn.startswith(prefix)]
    if not fqns:
        held = sorted({top_level_key(f) for f in metadata.state_dict_metadata})
        raise MissingComponentError(f"{where} has no component {component!r} (it holds {held})")
    tensors: list[ExportedTensor] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}
    for fqn, saved_name in zip(fqns, unwrapped_names([f[len(prefix):] for f in fqns]), strict=True):
        md = metadata.state_dict_metadata[fqn]
        if not isinstance(md, TensorStorageMetadata):
            skipped.append(fqn)
            continue
        name = apply_key_map(saved_name, key_map)
        if name is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        if name in seen:
            raise ComponentDeclarationError(f"{where}: {seen[name]!r} and {fqn!r} would both be exported as "
                                            f"{name!r}; rename one with key_map")
        seen[name] = fqn
        stored = md.properties.dtype
        out = dtype if dtype is not None and stored.is_floating_point else stored
        dtype_name(out, fqn)  # refuse what safetensors cannot store, before writing
        tensors.append(ExportedTensor(fqn, TensorSpec(name, out, tuple(md.size)), stored))
    if not tensors:
        raise MissingComponentError(f"{where}: component {component!r} has no tensor left to export")
    return tensors, skipped


def export_hf(url: str | os.PathLike, out: str | os.PathLike, *, component: str = "model",
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: str | torch.dtype | None = None,
              config: str | os.PathLike | Mapping[str, Any] | None = None, key_map: KeyMap | None = None,
              exclude: Sequence[str] = (), overwrite: bool = False,
              storage_options: Mapping[str, Any] | None = None,
              out_storage_options: Mapping[str, Any] | None = None,
              buffer_size: int | str = DEFAULT_BUFFER_SIZE, thread_count: int = 2,
              progress: Callable[[int], None] | None = None) -> HFExport:
    """Write ``component`` of the checkpoint at ``url`` as Hugging Face safetensors weights into the
    directory ``out`` (local or any storage URL) and return what was written.

    ``dtype`` casts floating-point tensors (others keep theirs); ``config``: a ``config.json`` to copy
    (a path or URL, read with ``storage_options``) or a mapping to write as one; ``key_map`` renames
    (see ``apply_key_map``) and ``exclude`` leaves out names matching its glob patterns (after
    renaming), e.g. ``lm_head.weight`` of a model with tied embeddings. Existing weight files in
    ``out`` are an error unless ``overwrite``, which also removes shards the new export does not
    use. ``progress(n)`` is called with the bytes of each tensor written. The index is written after
    every shard; an export that fails removes the shards it wrote (and, with ``overwrite``, what is left
    of the earlier export), then raises.
    """
    url, out = os.fspath(url), os.fspath(out)
    out_dtype = parse_dtype(dtype)
    shard_limit = parse_size(max_shard_size)
    batch_limit = parse_size(buffer_size)
    reader = ForgeStorageReader(url, storage_options, thread_count=thread_count)
    metadata = reader.read_metadata()
    tensors, skipped = plan_export(metadata, component, dtype=out_dtype, key_map=key_map, exclude=exclude,
                                   where=redact_url(url))
    config_bytes = _config_bytes(config, storage_options)

    backend, directory = open_backend(out, out_storage_options)
    backend.makedirs(directory)
    stale = [n for n in backend.list_dir(directory) if n in (WEIGHTS_NAME, INDEX_NAME) or SHARD_NAME_RE.match(n)]
    if stale and not overwrite:
        raise FileExistsError(f"{redact_url(out)} already holds weights ({stale[:3]}); pass overwrite=True "
                              "(--overwrite) to replace them")

    by_name = {t.spec.name: t for t in tensors}
    shards = plan_shards([t.spec for t in tensors], shard_limit)
    names = shard_file_names(len(shards))
    reader.set_up_storage_reader(metadata, True)
    written: list[str] = []
    try:
        for name, shard in zip(names, shards, strict=True):
            written.append(name)
            _write_file(backend, backend.join(directory, name), [by_name[s.name] for s in shard], reader,
                        metadata, batch_limit, progress)
    except BaseException:
        # No half export: shards without their index mislead, and so would what is left of an earlier
        # export (reached only with overwrite) once some of its shards were replaced.
        for name in {*written, *stale}:
            backend.remove(backend.join(directory, name))
        raise
    total_size = sum(t.spec.nbytes for t in tensors)
    index = None
    if len(names) > 1:
        weight_map = {spec.name: name for name, shard in zip(names, shards, strict=True) for spec in shard}
        backend.write_bytes(backend.join(directory, INDEX_NAME),
                            encode_index(weight_map, total_size, sum(t.spec.numel for t in tensors)))
        index = INDEX_NAME
    if config_bytes is not None:
        backend.write_bytes(backend.join(directory, "config.json"), config_bytes)
    for name in stale:  # only reached with overwrite: files of an earlier export this one does not have
        if name not in names and name != index:
            backend.remove(backend.join(directory, name))
    backend.sync_dir(directory)
    return HFExport(out, tuple(join_url(out, n) for n in names), join_url(out, index) if index else None,
                    len(tensors), total_size, tuple(skipped))


def _config_bytes(config: str | os.PathLike | Mapping[str, Any] | None,
                  storage_options: Mapping[str, Any] | None) -> bytes | None:
    """The config.json to write, read and checked before any weight is written."""
    if config is None:
        return None
    if isinstance(config, Mapping):
        return (json.dumps(dict(config), indent=2, sort_keys=True) + "\n").encode()
    backend, path = open_backend(config, storage_options)
    data = backend.fs.cat_file(path)  # through fsspec: a config in a Hub cache is a symbolic link
    try:
        parsed = json.loads(data)
    except ValueError as err:
        raise ValueError(f"config {redact_url(config)} is not JSON ({err})") from err
    if not isinstance(parsed, dict):
        raise ValueError(f"config {redact_url(config)} must hold a JSON object")
    return data


def _batches(tensors: Sequence[ExportedTensor], limit: int) -> Iterator[list[ExportedTensor]]:
    """Consecutive tensors in groups of at most ``limit`` stored bytes (a larger tensor alone)."""
    batch: list[ExportedTensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.spec.numel * tensor.stored_dtype.itemsize
        if batch and size + nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(tensor)
        size += nbytes
    if batch:
        yield batch


def read_tensors(reader: ForgeStorageReader, metadata: Metadata,
                 tensors: Sequence[ExportedTensor]) -> dict[str, torch.Tensor]:
    """The whole stored ``tensors`` (by fqn, as stored), assembled from their chunks by DCP's load
    planning and read (checksums verified) by ``reader``, whose ``set_up_storage_reader`` has been called."""
    state: dict[str, Any] = {}
    for tensor in tensors:
        state[tensor.fqn] = torch.empty(tensor.spec.shape, dtype=tensor.stored_dtype)
    planner = DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    planner.set_up_planner(state, metadata, True)
    plan = reader.prepare_local_plan(create_default_local_load_plan(state, metadata, True))
    reader.read_data(plan, planner).wait()
    return state


def _write_file(backend: StorageBackend, path: str, tensors: Sequence[ExportedTensor], reader: ForgeStorageReader,
                metadata: Metadata, batch_limit: int, progress: Callable[[int], None] | None) -> None:
    """One safetensors file: its header, then its tensors' bytes in file order, a batch at a time."""
    ordered_specs = tensor_order([t.spec for t in tensors])
    by_name = {t.spec.name: t for t in tensors}
    ordered = [by_name[s.name] for s in ordered_specs]
    header = encode_header(ordered_specs, FILE_METADATA)
    stream = backend.open_output(path)
    try:
        stream.write(header)
        for batch in _batches(ordered, batch_limit):
            values = read_tensors(reader, metadata, batch)
            for tensor in batch:
                value = values.pop(tensor.fqn)
                if value.dtype != tensor.spec.dtype:
                    value = value.to(tensor.spec.dtype)
                if value.nbytes:
                    stream.write(byte_view(value.contiguous()))
                del value
                if progress is not None:
                    progress(tensor.spec.nbytes)
        expected = len(header) + sum(t.spec.nbytes for t in tensors)
        if stream.tell() != expected:
            raise IntegrityError(f"{path}: wrote {stream.tell()} bytes, the header describes {expected}")
    except BaseException:
        stream.abort()
        raise
    stream.close()
