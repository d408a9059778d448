"""Whether a save's pieces are all there: every item the global plan assigned to a rank came back
from that rank as a write result, and every piece the metadata lists has a result or location.

Pure functions over DCP's plan and metadata values, shared by the writer (which refuses to commit a
save they find incomplete) and ``verify`` (which reports a stored checkpoint's gaps). Whether the
chunks of a tensor tile it is ``tensors.tiling_problem``.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Container, Sequence
from typing import Any, NamedTuple

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.storage import WriteResult

from .placement import indexed_key
from .tensors import one_whole_chunk


class MetadataGaps(NamedTuple):
    """What one walk over a save's metadata finds (``metadata_gaps``)."""

    unstored: dict[str, list[MetadataIndex]]  # the pieces (a tensor's chunks, a bytes value) lacking, by key
    # The tensors whose chunks are not their one whole chunk (as ``tensors.one_whole_chunk`` decides),
    # in metadata order: the only ones whose tiling ``tensors.tiling_problem`` has to check.
    not_whole: list[str]


def metadata_gaps(metadata: Metadata, stored_keys: Container[tuple[str, Any]]) -> MetadataGaps:
    """The pieces ``metadata`` lists whose ``index_key`` ``stored_keys`` lacks, and the tensors not
    stored as one whole chunk, from one walk over the metadata: a commit asks both of every item."""
    missing = {}
    not_whole = []
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            # Keys as index_key gives them (a MetadataIndex holds its offsets as a torch.Size, which
            # compares and hashes as its tuple): a MetadataIndex is only made for a missing piece.
            chunks = md.chunks
            if len(chunks) == 1:  # a whole tensor, or one piece of it: no list built per tensor
                chunk = chunks[0]
                offsets = chunk.offsets
                if (fqn, offsets if type(offsets) is torch.Size else _as_offsets(offsets)) not in stored_keys:
                    missing[fqn] = [MetadataIndex(fqn, offsets)]
                if not one_whole_chunk(md.size, offsets, chunk.sizes):
                    not_whole.append(fqn)
                continue
            not_whole.append(fqn)
            lacking = [offsets for offsets in map(_OFFSETS, chunks) if (fqn, _as_offsets(offsets)) not in stored_keys]
            if lacking:
                missing[fqn] = [MetadataIndex(fqn, offsets) for offsets in lacking]
        elif isinstance(md, BytesStorageMetadata) and (fqn, None) not in stored_keys:
            missing[fqn] = [MetadataIndex(fqn)]
    return MetadataGaps(dict(sorted(missing.items())), not_whole)


_OFFSETS = operator.attrgetter("offsets")


def _as_offsets(offsets: Sequence[int] | None) -> Sequence[int] | None:
    """``offsets`` as ``MetadataIndex`` would hold them (a torch.Size, or None)."""
    return offsets if offsets is None or isinstance(offsets, tuple) else torch.Size(offsets)


def _describe(indexes: Sequence[MetadataIndex], limit: int = 3) -> str:
    shown = [index.fqn if index.offset is None else f"{index.fqn}@{tuple(index.offset)}" for index in indexes[:limit]]
    return ", ".join(shown) + (f" and {len(indexes) - limit} more" if len(indexes) > limit else "")


class WriteResultGaps(NamedTuple):
    """What one walk over a save's write results finds (``write_result_gaps``)."""

    # How the write results differ from the global plan: a rank with no results, an item planned
    # on a rank that did not report writing it, or one reported that was not planned there.
    problems: list[str]
    written: Container[tuple[str, Any]]  # the index_key of every result of every rank that returned results


def write_result_gaps(plans: Sequence[SavePlan], results: Sequence[Sequence[WriteResult] | None]) -> WriteResultGaps:
    """How the write results differ from the plans, and the keys of what was written, keying each
    result once."""
    problems = []
    if len(results) != len(plans):
        problems.append(f"results came from {len(results)} rank(s), the plan has {len(plans)}")
    written_keys: list[set[tuple[str, Any]]] = []
    for rank, plan in enumerate(plans):
        got = results[rank] if rank < len(results) else None
        if got is None:
            problems.append(f"rank {rank} returned no write results ({len(plan.items)} item(s) planned there)")
            continue
        written = set(map(indexed_key, got))
        written_keys.append(written)
        # Distinct keys on both sides (every sound save's) compare as sets; where a key repeats, the
        # counts tell an item reported twice from one reported once.
        planned = set(map(indexed_key, plan.items))
        if not (len(written) == len(got) and len(planned) == len(plan.items) and planned == written):
            problems += _rank_problems(rank, plan, got)
    written_keys += [set(map(indexed_key, got)) for got in results[len(plans):] if got is not None]
    return WriteResultGaps(problems, written_keys[0] if len(written_keys) == 1 else set().union(*written_keys))


def _rank_problems(rank: int, plan: SavePlan, got: Sequence[WriteResult]) -> list[str]:
    """How rank ``rank``'s results ``got`` differ from its plan, counting repeated keys."""
    planned = Counter(map(indexed_key, plan.items))
    written = Counter(map(indexed_key, got))
    missing = sorted((MetadataIndex(*key) for key in planned - written), key=str)
    unplanned = sorted((MetadataIndex(*key) for key in written - planned), key=str)
    problems = []
    if missing:
        problems.append(f"rank {rank} wrote {len(got)} of its {len(plan.items)} planned item(s); "
                        f"missing: {_describe(missing)}")
    if unplanned:
        problems.append(f"rank {rank} reported {len(unplanned)} item(s) not planned there: {_describe(unplanned)}")
    return problems
