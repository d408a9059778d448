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

Call protocol: every rank calls ``check_replication`` (or ``start_replication_check``) with the same
declarations, at the same point. ``save_checkpoint(validate=True)`` starts the check on a thread and
process group of its own as the save begins, so hashing overlaps the save's I/O, and the coordinator
rank waits for the verdict before it commits: a mismatch means nothing is committed.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ._torch_compat import flatten_state_dict
from .core.components import StateComponent
from .core.patterns import SharingPattern, ValidationLevel
from .core.tensors import math_bits, raw_view
from .core.topology import Topology
from .errors import ReplicationError
from .format.values import is_opaque_tensor

logger = logging.getLogger(__name__)

_REPLICA_PATTERNS = (SharingPattern.REPLICATED, SharingPattern.PER_GROUP, SharingPattern.PER_NODE)

# Hash on several threads only when there is enough to hash: starting a thread is not free.
_PARALLEL_HASH_BYTES = 16 * 1024 * 1024
_MAX_HASH_THREADS = 8
# FULL exchanges values in batches of about this many bytes per rank (memory: world size x batch).
FULL_BATCH_BYTES = 64 * 1024 * 1024
# At most this many differences are listed in one error message.
_MAX_LISTED = 20


# --- pure: digests of one rank's state ---------------------------------------------------------
def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose bytes this rank holds (a DTensor's local shard), on the CPU, contiguous; a
    lazy view's storage bytes without its flags (which ``value_digest`` hashes apart)."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    t = raw_view(t.detach())
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
    return t.as_strided((t.numel(),), (1,)).view(torch.uint8).numpy().data


def value_digest(value: Any) -> str:
    """xxh3 of a tensor's dtype, shape, lazy-view flags and bytes (a quantized or sparse one's
    quantizer or indices too), or of a plain value's pickle."""
    h = xxhash.xxh3_64()
    if isinstance(value, torch.Tensor):
        for part in _tensor_parts(value):
            h.update(part.encode() if isinstance(part, str) else part)
    else:
        h.update(pickle.dumps(value, protocol=4))
    return h.hexdigest()


def _tensor_parts(t: torch.Tensor) -> list[str | memoryview]:
    """What makes a tensor the value it is, as text and bytes to hash."""
    head = f"{t.dtype}{'nested' if t.is_nested else tuple(t.shape)}{math_bits(t) or ''}"
    if not is_opaque_tensor(t):
        return [head, raw_bytes(t)]
    if t.is_quantized:
        scheme = t.qscheme()
        quantizer: list[str | memoryview]
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            quantizer = [f"{scheme}{t.q_scale().hex()}{t.q_zero_point()}"]
        else:
            quantizer = [f"{scheme}{t.q_per_channel_axis()}", *_tensor_parts(t.q_per_channel_scales()),
                         *_tensor_parts(t.q_per_channel_zero_points())]
        return [head, *quantizer, *_tensor_parts(t.int_repr())]
    if t.layout == torch.sparse_coo:
        return [f"{head}coo{t.is_coalesced()}", *_tensor_parts(t._indices()), *_tensor_parts(t._values())]
    parts: tuple[torch.Tensor, ...]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = (t.crow_indices(), t.col_indices(), t.values())
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = (t.ccol_indices(), t.row_indices(), t.values())
    else:  # nested
        parts = tuple(t.unbind())
    return [f"{head}{t.layout}{len(parts)}", *(p for part in parts for p in _tensor_parts(part))]


def flat_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    flat, _ = flatten_state_dict(dict(state_dict))
    return flat


def tensor_digests(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """TENSOR level: one digest per flattened key, hashed on a few threads when the state is big."""
    flat = sorted(flat_state(state_dict).items())
    total = sum(v.nbytes for _, v in flat if isinstance(v, torch.Tensor) and not is_opaque_tensor(v))
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


def _gather_computed(compute: Callable[[], Any], topology: Topology, group: Any, what: str) -> list[Any]:
    """Every rank's ``compute()``, gathered; if it failed anywhere, raise on every rank.

    A rank that failed alone and left would leave the others waiting in the exchange forever.
    """
    try:
        mine, failure = compute(), None
    except Exception as err:  # shared below, raised on every rank
        mine, failure = None, f"{type(err).__name__}: {err}"
    everyone = _all_gather((mine, failure), topology, group)
    failed = {rank: f for rank, (_, f) in enumerate(everyone) if f is not None}
    if failed:
        raise ReplicationError(f"replication check could not read {what} on ranks {sorted(failed)}: "
                               + "; ".join(f"rank {r}: {f}" for r, f in sorted(failed.items())))
    return [value for value, _ in everyone]


def _replica_sets(component: StateComponent, topology: Topology) -> list[tuple[int, ...]]:
    sets = {topology.replica_set(component.sharing_pattern, component.process_group_name, r)
            for r in range(topology.world_size)}
    return sorted(s for s in sets if len(s) > 1)


def needs_replication_check(components: Sequence[StateComponent]) -> bool:
    """Whether any component asks for a check (the same on every rank: declarations agree)."""
    return any(_checked(c) for c in components)


def _checked(c: StateComponent) -> bool:
    return (c.validate_replication and c.validation_level is not ValidationLevel.NONE
            and c.sharing_pattern in _REPLICA_PATTERNS)


def check_replication(components: Sequence[StateComponent], topology: Topology, group: Any = None) -> None:
    """Collective: compare each validated component within its replica sets; raise or warn on mismatch.

    Every rank must call this with the same declarations (the coordinator checks that). Costs one
    ``all_gather_object`` of small digests for all QUICK/TENSOR components together, one more per
    QUICK component that mismatched (to name its tensors), and for FULL components one exchange per
    batch of values.
    """
    start_replication_check(components, topology, group).wait()


class ReplicationCheck:
    """A replication check running on a thread of its own, so that hashing overlaps a save's I/O.

    Call protocol: every rank starts one (``start_replication_check``) at the same point, over a
    process group no other thread uses meanwhile, and must not change the checked state until
    ``wait()`` returned. ``wait()`` joins the thread and raises the ReplicationError (every rank finds
    the same mismatches, so every rank raises); it may be called more than once.
    """

    def __init__(self, components: Sequence[StateComponent], topology: Topology, group: Any) -> None:
        checked = [c for c in components if _checked(c)]
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if not checked or not _distributed(topology):
            return  # one rank holds every copy it compares with: nothing can disagree
        # state_dict() runs here, on the caller's thread: Statefuls need not be thread-safe.
        states = {c.key: c.stateful.state_dict() for c in checked}
        self._thread = threading.Thread(target=self._run, args=(checked, states, topology, group),
                                        name="forge-replication-check", daemon=True)
        self._thread.start()

    def _run(self, checked: list[StateComponent], states: dict[str, Any], topology: Topology, group: Any) -> None:
        try:
            findings = _digest_round(checked, states, topology, group)
            findings += [_full_round(c, states[c.key], topology, group)
                         for c in checked if c.validation_level is ValidationLevel.FULL]
            _report([f for f in findings if f.problems])
        except BaseException as err:  # handed to wait(), on the caller's thread
            self._error = err

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error


def start_replication_check(components: Sequence[StateComponent], topology: Topology,
                            group: Any = None) -> ReplicationCheck:
    """Collective: start checking ``components`` in the background; ``wait()`` for the verdict."""
    return ReplicationCheck(components, topology, group)


def _digest_round(checked: Sequence[StateComponent], states: Mapping[str, Any], topology: Topology,
                  group: Any) -> list[_Finding]:
    hashed = [c for c in checked if c.validation_level in (ValidationLevel.QUICK, ValidationLevel.TENSOR)]
    if not hashed:
        return []
    digests: dict[str, dict[str, str]] = {}

    def mine() -> dict[str, Any]:
        digests.update({c.key: tensor_digests(states[c.key]) for c in hashed})
        return {c.key: combine_digests(digests[c.key]) if c.validation_level is ValidationLevel.QUICK
                else digests[c.key] for c in hashed}

    everyone = _gather_computed(mine, topology, group, f"the state of {[c.key for c in hashed]}")
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


def _describe(value: Any) -> tuple:
    """What FULL exchanges first: a tensor's dtype, shape and size; a plain value's pickle and repr.
    A tensor that is more than its storage's bytes (lazy-view flags, a quantizer, sparse indices) is
    compared by its digest instead, like a plain value."""
    if isinstance(value, torch.Tensor) and (math_bits(value) or is_opaque_tensor(value)):
        return ("value", value_digest(value).encode(), f"a {value.dtype} {value.layout} tensor")
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.nbytes)
    return ("value", pickle.dumps(value, protocol=4), _short(value))


def _full_round(component: StateComponent, state: Mapping[str, Any], topology: Topology, group: Any) -> _Finding:
    """Compare values bit for bit: descriptors first, then tensor bytes in batches (every rank runs
    the same batches, derived from the gathered descriptors, so the collectives line up)."""
    flat: dict[str, Any] = {}

    def describe() -> dict[str, tuple]:
        flat.update(flat_state(state))
        return {k: _describe(v) for k, v in flat.items()}

    described = _gather_computed(describe, topology, group, f"the state of {component.key!r}")
    problems: list[str] = []
    compare: dict[str, list[tuple[int, ...]]] = {}  # tensor key -> replica sets whose holders agree on its type
    for ranks in _replica_sets(component, topology):
        for key in sorted(set().union(*(described[r] for r in ranks))):
            holders = [r for r in ranks if key in described[r]]
            if len(holders) < len(ranks):
                problems.append(f"{key!r}: present on ranks {holders}, absent on ranks "
                                f"{sorted(set(ranks) - set(holders))}")
                continue
            kinds = split_by_value({r: described[r][key][:3] if described[r][key][0] == "tensor"
                                    else described[r][key][:2] for r in holders})
            if len(kinds) == 1 and described[holders[0]][key][0] == "tensor":
                compare.setdefault(key, []).append(tuple(holders))
            elif len(kinds) > 1:
                shown = ", ".join(f"ranks {g} hold {_shown(described[g[0]][key])}" for g in kinds[:4])
                problems.append(f"{key!r}: differs across ranks ({describe_split(kinds)} each agree): {shown}")
    for batch in _batches(compare, described):
        problems += _compare_batch(batch, compare, flat, described, topology, group)
    return _Finding(component, problems)


def _shown(description: tuple) -> str:
    return f"{description[1]}{description[2]}" if description[0] == "tensor" else description[2]


def _batches(keys: Mapping[str, Any], described: Sequence[Mapping[str, tuple]]) -> list[list[str]]:
    largest = {k: max(d[k][3] for d in described if k in d) for k in keys}
    batches: list[list[str]] = []
    filled = FULL_BATCH_BYTES
    for key in sorted(largest):
        if filled + largest[key] > FULL_BATCH_BYTES:
            batches.append([])
            filled = 0
        batches[-1].append(key)
        filled += largest[key]
    return batches


def _compare_batch(batch: list[str], compare: Mapping[str, list[tuple[int, ...]]], flat: Mapping[str, Any],
                   described: Sequence[Mapping[str, tuple]], topology: Topology, group: Any) -> list[str]:
    """One all_gather of every rank's bytes for ``batch`` (one padded slot per key), then comparisons."""
    import torch.distributed as dist

    slots, end = {}, 0
    for key in batch:  # 16-byte aligned, so each slot can be viewed as its dtype
        slots[key] = end
        end += -(-max(d[key][3] for d in described if key in d) // 16) * 16
    mine = torch.zeros(end, dtype=torch.uint8)
    for key in batch:
        if key in flat:
            data = raw_bytes(flat[key])
            if len(data):
                mine[slots[key]:slots[key] + len(data)] = torch.frombuffer(data, dtype=torch.uint8)
    everyone = [torch.empty_like(mine) for _ in range(topology.world_size)]
    dist.all_gather(everyone, mine, group=group)
    problems = []
    for key in batch:
        for holders in compare[key]:
            _, dtype, shape, nbytes = described[holders[0]][key]
            values = {r: everyone[r][slots[key]:slots[key] + nbytes] for r in holders}
            classes: list[list[int]] = []
            for r in holders:  # bitwise classes: equal bytes
                home = next((c for c in classes if torch.equal(values[c[0]], values[r])), None)
                if home is None:
                    classes.append([r])
                else:
                    home.append(r)
            if len(classes) < 2:
                continue
            classes.sort(key=lambda ranks: (-len(ranks), ranks))
            as_tensor = {r: values[r].view(dtype).reshape(shape) for r in holders}
            majority = classes[0]
            problems += [f"{key!r}: differs across ranks ({describe_split(classes)} each agree); ranks {minority} "
                         f"vs ranks {majority}: {element_disagreement(as_tensor[majority[0]], as_tensor[minority[0]])}"
                         for minority in classes[1:]]
    return problems


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


__all__ = ["FULL_BATCH_BYTES", "ReplicationCheck", "check_replication", "needs_replication_check",
           "start_replication_check", "combine_digests", "digest_disagreements",
           "element_disagreement", "quick_digest", "tensor_digests", "value_digest"]
