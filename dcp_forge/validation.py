"""Replication checks: is state declared as shared really identical on the ranks that share it?

Run within each component's replica set (REPLICATED: all ranks; PER_GROUP: the group; PER_NODE:
the node) at the component's ``ValidationLevel``:

- QUICK: one xxh3 hash over the whole state (on a mismatch, a second round names the tensors);
- TENSOR: one hash per tensor / value, so a mismatch names the tensors;
- FULL: the values themselves are exchanged, one batch at a time, and compared bit for bit: a
  mismatch reports how many elements differ, the first one and the largest difference.

Comparisons are bitwise (so NaN equals NaN and -0.0 differs from 0.0) at every level, and hashing
reads each tensor's own memory in place: no copies for contiguous CPU tensors, and the hash threads
release the GIL, so the cost is memory bandwidth spread over a few cores.

Digests are pure functions of a state dict (testable in one process); ``check_replication`` is the
collective that exchanges them.

Call protocol: every rank calls ``check_replication`` with the same declarations, at the same point
(the coordinator does, before writing, when ``save_checkpoint(validate=True)``).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint._nested_dict import flatten_state_dict

from .errors import ReplicationError
from .sharing import SharingPattern, StateComponent, ValidationLevel
from .topology import Topology

logger = logging.getLogger(__name__)

_REPLICA_PATTERNS = (SharingPattern.REPLICATED, SharingPattern.PER_GROUP, SharingPattern.PER_NODE)

# Hash on several threads only when there is enough to hash: a thread costs ~50 µs to start.
_PARALLEL_HASH_BYTES = 16 * 1024 * 1024
_MAX_HASH_THREADS = 8
# FULL exchanges values in batches of about this many bytes per rank (memory: world size x batch).
FULL_BATCH_BYTES = 64 * 1024 * 1024
# At most this many differences are listed in one error message.
_MAX_LISTED = 20


# --- pure: digests of one rank's state ---------------------------------------------------------
def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose bytes this rank holds (a DTensor's local shard), on the CPU, contiguous."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t if t.is_contiguous() else t.contiguous()


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements as bytes, without copying a contiguous CPU tensor."""
    t = local_tensor(t)
    if t.numel() == 0:
        return memoryview(b"")
    # as_strided, not reshape: a contiguous tensor may carry odd strides on size-1 dims, which
    # reshape keeps and a byte view refuses; its elements are dense from storage_offset either way.
    return memoryview(t.as_strided((t.numel(),), (1,)).view(torch.uint8).numpy())


def value_digest(value: Any) -> str:
    """xxh3 of a tensor's dtype, shape and bytes, or of a plain value's pickle."""
    h = xxhash.xxh3_64()
    if isinstance(value, torch.Tensor):
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        h.update(raw_bytes(value))
    else:
        h.update(pickle.dumps(value, protocol=4))
    return h.hexdigest()


def flat_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    flat, _ = flatten_state_dict(dict(state_dict))
    return flat


def tensor_digests(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """TENSOR level: one digest per flattened key, hashed on a few threads when the state is big."""
    flat = sorted(flat_state(state_dict).items())
    total = sum(v.nbytes for _, v in flat if isinstance(v, torch.Tensor))
    threads = min(_MAX_HASH_THREADS, os.cpu_count() or 1, len(flat))
    if total < _PARALLEL_HASH_BYTES or threads < 2:
        return {k: value_digest(v) for k, v in flat}
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="forge-hash") as pool:
        return dict(zip([k for k, _ in flat], pool.map(value_digest, [v for _, v in flat]), strict=True))


def quick_digest(state_dict: Mapping[str, Any]) -> str:
    """QUICK level: one digest for the whole state (over the per-key digests, in key order)."""
    return combine_digests(tensor_digests(state_dict))


def combine_digests(digests: Mapping[str, str]) -> str:
    h = xxhash.xxh3_64()
    for key in sorted(digests):
        h.update(key.encode())
        h.update(digests[key].encode())
    return h.hexdigest()


# --- pure: comparing what the ranks of one replica set sent -----------------------------------
def split_by_value(values: Mapping[int, Any]) -> list[list[int]]:
    """Ranks grouped by equal value, largest group first (the odd ones out come last)."""
    groups: dict[Any, list[int]] = {}
    for rank in sorted(values):
        groups.setdefault(values[rank], []).append(rank)
    return sorted(groups.values(), key=lambda ranks: (-len(ranks), ranks))


def describe_split(groups: Sequence[Sequence[int]]) -> str:
    return "; ".join(f"ranks {list(ranks)}" for ranks in groups[:4]) + (" ..." if len(groups) > 4 else "")


def digest_disagreements(per_rank: Mapping[int, Mapping[str, str]]) -> list[str]:
    """Per-key differences between the ranks of one replica set (each rank: ``{key: digest}``)."""
    keys = sorted(set().union(*(set(d) for d in per_rank.values())))
    problems = []
    for key in keys:
        holders = {r: d[key] for r, d in per_rank.items() if key in d}
        if len(holders) < len(per_rank):
            missing = sorted(set(per_rank) - set(holders))
            problems.append(f"{key!r}: present on ranks {sorted(holders)}, absent on ranks {missing}")
            continue
        groups = split_by_value(holders)
        if len(groups) > 1:
            problems.append(f"{key!r}: differs across ranks ({describe_split(groups)} each agree)")
    return problems


def element_disagreement(ref: Any, other: Any) -> str | None:
    """How ``other`` differs from ``ref`` bit for bit (None: identical). Values may be tensors or plain."""
    if not (isinstance(ref, torch.Tensor) and isinstance(other, torch.Tensor)):
        if isinstance(ref, torch.Tensor) or isinstance(other, torch.Tensor):
            return f"one holds {type(ref).__name__}, the other {type(other).__name__}"
        same = pickle.dumps(ref, protocol=4) == pickle.dumps(other, protocol=4)
        return None if same else f"{_short(ref)} vs {_short(other)}"
    if ref.dtype != other.dtype or ref.shape != other.shape:
        return f"{ref.dtype}{tuple(ref.shape)} vs {other.dtype}{tuple(other.shape)}"
    a, b = local_tensor(ref), local_tensor(other)
    differ = _differing_elements(a, b)
    count = int(differ.sum())
    if count == 0:
        return None
    first = int(differ.nonzero()[0])
    text = f"{count} of {a.numel()} elements differ, first at {tuple(_unravel(first, a.shape))}"
    if a.is_floating_point() or a.is_complex():
        wide = torch.complex128 if a.is_complex() else torch.float64
        gap = (a.reshape(-1)[differ].to(wide) - b.reshape(-1)[differ].to(wide)).abs()
        finite = gap[torch.isfinite(gap)]
        text += f", max abs diff {float(finite.max()) if finite.numel() else float('nan'):.3g}"
    return text


def _differing_elements(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flat mask of elements whose bytes differ: bitwise, so NaN == NaN and -0.0 != 0.0."""
    n = a.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    return (a.reshape(-1).view(torch.uint8).reshape(n, -1) != b.reshape(-1).view(torch.uint8).reshape(n, -1)).any(1)


def _unravel(flat: int, shape: Sequence[int]) -> list[int]:
    out = []
    for size in reversed(tuple(shape)):
        out.append(flat % size)
        flat //= size
    return out[::-1]


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- the collective ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Finding:
    component: StateComponent
    problems: list[str]


def _distributed(topology: Topology) -> bool:
    import torch.distributed as dist

    return topology.world_size > 1 and dist.is_available() and dist.is_initialized()


def _all_gather(obj: Any, topology: Topology, group: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * topology.world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def _replica_sets(component: StateComponent, topology: Topology) -> list[tuple[int, ...]]:
    sets = {topology.replica_set(component.sharing_pattern, component.process_group_name, r)
            for r in range(topology.world_size)}
    return sorted(s for s in sets if len(s) > 1)


def check_replication(components: Sequence[StateComponent], topology: Topology, group: Any = None) -> None:
    """Collective: compare each validated component within its replica sets; raise or warn on mismatch.

    Every rank must call this with the same declarations (the coordinator checks that). Costs one
    ``all_gather_object`` of small digests for all QUICK/TENSOR components together, one more per
    QUICK component that mismatched (to name its tensors), and for FULL components one exchange per
    batch of values.
    """
    checked = [c for c in components if c.validate_replication and c.validation_level is not ValidationLevel.NONE
               and c.sharing_pattern in _REPLICA_PATTERNS]
    if not checked or not _distributed(topology):
        return  # one rank holds every copy it compares with: nothing can disagree
    states = {c.key: c.stateful.state_dict() for c in checked}
    findings = _digest_round(checked, states, topology, group)
    findings += [_full_round(c, states[c.key], topology, group)
                 for c in checked if c.validation_level is ValidationLevel.FULL]
    _report([f for f in findings if f.problems])


def _digest_round(checked: Sequence[StateComponent], states: Mapping[str, Any], topology: Topology,
                  group: Any) -> list[_Finding]:
    hashed = [c for c in checked if c.validation_level in (ValidationLevel.QUICK, ValidationLevel.TENSOR)]
    if not hashed:
        return []
    digests = {c.key: tensor_digests(states[c.key]) for c in hashed}
    mine = {c.key: combine_digests(digests[c.key]) if c.validation_level is ValidationLevel.QUICK else digests[c.key]
            for c in hashed}
    everyone = _all_gather(mine, topology, group)
    findings = []
    for c in hashed:
        if c.validation_level is ValidationLevel.TENSOR:
            problems = [p for ranks in _replica_sets(c, topology)
                        for p in digest_disagreements({r: everyone[r][c.key] for r in ranks})]
            findings.append(_Finding(c, problems))
            continue
        split = [split_by_value({r: everyone[r][c.key] for r in ranks}) for ranks in _replica_sets(c, topology)]
        # Every rank saw the same digests, so every rank takes this branch together: the second,
        # per-tensor exchange (only after a mismatch) is collective too.
        if any(len(groups) > 1 for groups in split):
            detail = _all_gather(digests[c.key], topology, group)
            problems = [f"whole-state hash differs ({describe_split(groups)} each agree)"
                        for groups in split if len(groups) > 1]
            problems += [p for ranks in _replica_sets(c, topology)
                         for p in digest_disagreements({r: detail[r] for r in ranks})]
            findings.append(_Finding(c, problems))
    return findings


def _full_round(component: StateComponent, state: Mapping[str, Any], topology: Topology, group: Any) -> _Finding:
    """Exchange values in batches (same batches on every rank) and compare them bit for bit."""
    flat = flat_state(state)
    sizes = _all_gather({k: (v.nbytes if isinstance(v, torch.Tensor) else 0) for k, v in flat.items()},
                        topology, group)
    largest: dict[str, int] = {}
    for per_rank in sizes:
        for key, nbytes in per_rank.items():
            largest[key] = max(largest.get(key, 0), nbytes)
    batches: list[list[str]] = [[]]
    filled = 0
    for key in sorted(largest):
        if batches[-1] and filled + largest[key] > FULL_BATCH_BYTES:
            batches.append([])
            filled = 0
        batches[-1].append(key)
        filled += largest[key]
    problems: list[str] = []
    replica_sets = _replica_sets(component, topology)
    for batch in batches:
        values = _all_gather({k: local_tensor(flat[k]) if isinstance(flat[k], torch.Tensor) else flat[k]
                              for k in batch if k in flat}, topology, group)
        for ranks in replica_sets:
            for key in batch:
                holders = [r for r in ranks if key in values[r]]
                if len(holders) < len(ranks):
                    if holders:
                        problems.append(f"{key!r}: present on ranks {holders}, absent on ranks "
                                        f"{sorted(set(ranks) - set(holders))}")
                    continue
                problems += _value_disagreements(key, {r: values[r][key] for r in holders})
        del values
    return _Finding(component, problems)


def _value_disagreements(key: str, values: Mapping[int, Any]) -> list[str]:
    """FULL: ranks grouped by bit-identical values, each minority group compared with the majority."""
    classes: list[list[int]] = []
    for rank in sorted(values):
        home = next((c for c in classes if element_disagreement(values[c[0]], values[rank]) is None), None)
        if home is None:
            classes.append([rank])
        else:
            home.append(rank)
    if len(classes) < 2:
        return []
    classes.sort(key=lambda ranks: (-len(ranks), ranks))
    majority = classes[0]
    return [f"{key!r}: differs across ranks ({describe_split(classes)} each agree); ranks {minority} vs ranks "
            f"{majority}: {element_disagreement(values[majority[0]], values[minority[0]])}"
            for minority in classes[1:]]


def _report(findings: Sequence[_Finding]) -> None:
    raising = []
    for finding in findings:
        c = finding.component
        shown = finding.problems[:_MAX_LISTED]
        more = len(finding.problems) - len(shown)
        message = (f"replication check ({c.validation_level.value}) failed for {c.sharing_pattern.name} component "
                   f"{c.key!r}: " + "; ".join(shown) + (f"; ... {more} more" if more else ""))
        if c.on_replication_mismatch == "warn":
            logger.warning("%s (saving anyway: on_replication_mismatch='warn')", message)
        else:
            raising.append(message)
    if raising:
        raise ReplicationError("\n".join(raising) + "\n(state declared shared differs across the ranks that "
                               "share it; fix the synchronisation, or declare it PER_RANK / set "
                               "on_replication_mismatch='warn' if the difference is harmless)")


__all__ = ["FULL_BATCH_BYTES", "check_replication", "combine_digests", "digest_disagreements",
           "element_disagreement", "quick_digest", "tensor_digests", "value_digest"]
