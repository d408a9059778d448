"""Replication checks: is state declared as shared really identical on the ranks that share it?

Run within each component's replica set (REPLICATED: all ranks; PER_GROUP: the group; PER_NODE:
the node) at the component's ``ValidationLevel``:

- QUICK: one xxh3 hash over the whole state;
- TENSOR: one hash per tensor / value, so a mismatch names the tensors;
- FULL: the values themselves are exchanged and compared element-wise (reports max abs diff).

Digests are pure functions of a state dict (testable in one process); ``check_replication`` is the
collective that exchanges them.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint._nested_dict import flatten_state_dict

from .errors import ReplicationError
from .sharing import SharingPattern, StateComponent, ValidationLevel
from .topology import Topology

logger = logging.getLogger(__name__)

_REPLICA_PATTERNS = (SharingPattern.REPLICATED, SharingPattern.PER_GROUP, SharingPattern.PER_NODE)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    if hasattr(t, "to_local"):
        t = t.to_local()
    t = t.detach().cpu().contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def _value_digest(value: Any) -> str:
    h = xxhash.xxh3_64()
    if isinstance(value, torch.Tensor):
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        h.update(_tensor_bytes(value))
    else:
        h.update(pickle.dumps(value, protocol=4))
    return h.hexdigest()


def flat_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    flat, _ = flatten_state_dict(dict(state_dict))
    return flat


def tensor_digests(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """TENSOR level: one digest per flattened key."""
    return {k: _value_digest(v) for k, v in sorted(flat_state(state_dict).items())}


def quick_digest(state_dict: Mapping[str, Any]) -> str:
    """QUICK level: one digest for the whole state."""
    h = xxhash.xxh3_64()
    for key, digest in tensor_digests(state_dict).items():
        h.update(key.encode())
        h.update(digest.encode())
    return h.hexdigest()


def local_evidence(state_dict: Mapping[str, Any], level: ValidationLevel) -> Any:
    """What this rank contributes to the comparison at ``level``."""
    if level is ValidationLevel.QUICK:
        return quick_digest(state_dict)
    if level is ValidationLevel.TENSOR:
        return tensor_digests(state_dict)
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
            for k, v in flat_state(state_dict).items()}


def disagreements(evidence: Sequence[Any], ranks: Sequence[int], level: ValidationLevel) -> list[str]:
    """Human-readable differences between the first rank of ``ranks`` and each other one."""
    ref_rank = ranks[0]
    ref = evidence[ref_rank]
    problems: list[str] = []
    for rank in ranks[1:]:
        other = evidence[rank]
        if level is ValidationLevel.QUICK:
            if other != ref:
                problems.append(f"rank {rank} differs from rank {ref_rank} (whole-state hash)")
            continue
        for key in sorted(set(ref) | set(other)):
            if key not in ref or key not in other:
                problems.append(f"{key!r}: present on rank {ref_rank if key in ref else rank} only "
                                f"(ranks {ref_rank}, {rank})")
                continue
            a, b = ref[key], other[key]
            if level is ValidationLevel.FULL and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                if a.shape != b.shape or a.dtype != b.dtype:
                    problems.append(f"{key!r}: rank {ref_rank} has {a.dtype}{tuple(a.shape)}, "
                                    f"rank {rank} has {b.dtype}{tuple(b.shape)}")
                elif not torch.equal(a, b):
                    diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "n/a"
                    problems.append(f"{key!r}: ranks {ref_rank} and {rank} differ (max abs diff {diff})")
            elif (a != b) if not isinstance(a, torch.Tensor) else not torch.equal(a, b):
                problems.append(f"{key!r}: ranks {ref_rank} and {rank} differ")
    return problems


def check_replication(components: Sequence[StateComponent], topology: Topology, group: Any = None) -> None:
    """Collective: compare each validated component within its replica sets; raise or warn on mismatch.

    Every rank must call this with the same declarations (the coordinator checks that).
    """
    import torch.distributed as dist

    for component in components:
        level = component.validation_level
        if (not component.validate_replication or level is ValidationLevel.NONE
                or component.sharing_pattern not in _REPLICA_PATTERNS):
            continue
        mine = local_evidence(component.stateful.state_dict(), level)
        if dist.is_available() and dist.is_initialized():
            evidence: list[Any] = [None] * topology.world_size
            dist.all_gather_object(evidence, mine, group=group)
        else:
            evidence = [mine]
        problems: list[str] = []
        seen: set[tuple[int, ...]] = set()
        for rank in range(topology.world_size):
            ranks = topology.replica_set(component.sharing_pattern, component.process_group_name, rank)
            if ranks in seen:
                continue
            seen.add(ranks)
            problems += disagreements(evidence, ranks, level)
        if problems:
            message = (f"replication check ({level.value}) failed for {component.sharing_pattern.name} "
                       f"component {component.key!r}: " + "; ".join(problems[:20])
                       + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else ""))
            if component.metadata.get("on_replication_mismatch") == "warn":
                logger.warning(message)
            else:
                raise ReplicationError(message)
