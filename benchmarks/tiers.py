#!/usr/bin/env python
"""Storage tiers: what a save costs and how fast a job recovers, local tier vs peer copies vs remote.

Starts its own SeaweedFS (``tests/support/s3_server.py``) behind the fault proxy
(``tests/support/fault_proxy.py``, which counts every request and byte), and runs ``--world`` gloo ranks
as nodes of ``--ranks-per-node`` ranks, each node with its own local tier under ``--local-root``
(default: ``/dev/shm``, a memory tier). The state: a REPLICATED model of ``--mib`` MiB in float32
tensors and a small PER_RANK component. For ``--repeats`` rounds, timed on every rank between
barriers (the slowest rank is reported, medians over the rounds):

- ``save, remote only``: ``save_checkpoint`` straight to S3 (no local tier);
- ``save, local tier (peer_copies=k)``: until ``save_checkpoint`` returns (committed in the local
  tier, peer copies made), and until the drain committed the S3 copy (``wait()``), for k = 0 and 1;
- ``load, local tier``: every node has its copy;
- ``load, peer copies``: node 1 lost its local tier (its leader deletes it), the others have theirs;
- ``load, remote``: every node lost its local tier.

For each load the proxy reports the bytes it passed down from S3 and the object reads (GET of
anything but a commit marker). Every load is checked bit for bit against the saved state.

    .venv/bin/python -m benchmarks.tiers [--mib 128] [--world 4] [--ranks-per-node 2] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid

from benchmarks.results import write_json

BUCKET = "bench"


def _state(mib: int, rank: int, step: int) -> tuple[dict, dict]:
    import torch

    gen = torch.Generator().manual_seed(step)
    per = mib * 1024 * 1024 // 4 // 8
    model = {f"layer{i}": torch.randn(per, generator=gen) for i in range(8)}
    own = torch.Generator().manual_seed(1000 * step + rank)
    return model, {"noise": torch.randn(4096, generator=own), "step": step}


def _proxy(endpoint: str, what: str) -> dict:
    method = "POST" if what == "reset-stats" else "GET"
    with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/__fault_proxy__/{what}", method=method,
                                                       data=b"" if method == "POST" else None)) as reply:
        return json.loads(reply.read() or b"{}")


def _rank(rank: int, world: int, args: dict, options: dict, proxy: str) -> dict:
    import torch
    import torch.distributed as dist

    from dcp_forge import CheckpointCoordinator, LocalTier, StateComponent
    from tests.support.statefuls import Box

    node = rank // args["ranks_per_node"]
    leader = rank % args["ranks_per_node"] == 0
    model, own = Box({}), Box({})
    components = [StateComponent("model", model, "replicated"), StateComponent("own", own, "per_rank")]
    out: dict[str, list[float]] = {}

    def timed(name: str, fn) -> object:
        dist.barrier()
        started = time.perf_counter()
        value = fn()
        dist.barrier()
        out.setdefault(name, []).append(time.perf_counter() - started)
        return value

    def load_check(coord, name: str, step: int) -> None:
        model.state = {k: torch.zeros_like(v) for k, v in _state(args["mib"], rank, step)[0].items()}
        own.state = {"noise": torch.zeros(4096), "step": -1}
        if rank == 0:
            _proxy(proxy, "reset-stats")
        result = timed(f"load, {name}", coord.load_checkpoint)
        expected = _state(args["mib"], rank, step)
        exact = all(torch.equal(model.state[k], v) for k, v in expected[0].items()) and \
            torch.equal(own.state["noise"], expected[1]["noise"])
        if not exact:
            raise AssertionError(f"rank {rank}: the {name} load is not bit-exact")
        out.setdefault(f"tier, {name}", []).append(result.tier)
        if rank == 0:
            stats = _proxy(proxy, "stats")
            out.setdefault(f"remote bytes down, {name}", []).append(stats["bytes_down"])
            out.setdefault(f"remote requests, {name}", []).append(stats["requests"])

    for rep in range(args["repeats"]):
        step = rep + 1
        model.state, own.state = _state(args["mib"], rank, step)
        run = f"{args['remote']}/rep{rep}"
        with CheckpointCoordinator(components, output_dir=f"{run}/plain", storage_options=options) as coord:
            timed("save, remote only", lambda coord=coord, step=step: coord.save_checkpoint(checkpoint_id=f"c-{step}"))
        for copies in (0, 1):
            local = os.path.join(args["local_root"], f"rep{rep}-k{copies}", f"node{node}")
            with CheckpointCoordinator(components, output_dir=f"{run}/k{copies}", storage_options=options,
                                       local_tier=LocalTier(local, peer_copies=copies)) as coord:
                timed(f"save, local tier (peer_copies={copies})",
                      lambda coord=coord, step=step: coord.save_checkpoint(checkpoint_id=f"c-{step}"))
                timed(f"drained (peer_copies={copies})", coord.wait)
                out.setdefault(f"peer copy seconds (peer_copies={copies})", []).append(
                    coord.tiers.last_commit.peer_copy.seconds)
                out.setdefault(f"peer copy bytes sent (peer_copies={copies})", []).append(
                    coord.tiers.last_commit.peer_copy.bytes_sent)
                if copies == 1:
                    load_check(coord, "local tier", step)
                    if leader and node == 1:
                        shutil.rmtree(local)
                    load_check(coord, "peer copies", step)
                    if leader:
                        shutil.rmtree(local, ignore_errors=True)
                    load_check(coord, "remote", step)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--local-root", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from tests.support import s3_server
    from tests.support.dist import run_ranks
    from tests.support.fault_proxy import FaultProxy

    local_root = tempfile.mkdtemp(prefix="forge-tiers-", dir=args.local_root)
    try:
        with s3_server.running_server("seaweedfs", buckets=[BUCKET], stop_timeout=5) as info, \
                FaultProxy(info.endpoint_url) as proxy:
            options = {"key": info.access_key, "secret": info.secret_key, "endpoint_url": proxy.endpoint_url,
                       "config_kwargs": {"region_name": info.region}}
            settings = {"mib": args.mib, "ranks_per_node": args.ranks_per_node, "repeats": args.repeats,
                        "local_root": local_root, "remote": f"s3://{BUCKET}/tiers-{uuid.uuid4().hex[:8]}"}
            per_rank = run_ranks(_rank, args.world, settings, options, proxy.endpoint_url,
                                 ranks_per_node=args.ranks_per_node, timeout=3600)
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
    report: dict[str, object] = {"mib": args.mib, "world": args.world, "ranks_per_node": args.ranks_per_node,
                                 "repeats": args.repeats, "local_root": args.local_root}
    for name in per_rank[0]:
        values = per_rank[0][name]
        if name.startswith("peer copy bytes"):  # what all ranks sent, per round
            report[name] = [sum(r[name][i] for r in per_rank) for i in range(len(values))]
        elif isinstance(values[0], str) or name.startswith("remote"):
            report[name] = values
        else:  # seconds: the slowest rank of each round, then the median round
            report[name] = round(statistics.median(max(r[name][i] for r in per_rank) for i in range(len(values))), 3)
    for name, value in report.items():
        print(f"{name:45s} {value}")
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
