"""The commit of a save whose ranks planned on their own (``dcp.save(..., use_collectives=False)``).

DCP then calls ``StorageWriter.finish`` on every rank with that rank's own write results only. The
coordinator still needs everyone's: where each item was written and its checksum, and, since no
rank sent it a plan, what each rank wrote. So every rank's finish runs ``commit_over_exchange``:

1. every rank sends the coordinator its write results, its failure if writing failed, and its
   planner's report (``PlansForCommit.commit_report``: what it was to write);
2. the coordinator commits only if no rank failed and the planner proves from the reports that
   every item of the state was written exactly once (``global_plan_and_metadata``), then through
   the writer's usual checks (every planned item has its result, every tensor is tiled by its chunks,
   the commit gate) and records, with the commit marker last;
3. the coordinator's verdict reaches every rank: a failure anywhere raises DCP's
   ``CheckpointException`` on every rank (so the caller cleans up the same way as for DCP's own
   failures); on success every rank's planner keeps its plan for the next save.

A rank's results reach the coordinator only once ``write_data`` returned, i.e. once its data files and
their directory are durable: as with DCP's own gather, nothing is committed before every rank's data is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.storage import WriteResult

from ..rank_exchange import RankExchange, travelling


@runtime_checkable
class PlansForCommit(Protocol):
    """A save planner whose ranks planned on their own, as the writer's finish calls it."""

    def commit_report(self) -> Any:
        """This rank's report for the coordinator (picklable; None when the coordinator knows it)."""

    def global_plan_and_metadata(self, reports: list[Any], where: str) -> tuple[list[SavePlan], Metadata]:
        """Every rank's final plan and the metadata to commit (coordinator); raises if the reports
        do not prove the whole state was written."""

    def committed(self, generation: str) -> None:
        """The save committed (every rank); ``generation`` names it, the same on every rank."""


def commit_over_exchange(exchange: RankExchange, planner: PlansForCommit | None, results: Sequence[WriteResult],
                         error: BaseException | None,
                         commit: Callable[[list[SavePlan], Metadata, list[list[WriteResult]]], str],
                         where: str) -> None:
    """Run on every rank by the writer's finish: the protocol above. ``commit(global plan, metadata,
    every rank's results)`` is the writer's own commit on the coordinator; it returns the save's id.
    Raises ``CheckpointException`` on every rank if the save failed on any."""
    report = None
    if error is None:
        try:
            report = planner.commit_report() if planner is not None else None
        except Exception as err:  # shared with every rank below
            error = err
    gathered = exchange.gather((travelling(error, exchange.rank) if error is not None else None, list(results),
                                report))
    failures, generation = None, None
    if gathered is not None:
        failures = {rank: failure for rank, (failure, _, _) in enumerate(gathered) if failure is not None}
        if not failures:
            try:
                # A rank without such a planner failed in write_data, and that failure was gathered.
                assert planner is not None, "the coordinator has no planner that plans on every rank"
                plans, metadata = planner.global_plan_and_metadata([rep for _, _, rep in gathered], where)
                generation = commit(plans, metadata, [res for _, res, _ in gathered])
            except Exception as err:  # not committed: every rank raises it
                failures = {exchange.rank: travelling(err, exchange.rank)}
    generation = exchange.share_outcome("committing the save", failures, generation)
    if planner is not None:
        planner.committed(generation)
