"""Storage keys: the on-storage name of a component's copy (documented in docs/FORMAT.md).

DCP deduplicates by key without comparing values, so state that differs across ranks must never share
a key. GLOBAL and REPLICATED components are one logical value and keep their plain key (plain
``dcp.load`` finds them by it); the other patterns get a namespace naming *which* copy:

=========== ================================ =========================
pattern     storage key                      example
=========== ================================ =========================
GLOBAL      ``<key>``                        ``trainer``
REPLICATED  ``<key>``                        ``model``
PER_RANK    ``<key>@rank<r>``                ``rng@rank3``
PER_NODE    ``<key>@node<n>``                ``cache@node1``
PER_GROUP   ``<key>@<group>[<ranks>]``       ``model@pp_group[0-6:2]``
=========== ================================ =========================

``<ranks>`` is the group's sorted global ranks, compressed into comma-separated runs: ``a`` (one
rank), ``a-b`` (a..b), ``a-b:s`` (a..b step s). All functions are pure.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import ComponentDeclarationError
from .patterns import SharingPattern, validate_component_key
from .topology import Ranks, Topology

NAMESPACE_SEP = "@"

_RANK_RE = re.compile(r"^rank(0|[1-9][0-9]*)$")
_NODE_RE = re.compile(r"^node(0|[1-9][0-9]*)$")
_GROUP_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_\-]*)\[([0-9,:\-]+)\]$")
_RUN_RE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")


def encode_ranks(ranks: Sequence[int]) -> str:
    """Compress sorted distinct ranks into runs; the inverse of ``decode_ranks``."""
    rs = sorted(set(int(r) for r in ranks))
    if not rs or rs[0] < 0:
        raise ComponentDeclarationError(f"cannot encode rank list {list(ranks)}")
    parts: list[str] = []
    i = 0
    while i < len(rs):
        if i + 1 == len(rs):
            parts.append(str(rs[i]))
            break
        step = rs[i + 1] - rs[i]
        j = i + 1
        while j + 1 < len(rs) and rs[j + 1] - rs[j] == step:
            j += 1
        if step == 1:
            parts.append(f"{rs[i]}-{rs[j]}")
            i = j + 1
        elif j - i >= 2:
            parts.append(f"{rs[i]}-{rs[j]}:{step}")
            i = j + 1
        else:  # two ranks with a gap: not worth a stride run
            parts.append(str(rs[i]))
            i += 1
    return ",".join(parts)


def decode_ranks(text: str) -> Ranks:
    ranks: list[int] = []
    for part in text.split(","):
        m = _RUN_RE.match(part)
        if not m:
            raise ComponentDeclarationError(f"malformed rank list {text!r} in a storage key")
        start = int(m.group(1))
        stop = int(m.group(2)) if m.group(2) is not None else start
        step = int(m.group(3)) if m.group(3) is not None else 1
        if stop < start or step < 1:
            raise ComponentDeclarationError(f"malformed rank run {part!r} in a storage key")
        ranks.extend(range(start, stop + 1, step))
    out = tuple(sorted(set(ranks)))
    if encode_ranks(out) != text:  # one spelling per rank list, so keys compare as strings
        raise ComponentDeclarationError(f"rank list {text!r} is not in canonical form")
    return out


@dataclass(frozen=True)
class StorageKey:
    """A parsed storage key: which component, and which copy of it."""

    component: str
    pattern: SharingPattern | None  # None: GLOBAL or REPLICATED (not told apart by the key)
    rank: int | None = None
    node: int | None = None
    group_name: str | None = None
    group_ranks: Ranks | None = None

    def __str__(self) -> str:
        if self.pattern is SharingPattern.PER_RANK:
            return f"{self.component}{NAMESPACE_SEP}rank{self.rank}"
        if self.pattern is SharingPattern.PER_NODE:
            return f"{self.component}{NAMESPACE_SEP}node{self.node}"
        if self.pattern is SharingPattern.PER_GROUP:
            return (f"{self.component}{NAMESPACE_SEP}{self.group_name}"
                    f"[{encode_ranks(self.group_ranks or ())}]")
        return self.component


def storage_key(component: str, pattern: SharingPattern, topology: Topology,
                group_name: str | None = None, rank: int | None = None) -> str:
    """The storage key of ``component``'s copy held by ``rank`` (default: the topology's rank)."""
    rank = topology.rank if rank is None else rank
    if pattern is SharingPattern.PER_RANK:
        key = StorageKey(component, pattern, rank=rank)
    elif pattern is SharingPattern.PER_NODE:
        key = StorageKey(component, pattern, node=topology.node_of_rank[rank])
    elif pattern is SharingPattern.PER_GROUP:
        if group_name is None:
            raise ComponentDeclarationError(f"PER_GROUP component {component!r} needs a group name")
        key = StorageKey(component, pattern, group_name=group_name,
                         group_ranks=topology.group_of(group_name, rank))
    else:
        key = StorageKey(component, None)
    return str(key)


def parse_storage_key(key: str) -> StorageKey:
    """Inverse of ``storage_key``; raises ValueError for keys this scheme never produces."""
    component, sep, namespace = key.partition(NAMESPACE_SEP)
    validate_component_key(component, field_name="component key in storage key")
    if not sep:
        return StorageKey(component, None)
    if m := _RANK_RE.match(namespace):
        return StorageKey(component, SharingPattern.PER_RANK, rank=int(m.group(1)))
    if m := _NODE_RE.match(namespace):
        return StorageKey(component, SharingPattern.PER_NODE, node=int(m.group(1)))
    if m := _GROUP_RE.match(namespace):
        return StorageKey(component, SharingPattern.PER_GROUP, group_name=m.group(1),
                          group_ranks=decode_ranks(m.group(2)))
    raise ComponentDeclarationError(f"storage key {key!r} has an unknown namespace {namespace!r}")


def top_level_key(fqn: str) -> str:
    """The storage key an item belongs to: the first segment of DCP's dotted FQN."""
    return fqn.split(".", 1)[0]


def match_keys(patterns: Sequence[str], relative_keys: Iterable[str]) -> tuple[set[str], tuple[str, ...]]:
    """The component-relative keys (``"layers.0.weight"``) some glob pattern selects, and the
    patterns that select nothing (a typo the caller must hear about)."""
    chosen: set[str] = set()
    used: set[str] = set()
    for key in relative_keys:
        hits = [p for p in patterns if fnmatch.fnmatchcase(key, p)]
        if hits:
            chosen.add(key)
            used.update(hits)
    return chosen, tuple(p for p in patterns if p not in used)
