"""The small collectives every rank runs together (dcp_forge/collectives.py) and the staging's agreement
built on them: every rank learns of every rank's failure, each raises what its caller expects, and a
step no rank failed costs one all-reduce."""

from __future__ import annotations

import threading

import pytest
import torch.distributed as dist

from dcp_forge import collectives
from dcp_forge.async_staging import agree as staging_agree
from dcp_forge.errors import AsyncSaveError


class _Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def _outcome(step) -> tuple[str, str, list[str]] | None:
    try:
        step()
    except Exception as err:
        return type(err).__name__, str(err), list(getattr(err, "__notes__", []))
    return None


def _exchange(rank: int, world: int, failing: list[int]) -> dict:
    group = collectives.checkpoint_group()
    mine = ValueError(f"bad input on rank {rank}") if rank in failing else None
    if rank == 2 and rank in failing:
        mine = _Unpicklable()
    failed = collectives.failures(group, mine)

    def fails() -> None:
        if mine is not None:
            raise mine

    return {
        "failed": {r: (type(e).__name__, str(e)) for r, e in failed.items()},
        "own_kept": mine is None or failed[rank] is mine,
        "agree": _outcome(lambda: collectives.agree(group, mine)),
        "on_every_rank": _outcome(lambda: collectives.on_every_rank(group, fails)),
        "staging": _outcome(lambda: staging_agree(mine, group, rank, "async save not started")),
        "still_in_step": _outcome(lambda: dist.barrier(group=group)),
    }


def test_no_failure_is_agreed_by_every_rank(ranks):
    for out in ranks(_exchange, 3, []):
        assert out["failed"] == {} and out["own_kept"]
        assert out["agree"] is None and out["on_every_rank"] is None and out["staging"] is None
        assert out["still_in_step"] is None


def test_every_rank_learns_every_failure_and_raises_what_its_caller_expects(ranks):
    outs = ranks(_exchange, 3, [1, 2])
    travelled = {1: ("ValueError", "bad input on rank 1"), 2: ("RuntimeError", "rank 2: _Unpicklable('holds a lock')")}
    for rank, out in enumerate(outs):
        # an error that cannot be pickled reaches the others as a RuntimeError naming it; its own rank keeps it
        assert out["failed"] == (travelled if rank != 2 else {**travelled, 2: ("_Unpicklable", "holds a lock")})
        assert out["own_kept"], "a failing rank keeps its own error object (and its traceback)"
        # agree and on_every_rank: the lowest failing rank's error, on every rank, naming the others
        for step in ("agree", "on_every_rank"):
            kind, text, notes = out[step]
            assert (kind, text) == ("ValueError", "bad input on rank 1"), (rank, step, out[step])
            assert "(failed on ranks [1, 2]; showing rank 1's error)" in notes
        # the staging's agreement: a failing rank raises its own error, the others one naming them
        if rank == 0:
            assert out["staging"][:2] == ("AsyncSaveError", "async save not started on rank(s) [1, 2] (rank 1: "
                                          "ValueError: bad input on rank 1); rank 0 was fine")
        else:
            assert out["staging"][0] == ("ValueError" if rank == 1 else "_Unpicklable")
        assert out["still_in_step"] is None, "the ranks are still in step after every failure"


def test_one_process_agrees_with_itself():
    error = ValueError("alone")
    assert collectives.failures(None, None) == {}
    assert collectives.failures(None, error) == {0: error}
    with pytest.raises(ValueError, match="alone"):
        collectives.agree(None, error)
    with pytest.raises(ValueError, match="alone") as raised:
        staging_agree(error, None, 0, "async save not started")
    assert raised.value is error
    assert not isinstance(raised.value, AsyncSaveError)
