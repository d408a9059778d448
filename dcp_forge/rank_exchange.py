"""The few collectives a save runs itself when its ranks plan on their own (``use_collectives=False``).

With ``dcp.save(..., use_collectives=False)`` DCP runs no collective of its own until a final
barrier: no plan gather and scatter, and no sharing of failures. dcp_forge's planner and writer then
exchange what they need over one process group through ``RankExchange``, with DCP's guarantee kept:
a failure on any rank raises DCP's ``CheckpointException`` on every rank, so the ranks agree that
the step failed (the coordinator's ``_rank_errors`` and the async saver turn it into the failing
rank's own error, as they do for DCP's).

Bytes per rank stay independent of the world size: a sum is a fixed-size all-reduce; a gather sends
one payload per rank, padded to a size agreed by an all-reduce (``dist.gather_object`` would
all-gather every rank's size first); a broadcast carries one outcome. Only a failure costs more: the
failing ranks' errors are all-gathered once, to be raised everywhere.

Call protocol: every method is collective over ``group``; every rank calls the same methods in the
same order. Rank 0 of ``group`` is the coordinator. ``group=None`` is a job of one process.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

_HEADER = 8  # bytes of a gathered payload's length, before the payload

Failure = tuple[BaseException, traceback.StackSummary]  # DCP's WRAPPED_EXCEPTION


def picklable_error(error: BaseException, rank: int) -> BaseException:
    """``error``, or where it cannot be pickled (unpicklable arguments or attributes) a RuntimeError
    naming it and ``rank``: an error that cannot travel still has to stop every rank."""
    try:
        pickle.dumps(error)
    except Exception:
        return RuntimeError(f"rank {rank}: {error!r}")
    return error


def travelling(error: BaseException, rank: int) -> Failure:
    """``error`` as DCP carries a rank's failure (the error and its stack), made picklable."""
    return picklable_error(error, rank), traceback.extract_tb(error.__traceback__)


class RankExchange:
    """Collectives over ``group`` (None: one process) for a save whose ranks plan on their own."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world_size = dist.get_world_size(group) if group is not None else 1
        # A failure of this rank's part of the save that the next agreement must share (the first
        # one; e.g. the coordinator's claim of the checkpoint directory, raised outside a collective).
        self.failure: BaseException | None = None

    def note_failure(self, error: BaseException) -> None:
        if self.failure is None:
            self.failure = error

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[int]) -> list[int]:
        """Element-wise sum over the ranks of a fixed-length list of int64 values."""
        if self.group is None:
            return [int(v) for v in values]
        tensor = torch.tensor([int(v) for v in values], dtype=torch.int64)
        dist.all_reduce(tensor, group=self.group)
        return [int(v) for v in tensor.tolist()]

    @property
    def hands_objects_over(self) -> bool:
        """Whether ``gather`` gives the coordinator its own object itself: a save of one process, where
        nothing is pickled (an exchange standing in for several ranks in one process is not one)."""
        return self.group is None and self.world_size == 1

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on the coordinator (None on the others)."""
        if self.group is None:
            return [obj]
        data = pickle.dumps(obj)
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=self.group)
        buffer = torch.zeros(_HEADER + int(size.item()), dtype=torch.uint8)
        buffer[:_HEADER] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        buffer[_HEADER:_HEADER + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        received = [torch.empty_like(buffer) for _ in range(self.world_size)] if self.is_coordinator else None
        dist.gather(buffer, received, group=self.group, group_dst=0)
        if received is None:
            return None
        out = []
        for payload in received:
            length = int(payload[:_HEADER].view(torch.int64).item())
            out.append(pickle.loads(payload[_HEADER:_HEADER + length].numpy().tobytes()))
        return out

    def scatter(self, objs: Sequence[Any] | None) -> Any:
        """The coordinator's ``objs[rank]`` on each rank (``objs`` is read on the coordinator only)."""
        if self.group is None:
            return objs[0] if objs is not None else None
        out: list[Any] = [None]
        dist.scatter_object_list(out, list(objs) if self.is_coordinator and objs is not None else None,
                                 group=self.group, group_src=0)
        return out[0]

    def broadcast(self, obj: Any) -> Any:
        """The coordinator's ``obj`` on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    # --- failures -------------------------------------------------------------------------------
    def raise_everywhere(self, step: str, error: BaseException | None) -> NoReturn:
        """Raise one ``CheckpointException`` on every rank, holding every rank's ``error`` (None where a
        rank has none). Call on every rank once the ranks know that some failed (e.g. from a sum)."""
        mine = travelling(error, self.rank) if error is not None else None
        if self.group is None:
            gathered = [mine]
        else:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, mine, group=self.group)
        failures = {rank: wrapped for rank, wrapped in enumerate(gathered) if wrapped is not None}
        raise CheckpointException(step, failures)

    def share_outcome(self, step: str, failures: Mapping[int, Failure] | None, value: Any = None) -> Any:
        """The coordinator's verdict on every rank: ``value`` if ``failures`` is empty, else raise one
        ``CheckpointException`` holding ``failures`` (rank -> ``travelling`` error; read on the
        coordinator only)."""
        verdict = (("failed", dict(failures)) if failures else ("ok", value)) if self.is_coordinator else None
        status, payload = self.broadcast(verdict)
        if status == "failed":
            raise CheckpointException(step, payload)
        return payload

    def scatter_outcome(self, step: str, failures: Mapping[int, Failure] | None,
                        values: Sequence[Any] | None = None) -> Any:
        """The coordinator's ``values[rank]`` on each rank if ``failures`` is empty, else raise one
        ``CheckpointException`` holding them on every rank (both read on the coordinator only)."""
        verdicts = None
        if self.is_coordinator:
            verdicts = ([("failed", dict(failures))] * self.world_size if failures
                        else [("ok", value) for value in values or ()])
        status, payload = self.scatter(verdicts)
        if status == "failed":
            raise CheckpointException(step, payload)
        return payload
