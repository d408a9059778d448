"""Whether a save's pieces are all there: every item the global plan assigned to a rank came back
from that rank as a write result, and every piece the metadata lists has a result or location.

Pure functions over DCP's plan and metadata values, shared by the writer (which refuses to commit a
save they find incomplete) and ``verify`` (which reports a stored checkpoint's gaps). Whether the
chunks of a tensor tile it is ``tensors.tiling_problem``.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Collection, Sequence

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.storage import WriteResult

from .placement import index_key, indexed_key


def unstored_pieces(metadata: Metadata, stored: Collection[MetadataIndex]) -> dict[str, list[MetadataIndex]]:
    """The pieces (a tensor's chunks, a bytes value) ``metadata`` lists that ``stored`` lacks, by key."""
    stored_keys = set(map(index_key, stored))
    missing = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            # Keys as index_key gives them (a MetadataIndex holds its offsets as a torch.Size, which
            # compares and hashes as its tuple): a MetadataIndex is only made for a missing piece.
            chunks = md.chunks
            if len(chunks) == 1:  # a whole tensor, or one piece of it: no list built per tensor
                offsets = chunks[0].offsets
                if (fqn, _as_offsets(offsets)) not in stored_keys:
                    missing[fqn] = [MetadataIndex(fqn, offsets)]
                continue
            lacking = [offsets for offsets in map(_OFFSETS, chunks) if (fqn, _as_offsets(offsets)) not in stored_keys]
            if lacking:
                missing[fqn] = [MetadataIndex(fqn, offsets) for offsets in lacking]
        elif isinstance(md, BytesStorageMetadata) and (fqn, None) not in stored_keys:
            missing[fqn] = [MetadataIndex(fqn)]
    return dict(sorted(missing.items()))


_OFFSETS = operator.attrgetter("offsets")


def _as_offsets(offsets: Sequence[int] | None) -> Sequence[int] | None:
    """``offsets`` as ``MetadataIndex`` would hold them (a torch.Size, or None)."""
    return offsets if offsets is None or isinstance(offsets, tuple) else torch.Size(offsets)


def _describe(indexes: Sequence[MetadataIndex], limit: int = 3) -> str:
    shown = [index.fqn if index.offset is None else f"{index.fqn}@{tuple(index.offset)}" for index in indexes[:limit]]
    return ", ".join(shown) + (f" and {len(indexes) - limit} more" if len(indexes) > limit else "")


def write_result_problems(plans: Sequence[SavePlan], results: Sequence[Sequence[WriteResult] | None]) -> list[str]:
    """How the write results differ from the global plan: a rank with no results, an item planned
    on a rank that did not report writing it, or one reported that was not planned there."""
    problems = []
    if len(results) != len(plans):
        problems.append(f"results came from {len(results)} rank(s), the plan has {len(plans)}")
    for rank, plan in enumerate(plans):
        got = results[rank] if rank < len(results) else None
        if got is None:
            problems.append(f"rank {rank} returned no write results ({len(plan.items)} item(s) planned there)")
            continue
        planned = Counter(map(indexed_key, plan.items))
        written = Counter(map(indexed_key, got))
        if dict.__eq__(planned, written):  # counts of what was counted: all positive, so equal as dicts
            continue
        missing = sorted((MetadataIndex(*key) for key in planned - written), key=str)
        unplanned = sorted((MetadataIndex(*key) for key in written - planned), key=str)
        if missing:
            problems.append(f"rank {rank} wrote {len(got)} of its {len(plan.items)} planned item(s); "
                            f"missing: {_describe(missing)}")
        if unplanned:
            problems.append(f"rank {rank} reported {len(unplanned)} item(s) not planned there: {_describe(unplanned)}")
    return problems
