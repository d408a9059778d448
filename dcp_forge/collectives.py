"""Small collectives over a process group that every rank agrees on: gather, run on one rank, agree.

``group`` None means one process (no torch.distributed): each helper then runs locally. Every helper
is collective: every rank of ``group`` calls it at the same point, with the same ``src``.
The errors they share travel pickled; one that cannot be pickled still stops every rank, as a
``RuntimeError`` naming the rank and the original error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ._torch_compat import default_group_timeout
from .errors import collective_timeout_context
from .rank_exchange import picklable_error


def checkpoint_group() -> Any:
    """A new gloo group of every rank, for dcp_forge's own collectives (collective: every rank calls it).

    It waits as long as the job's default group (``init_process_group(timeout=)``): made with
    ``new_group`` alone it would wait gloo's 30 minutes, so a rank whose peer is stuck (alive, never
    reaching the save's collective) would wait that long whatever the job asked for."""
    return dist.new_group(backend="gloo", timeout=default_group_timeout())


def waiting_in(group: Any, step: str) -> contextlib.AbstractContextManager[None]:
    """Around ``step``, which runs collectives over ``group`` (dcp_forge's; None: one process, none):
    if one times out, a CollectiveTimeoutError naming this rank, the step and how long it waited."""
    if group is None:
        return contextlib.nullcontext()

    def context() -> str:
        timeout = default_group_timeout()
        waited = f"{timeout} (the job's collective timeout)" if timeout is not None else "its collective timeout"
        return f"rank {dist.get_rank(group)} of {dist.get_world_size(group)} waited {waited} in {step}"
    return collective_timeout_context(context)


def group_rank(group: Any) -> int:
    return 0 if group is None else dist.get_rank(group)


def group_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_gather(group: Any, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in group-rank order."""
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def raise_first(errors: list[BaseException | None], me: int) -> None:
    """Raise the lowest failing rank's error (noting which ranks failed), if any rank failed."""
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    rank, first = failed[0]
    if len(failed) > 1 or rank != me:
        first.add_note(f"(failed on ranks {[r for r, _ in failed]}; showing rank {rank}'s error)")
    raise first


def failures(group: Any, error: BaseException | None) -> dict[int, BaseException]:
    """Every failing rank's error by group rank, on every rank ({}: none failed); ``error`` is this
    rank's (None: it succeeded), given back as itself. One all-reduce when no rank failed; the
    errors travel (pickled) only when one did."""
    me = group_rank(group)
    if group is None:
        return {} if error is None else {me: error}
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
    dist.all_reduce(flag, group=group)
    if int(flag.item()) == 0:
        return {}
    gathered = all_gather(group, None if error is None else picklable_error(error, me))
    failed = {rank: err for rank, err in enumerate(gathered) if err is not None}
    if error is not None:
        failed[me] = error  # its own traceback, not the travelled copy
    return failed


def agree(group: Any, error: BaseException | None) -> None:
    """Share this rank's failure (None: it succeeded); raise the lowest failing rank's on every rank."""
    failed = failures(group, error)
    if failed:
        raise_first([failed.get(rank) for rank in range(group_size(group))], group_rank(group))


def gather_results(group: Any, fn: Callable[[], Any]) -> list[Any]:
    """Run ``fn`` on every rank and give every rank all results, in group-rank order; if it raised
    anywhere, raise the lowest failing rank's error on every rank instead (one collective)."""
    me = group_rank(group)
    try:
        value, error = fn(), None
    except Exception as err:  # shared below, then raised on every rank
        value, error = None, picklable_error(err, me)
    gathered = all_gather(group, (value, error))
    raise_first([e for _, e in gathered], me)
    return [v for v, _ in gathered]


def on_every_rank(group: Any, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank; if it raised anywhere, raise the lowest failing rank's error everywhere.

    For steps taken before a collective: a rank raising alone would leave the others waiting in the
    collective for it.
    """
    try:
        value, error = fn(), None
    except Exception as err:  # shared below, then raised on every rank
        value, error = None, err
    agree(group, error)
    return value


def run_on(group: Any, src: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on group rank ``src`` and give its result (or its exception) to every rank."""
    box: list[Any] = [None]
    if group_rank(group) == src:
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # re-raised on every rank below
            box[0] = ("err", picklable_error(err, src))
    if group is not None:
        dist.broadcast_object_list(box, group_src=src, group=group)
    status, value = box[0]
    if status == "err":
        raise value
    return value


def release_group(group: Any) -> None:
    """Destroy a subgroup this process created, if torch.distributed still knows it (local, not collective)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.destroy_process_group(group)
    except ValueError:  # already destroyed, e.g. by destroy_process_group() of the whole world
        pass


def isend(tensor: torch.Tensor, group: Any, group_dst: int, tag: int) -> dist.Work:
    """``dist.isend`` to a rank of ``group``, which this rank is in (torch posts no request only for a
    rank outside it)."""
    work = dist.isend(tensor, group=group, group_dst=group_dst, tag=tag)
    assert work is not None, "a rank sends only within its own group"
    return work


def irecv(tensor: torch.Tensor, group: Any, group_src: int, tag: int) -> dist.Work:
    """``dist.irecv`` from a rank of ``group``, which this rank is in."""
    work = dist.irecv(tensor, group=group, group_src=group_src, tag=tag)
    assert work is not None, "a rank receives only within its own group"
    return work
