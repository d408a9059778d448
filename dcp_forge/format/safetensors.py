"""The safetensors file format and Hugging Face's sharded-weights conventions, as pure functions.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON header
(padded with spaces to a multiple of 8), then every tensor's bytes back to back, row-major, little
endian. The header maps each name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the end of the header) and may hold ``"__metadata__"``: a str → str map.

Files are laid out the way the safetensors library lays them out (``tensor_order``: larger item
types first, then by name), so every tensor starts at a multiple of its item size and a file written
here is byte for byte the file ``safetensors.torch.save`` writes for the same tensors.

Hugging Face's sharded weights (``transformers``' ``save_pretrained``): one ``model.safetensors``
when everything fits into one shard; otherwise ``model-00001-of-0000N.safetensors`` ... and
``model.safetensors.index.json`` mapping every tensor name to its file. Tensors fill shards greedily
in state-dict order, a tensor larger than the shard limit getting a shard of its own
(``plan_shards``, as ``huggingface_hub.split_torch_state_dict_into_shards``).
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import IntegrityError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
HEADER_LENGTH_BYTES = 8
# The safetensors library refuses larger headers (a guard against reading a hostile length prefix).
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"

# Every dtype safetensors stores, in the order the library writes them into a file (descending).
_DTYPE_ORDER: tuple[tuple[str, torch.dtype], ...] = (
    ("U64", torch.uint64), ("I64", torch.int64), ("F64", torch.float64), ("C64", torch.complex64),
    ("F32", torch.float32), ("U32", torch.uint32), ("I32", torch.int32), ("BF16", torch.bfloat16),
    ("F16", torch.float16), ("U16", torch.uint16), ("I16", torch.int16),
    ("F8_E5M2FNUZ", torch.float8_e5m2fnuz), ("F8_E4M3FNUZ", torch.float8_e4m3fnuz),
    ("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2), ("I8", torch.int8),
    ("U8", torch.uint8), ("BOOL", torch.bool),
)
DTYPE_NAMES: Mapping[torch.dtype, str] = {dtype: name for name, dtype in _DTYPE_ORDER}
DTYPES: Mapping[str, torch.dtype] = {name: dtype for name, dtype in _DTYPE_ORDER}
_RANK = {name: i for i, (name, _) in enumerate(_DTYPE_ORDER)}

# Units of ``parse_size``: Hugging Face's decimal ones, and binary ones for those who mean them.
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a safetensors file: name, dtype and shape (its bytes come from elsewhere)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class StoredTensor:
    """A tensor found in a safetensors header: where its bytes are in the file (absolute offsets)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def dtype_name(dtype: torch.dtype, key: str) -> str:
    """The safetensors name of ``dtype`` (``"BF16"``), or a ValueError naming ``key``."""
    name = DTYPE_NAMES.get(dtype)
    if name is None:
        raise ValueError(f"{key!r} has dtype {dtype}, which safetensors cannot store "
                         f"(it stores {', '.join(str(d) for d in DTYPE_NAMES)})")
    return name


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"`` (10**9, as Hugging Face reads it) or
    ``"512MiB"`` (2**20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (match := _SIZE_RE.match(size)) and match.group(2).upper() in _SIZE_UNITS:
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    else:
        raise ValueError(f"a size must be an int or a string like '5GB' or '512MiB' (got {size!r})")
    if value <= 0:
        raise ValueError(f"a size must be positive (got {size!r})")
    return value


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """``specs`` (in state-dict order) cut into shards of at most ``max_shard_size`` bytes, greedily,
    exactly as Hugging Face cuts them: a tensor larger than the limit gets a shard of its own, placed
    before the shard being filled."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_bytes = 0
    for spec in specs:
        if spec.nbytes > max_shard_size:
            shards.append([spec])
            continue
        if current_bytes + spec.nbytes > max_shard_size:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(spec)
        current_bytes += spec.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(count: int) -> list[str]:
    """The file names of ``count`` shards: ``model.safetensors`` alone, else ``model-0000i-of-0000N``."""
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def encode_index(weight_map: Mapping[str, str], total_size: int, total_parameters: int) -> bytes:
    """``model.safetensors.index.json`` as ``save_pretrained`` writes it."""
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
             "weight_map": dict(weight_map)}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


def tensor_order(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """``specs`` in the order their bytes follow each other in a file."""
    return sorted(specs, key=lambda s: (_RANK[dtype_name(s.dtype, s.name)], s.name))


def encode_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a file holding ``specs`` in ``tensor_order``."""
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for spec in tensor_order(specs):
        if spec.name == METADATA_KEY or spec.name in header:
            raise ValueError(f"tensor name {spec.name!r} is reserved or used twice in one safetensors file")
        header[spec.name] = {"dtype": dtype_name(spec.dtype, spec.name), "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def header_length(prefix: bytes, where: str) -> int:
    """The JSON header's length from a file's first 8 bytes, refused when implausible."""
    if len(prefix) != HEADER_LENGTH_BYTES:
        raise IntegrityError(f"{where} is not a safetensors file: it ends within its 8-byte header length")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES:
        raise IntegrityError(f"{where}: safetensors header length {length} exceeds {MAX_HEADER_BYTES} bytes")
    return length


def decode_header(header: bytes, where: str, file_size: int | None = None
                  ) -> tuple[dict[str, str], list[StoredTensor]]:
    """The metadata and tensors of a safetensors header (without its 8-byte length prefix), each
    tensor with absolute file offsets, checked the way the safetensors library checks them: known
    dtypes, byte ranges that match dtype × shape and tile the data section without gap or overlap,
    and (given ``file_size``) a data section that ends where the file ends."""
    try:
        parsed = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise IntegrityError(f"{where}: safetensors header is not JSON ({err})") from err
    if not isinstance(parsed, dict):
        raise IntegrityError(f"{where}: safetensors header is not a JSON object")
    metadata = parsed.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise IntegrityError(f"{where}: safetensors __metadata__ must map strings to strings")
    start = HEADER_LENGTH_BYTES + len(header)
    tensors = []
    for name, info in parsed.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise IntegrityError(f"{where}: tensor {name!r} has an unreadable header entry {info!r} "
                                 f"({type(err).__name__}: {err})") from err
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * dtype.itemsize:
            raise IntegrityError(f"{where}: tensor {name!r} ({info['dtype']}, shape {list(shape)}) needs "
                                 f"{math.prod(shape) * dtype.itemsize} bytes, its data_offsets span "
                                 f"{end - begin}")
        tensors.append(StoredTensor(name, dtype, shape, start + begin, start + end))
    tensors.sort(key=lambda t: (t.begin, t.end))
    expected = start
    for tensor in tensors:
        if tensor.begin != expected:
            raise IntegrityError(f"{where}: tensor {tensor.name!r} starts at byte {tensor.begin}, expected "
                                 f"{expected} (the data section has a gap or an overlap)")
        expected = tensor.end
    if file_size is not None and file_size != expected:
        raise IntegrityError(f"{where}: its header describes a file of {expected} bytes, the file holds {file_size}")
    return metadata, tensors


def check_file_name(name: object, where: str) -> str:
    """A weight file named in an index: one plain file name, so reads never leave the directory."""
    if (not isinstance(name, str) or not name.endswith(".safetensors") or posixpath.basename(name) != name
            or "\\" in name or name in (".", "..")):
        raise IntegrityError(f"{where}: {name!r} is not a safetensors file name inside the directory")
    return name


def box_runs(shape: Sequence[int], itemsize: int, offsets: Sequence[int], lengths: Sequence[int]
             ) -> tuple[int, np.ndarray]:
    """Where the box ``offsets``/``lengths`` of a row-major tensor lies: ``(run_bytes, starts)``,
    byte offsets (from the tensor's first byte) of the contiguous runs that hold it, in the box's
    own row-major order. A box of whole rows is one run; a column block is one run per row."""
    dims = len(shape)
    if len(offsets) != dims or len(lengths) != dims:
        raise ValueError(f"box {list(offsets)}+{list(lengths)} does not match shape {list(shape)}")
    if any(o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, lengths, shape, strict=True)):
        raise ValueError(f"box {list(offsets)}+{list(lengths)} lies outside shape {list(shape)}")
    if math.prod(lengths) == 0:
        return 0, np.zeros(0, dtype=np.int64)
    if dims == 0:
        return itemsize, np.zeros(1, dtype=np.int64)
    strides = [itemsize * math.prod(shape[d + 1:]) for d in range(dims)]
    split = dims - 1  # the outermost dim from which the box covers everything to its right
    while split > 0 and lengths[split] == shape[split]:
        split -= 1
    run = lengths[split] * strides[split]
    starts = np.array([offsets[split] * strides[split]], dtype=np.int64)
    for d in range(split - 1, -1, -1):  # dims left of the split vary slower: one run per index
        steps = (offsets[d] + np.arange(lengths[d], dtype=np.int64)) * strides[d]
        starts = (steps[:, None] + starts[None, :]).reshape(-1)
    return run, starts
