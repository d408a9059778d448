"""``diff_checkpoints``: which components, tensors and keys differ between two checkpoints.

The comparison is columnar: both item tables (index.parquet) are joined on (fqn, chunk offsets) and
rows whose stored bytes have the same xxh3 are equal without reading them; a 1,000,000-item diff
takes seconds (benchmarks/index_scale.py). Only items whose checksums differ (or that were chunked
differently, or have no checksum: plain DCP checkpoints) are read — through the index, one item at a
time — to report the maximum absolute difference of tensors or the two values of other keys. Items
whose bytes differ but whose values are bitwise equal (e.g. saved by another torch version) are not
reported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from .inspection import VALUE_COLUMNS, OpenCheckpoint

# Everything the comparison and the reading of differing values need, read once per checkpoint.
_COLUMNS = sorted(set(VALUE_COLUMNS) | {"dtype"})


@dataclass(frozen=True)
class Difference:
    """One difference. ``scope``: "component", "tensor" or "key" (a non-tensor value)."""

    scope: str
    name: str  # component key or fqn
    change: str  # "only in A", "only in B", "dtype", "shape", "values", "value"
    detail: str = ""
    max_abs_diff: float | None = None

    def __str__(self) -> str:
        text = f"{self.scope} {self.name}: {self.change}"
        return f"{text} ({self.detail})" if self.detail else text


def _chunk_key(table: pa.Table) -> pa.Array:
    """The chunk offsets as text ("0,512"), so that (fqn, chunk) can be a join key."""
    return pc.fill_null(pc.binary_join(pc.cast(table["chunk_offsets"], pa.list_(pa.string())), ","), "")


def _equal(x: pa.ChunkedArray, y: pa.ChunkedArray) -> bool:
    return len(x) == len(y) and bool(pc.all(pc.fill_null(pc.equal(x, y), False)).as_py() in (True, None))


def _same_keys(a: pa.Table, b: pa.Table) -> bool:
    """Whether both tables list the same (fqn, chunk offsets) in the same order.

    Writers store the index sorted by (fqn, chunk offsets), so two checkpoints of one job usually
    agree row by row, and can then be compared positionally instead of by a join.
    """
    if a.num_rows != b.num_rows or not _equal(a["fqn"], b["fqn"]):
        return False
    oa, ob = a["chunk_offsets"], b["chunk_offsets"]
    return (_equal(pc.is_null(oa), pc.is_null(ob)) and _equal(pc.list_value_length(oa), pc.list_value_length(ob))
            and _equal(pc.list_flatten(oa), pc.list_flatten(ob)))


def _only_in(x: pa.Array, y: pa.Array) -> set[str]:
    return set(x.filter(pc.invert(pc.is_in(x, value_set=y))).to_pylist())


def _suspects(a: pa.Table, b: pa.Table) -> tuple[set[str], set[str], set[str]]:
    """fqns only in A, only in B, and in both with some chunk whose bytes may differ.

    Columnar throughout: only the (few) fqns in the answer become Python objects.
    """
    if _same_keys(a, b):
        differ = pc.invert(pc.fill_null(pc.equal(a["checksum"], b["checksum"]), False))
        return set(), set(), set(pc.unique(a["fqn"].filter(differ)).to_pylist())
    fqns_a, fqns_b = pc.unique(a["fqn"]), pc.unique(b["fqn"])
    keyed_a = pa.table({"fqn": a["fqn"], "chunk": _chunk_key(a), "checksum": a["checksum"]})
    keyed_b = pa.table({"fqn": b["fqn"], "chunk": _chunk_key(b), "checksum": b["checksum"]})
    joined = keyed_a.join(keyed_b, keys=["fqn", "chunk"], join_type="full outer", left_suffix="_a",
                          right_suffix="_b", coalesce_keys=True)
    same = pc.fill_null(pc.equal(joined["checksum_a"], joined["checksum_b"]), False)
    maybe = pc.unique(joined.filter(pc.invert(same))["fqn"])
    in_both = pc.and_(pc.is_in(maybe, value_set=fqns_a), pc.is_in(maybe, value_set=fqns_b))
    return _only_in(fqns_a, fqns_b), _only_in(fqns_b, fqns_a), set(maybe.filter(in_both).to_pylist())


def _first_rows(table: pa.Table, fqns: set[str]) -> dict[str, dict[str, Any]]:
    rows = table.filter(pc.is_in(table["fqn"], pa.array(sorted(fqns), pa.string()))).select(
        ["fqn", "component", "kind", "dtype", "shape"]).to_pylist()
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        out.setdefault(row["fqn"], row)
    return out


def _max_abs_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.dtype == torch.bool:
        return float((x != y).any())
    if x.is_complex():
        return float((x - y).abs().max()) if x.numel() else 0.0
    if not x.numel():
        return 0.0
    if x.is_floating_point():
        return float((x.double() - y.double()).abs().nan_to_num(nan=math.inf).max())
    return float((x.long() - y.long()).abs().max())


def _bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and bytes(x.contiguous().reshape(-1).view(torch.uint8).numpy()) \
        == bytes(y.contiguous().reshape(-1).view(torch.uint8).numpy())


def _values_equal(x: Any, y: Any) -> bool:
    try:
        return bool(x == y)
    except (RuntimeError, TypeError, ValueError):  # containers of tensors: no single truth value
        return repr(x) == repr(y)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def diff_checkpoints(a: str | os.PathLike, b: str | os.PathLike, storage_options: Mapping[str, Any] | None = None,
                     *, values: bool = True, progress: Callable[[int], None] | None = None) -> list[Difference]:
    """The differences between checkpoints ``a`` and ``b`` (an empty list: same components and values).

    ``values=False`` compares checksums only (no data is read; a differing item is reported as
    "values differ" without its maximum difference). ``progress(n)`` is called after each compared item.
    """
    ckpt_a, ckpt_b = OpenCheckpoint.open(a, storage_options), OpenCheckpoint.open(b, storage_options)
    table_a, table_b = ckpt_a.table(_COLUMNS), ckpt_b.table(_COLUMNS)
    diffs: list[Difference] = []

    components_a = set(table_a["component"].unique().to_pylist())
    components_b = set(table_b["component"].unique().to_pylist())
    for name in sorted(components_a - components_b):
        diffs.append(Difference("component", name, "only in A"))
    for name in sorted(components_b - components_a):
        diffs.append(Difference("component", name, "only in B"))

    only_a, only_b, maybe = _suspects(table_a, table_b)
    rows_a, rows_b = _first_rows(table_a, only_a | maybe), _first_rows(table_b, only_b | maybe)
    for fqns, rows, side in ((only_a, rows_a, "only in A"), (only_b, rows_b, "only in B")):
        for fqn in sorted(fqns):
            row = rows[fqn]
            if row["component"] in components_a ^ components_b:
                continue  # reported once, as a whole component
            diffs.append(Difference("tensor" if row["kind"] == "tensor" else "key", fqn, side))

    for fqn in sorted(maybe):
        ra, rb = rows_a[fqn], rows_b[fqn]
        scope = "tensor" if ra["kind"] == "tensor" else "key"
        if ra["kind"] != rb["kind"]:
            diffs.append(Difference(scope, fqn, "kind", f"A holds a {ra['kind']}, B a {rb['kind']}"))
        elif ra["dtype"] != rb["dtype"]:
            diffs.append(Difference(scope, fqn, "dtype", f"A {ra['dtype']}, B {rb['dtype']}"))
        elif ra["shape"] != rb["shape"]:
            diffs.append(Difference(scope, fqn, "shape", f"A {tuple(ra['shape'])}, B {tuple(rb['shape'])}"))
        elif not values:
            diffs.append(Difference(scope, fqn, "values" if scope == "tensor" else "value", "stored bytes differ"))
        else:
            x, y = ckpt_a.read_values([fqn])[fqn], ckpt_b.read_values([fqn])[fqn]
            if scope == "tensor":
                if not _bitwise_equal(x, y):
                    delta = _max_abs_diff(x, y)
                    diffs.append(Difference(scope, fqn, "values", f"max abs diff {delta:.6g}", delta))
            elif not _values_equal(x, y):
                diffs.append(Difference(scope, fqn, "value", f"A {_short(x)}, B {_short(y)}"))
        if progress is not None:
            progress(1)
    return diffs


def differences_as_dicts(diffs: list[Difference]) -> list[dict[str, Any]]:
    return [asdict(d) for d in diffs]
