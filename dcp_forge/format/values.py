"""Values DCP alone would not give back exactly, and how dcp_forge keeps them exact or refuses them.

DCP stores a tensor as its storage's bytes with a dtype and a shape, and any other value as a pickle.
Left to itself that loses, without an error:

- lazy conjugate / negative views (``x.conj()``, ``torch._neg_view(x)``): ``torch.save`` stores the
  storage's bytes with the flags beside them, and a reader copying bytes would drop the flags.
  dcp_forge stores them as ``torch.save`` does (so ``torch.load`` and DCP's reader apply the flags),
  records the flags in ``index.parquet`` (``math_bits``) and reads the bytes back under the same
  flags: a destination the load creates gets them, one with the same flags receives the raw bytes,
  any other receives the values as torch computes them. (Resolving before writing would not be
  exact: torch's complex negation quiets signalling NaNs.)
- quantized, sparse and nested tensors ("opaque" here): their quantizer (scales, zero points, axis)
  or indices are not bytes of one strided storage. dcp_forge stores each one whole as a
  ``torch.save`` pickle, which a weights-only load rebuilds exactly, and a load puts the rebuilt
  tensor in place of the destination's value.
- dictionary keys that are not strings: see core/key_paths.py.
- non-tensor values are pickles that dcp_forge reads back weights-only. At save time each one is
  loaded back the same way, and a value that would not load (a numpy array, an enum, an object of a
  user class) is refused, naming its key, before anything is written.
- a tensor on the meta device has no data to store: refused.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..core.key_paths import KeyPath, decode_path
from ..core.tensors import MATH_BITS, is_plain_tensor, math_bits, with_math_bits
from ..errors import IntegrityError, UnsafeCheckpointError, UnsupportedValueError
from .index import ItemRecord
from .safe_load import load_object, refused_global

QUANTIZED_DTYPES = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})


@dataclass(frozen=True)
class SavedForm:
    """What DCP's metadata does not record about one saved value: the real keys on its path below the
    component (when one is not a ``str``) and the lazy-view flags of a tensor."""

    key_path: KeyPath | None = None
    math_bits: str | None = None

    def __bool__(self) -> bool:
        return self.key_path is not None or self.math_bits is not None


def saved_forms(records: Iterable[ItemRecord]) -> dict[str, SavedForm]:
    """``{fqn: SavedForm}`` for the stored values whose index rows record one (the rest: none)."""
    out: dict[str, SavedForm] = {}
    for record in records:
        if record.key_path is None and record.math_bits is None:
            continue
        try:
            if record.math_bits not in (None, *MATH_BITS):
                raise ValueError(f"unknown math bits {record.math_bits!r} (expected one of {MATH_BITS})")
            form = SavedForm(decode_path(record.key_path) if record.key_path is not None else None,
                             record.math_bits)
        except ValueError as err:
            raise IntegrityError(f"index row of {record.fqn!r} (component {record.component!r}) is malformed: "
                                 f"{err}") from err
        out[record.fqn] = form
    return out


def is_opaque_tensor(value: object) -> bool:
    """A tensor that is not dense strided storage (quantized, sparse, nested): stored whole, pickled."""
    return is_plain_tensor(value) and has_opaque_layout(value)


def has_opaque_layout(tensor: torch.Tensor) -> bool:
    """``is_opaque_tensor`` for a tensor already known to be plain (``is_plain_tensor``)."""
    return tensor.is_quantized or tensor.layout != torch.strided or tensor.is_nested


def opaque_copy(tensor: torch.Tensor) -> torch.Tensor:
    """An independent, exact copy of an opaque tensor: ``deepcopy`` for quantized ones (the one copy
    every quantized dtype and scheme supports), ``clone`` for sparse and nested ones (``deepcopy``
    fails on compressed sparse layouts)."""
    tensor = tensor.detach()
    return copy.deepcopy(tensor) if tensor.is_quantized else tensor.clone()


def refuse_unstorable_tensor(tensor: torch.Tensor, where: Callable[[str], str], name: str, *,
                             allow_meta: bool = False) -> None:
    """Refuse a tensor whose values cannot be stored: a meta tensor (it describes a value without
    holding one), or a lazy view whose flags torch cannot resolve for its dtype. ``where(name)`` names
    it (asked only for the error: a save checks every tensor)."""
    if tensor.is_meta and not allow_meta:
        raise UnsupportedValueError(
            f"{where(name)} is a tensor on the meta device: it holds no data to save (materialise it first, "
            "e.g. module.to_empty(device=...) and initialise it)")
    bits = math_bits(tensor)
    if bits and not _resolvable(tensor.dtype, bits):
        raise UnsupportedValueError(
            f"{where(name)} is a {tensor.dtype} tensor with the lazy {bits} view flags, for which torch has no "
            "kernel to compute its values, so they cannot be stored")


@functools.cache
def _resolvable(dtype: torch.dtype, bits: str) -> bool:
    try:
        with_math_bits(torch.empty(1, dtype=dtype), bits).resolve_conj().resolve_neg()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def pickled_value(value: object, where: str) -> io.BytesIO:
    """``value`` pickled as DCP stores it, after proving that dcp_forge's weights-only loader reads it
    back; raises UnsupportedValueError naming ``where`` otherwise."""
    data = io.BytesIO()
    torch.save(value, data)
    if _plainly_loadable(value):  # no global in its pickle: the trial load (most of the cost) would pass
        data.seek(0)
        return data
    try:
        load_object(data.getbuffer(), name=where)
    except UnsafeCheckpointError as err:
        needs = refused_global(err)
        if needs in ("bytes", "builtins.bytes"):
            needs = "(as pickle protocol 2 writes an empty bytes value, b'') calls builtins.bytes, which"
        else:
            needs = f"needs {needs}, which" if needs else "needs code that"
        raise UnsupportedValueError(
            f"{where} holds a <{type(value).__name__}> that cannot be saved exactly: its stored form {needs} "
            "dcp_forge's weights-only loader refuses to run, so no load could return it. Store it as tensors "
            "or plain Python values (a numpy array: torch.from_numpy(a); RNG states: dcp_forge.RNGState), or, "
            "if the type is yours and trusted, allow it with torch.serialization.add_safe_globals([...]) "
            "wherever you save and load") from err
    except pickle.UnpicklingError as err:  # should not happen for what torch.save just wrote
        raise UnsupportedValueError(f"{where} holds a <{type(value).__name__}> that does not load back: {err}") \
            from err
    data.seek(0)
    return data


_PLAIN_SCALARS = (int, float, complex, str, bool, type(None), bytearray)


def _plainly_loadable(value: object, depth: int = 0) -> bool:
    """Whether ``value`` is built of builtin scalars, non-empty bytes, lists, tuples, dicts and sets
    only, which pickle protocol 2 writes without any global the weights-only loader refuses; False
    for anything else (or very deep nesting), which the caller then proves by loading it."""
    # Exact types only: an instance of a subclass is pickled with a reference to its class, a global.
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True
    if type(value) is bytes:
        return len(value) > 0  # b"" is pickled as a call of builtins.bytes
    if depth > 32:
        return False
    if kind in (list, tuple, set) and isinstance(value, list | tuple | set):
        return all(_plainly_loadable(item, depth + 1) for item in value)
    if type(value) is dict:
        return all(_plainly_loadable(k, depth + 1) and _plainly_loadable(v, depth + 1) for k, v in value.items())
    return False


def overlapping_destination(tensor: torch.Tensor) -> bool:
    """A tensor whose elements share memory (an ``expand``-ed view): it cannot hold distinct values."""
    return any(stride == 0 and size > 1 for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
