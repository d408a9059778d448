"""Every multi-rank trainer on 4 gloo ranks: its components and process groups against the seeds'
tables, what its checkpoints hold, and bit-exact resume in fresh processes.

Two spawns serve every trainer (spawning is the expensive part): the first runs each trainer
uninterrupted to K steps and, separately, interrupted after step k; the second, in new processes,
resumes each interrupted run from its last checkpoint to K. Losses and final parameters must be
identical (``==`` / ``torch.equal``). Every run carries a stateful DivergenceDetector, whose state
must come back too. python -m tools.resume_check runs the same comparison for 50+ steps after resume.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist

from dcp_forge import read_manifest, verify_checkpoint
from dcp_forge.trainers.callbacks import DivergenceDetector
from dcp_forge.trainers.run import TinyJob, build_trainer, local_tensors, run_job

WORLD = 4
K, INTERRUPT, SAVE_STEPS = 8, 6, 4  # resumes from checkpoint-4: 4 steps after resume
RESUME_STEP = 4
KINDS = ("ddp", "ddp-independent", "fsdp", "accelerate", "pipeline", "dp-pp", "dp-tp")
ASYNC_KINDS = ("ddp-independent", "dp-pp", "fsdp")  # these save in the background (TrainingArguments.async_save)
# ... and these with overlapped staging: parameters and optimizer state (FSDP2's DTensor shards too) are
# copied while the next steps' forward and backward run, the optimizer step waits for what is left
OVERLAPPED_KINDS = {"ddp-independent": {"async_staging": "overlapped", "async_lazy_min_bytes": 1024},
                    "fsdp": {"async_staging": "overlapped", "async_lazy_min_bytes": 1024}}

R, G, PR, PG = "replicated", "global", "per_rank", "per_group"
# (pattern, process group, replication checked at save) per component, as each trainer declares
# them (README's trainer table), the hybrids following docs/FORMAT.md's PER_GROUP definition
# with docs/FORMAT.md's PER_GROUP groups, FSDP2 as DESIGN.md's rule for DTensor state.
EXPECTED = {
    "ddp": {"model": (R, None, True), "optimizer": (R, None, True), "scheduler": (R, None, False),
            "dataset": (G, None, False), "trainer": (R, None, True), "rng": (PR, None, False)},
    "ddp-independent": {"model": (R, None, True), "optimizer": (R, None, True), "scheduler": (R, None, False),
                        "dataset": (PR, None, False), "trainer": (R, None, True), "rng": (PR, None, False)},
    "accelerate": {"model": (R, None, True), "optimizer": (R, None, False), "scheduler": (R, None, False),
                   "dataset": (PR, None, False), "trainer": (R, None, True), "rng": (PR, None, False)},
    "pipeline": {"model": (PR, None, False), "optimizer": (PR, None, False), "scheduler": (R, None, False),
                 "dataset": (G, None, False), "trainer": (R, None, True), "rng": (PR, None, False)},
    "dp-pp": {"model": (PG, "pp_group", True), "optimizer": (PG, "pp_group", True), "scheduler": (R, None, False),
              "dataset": (PG, "dp_group", False), "trainer": (R, None, True), "rng": (PR, None, False)},
    "dp-tp": {"model": (PG, "tp_group", True), "optimizer": (PG, "tp_group", True), "scheduler": (R, None, False),
              "dataset": (PG, "dp_group", False), "trainer": (R, None, True), "rng": (PR, None, False)},
    "fsdp": {"model": (G, None, False), "optimizer": (G, None, False), "scheduler": (R, None, False),
             "dataset": (PR, None, False), "trainer": (R, None, True), "rng": (PR, None, False)},
}
ALL = [[0, 1, 2, 3]]
SAME_SHARD, SAME_REPLICA = [[0, 2], [1, 3]], [[0, 1], [2, 3]]  # a (dp=2, x=2) mesh: rank = 2 * dp + x
EXPECTED_GROUPS = {
    "ddp": {"ddp_group": ALL}, "ddp-independent": {"ddp_group": ALL}, "accelerate": {},
    "pipeline": {"pp_group": ALL}, "fsdp": {"dp_group": ALL},
    "dp-pp": {"pp_group": SAME_SHARD, "dp_group": SAME_REPLICA},
    "dp-tp": {"tp_group": SAME_SHARD, "dp_group": SAME_REPLICA},
}


def _job(kind: str, root: str, run: str, **kwargs) -> TinyJob:
    return TinyJob(trainer=kind, output_dir=os.path.join(root, kind, run), max_steps=K, save_steps=SAVE_STEPS,
                   n_layers=4 if kind == "pipeline" else 2, num_samples=96, async_save=kind in ASYNC_KINDS,
                   **OVERLAPPED_KINDS.get(kind, {}), **kwargs)


def _detector() -> DivergenceDetector:
    return DivergenceDetector(warmup_steps=2, spike_factor=50.0)  # stateful; never trips on these runs


def _first_runs(rank: int, world: int, root: str) -> dict:
    warnings.simplefilter("ignore")
    out = {}
    for kind in KINDS:
        detector = _detector()
        with build_trainer(_job(kind, root, "full"), [detector]) as trainer:
            full = trainer.train()
            table = {c.key: (c.sharing_pattern.value, c.process_group_name, c.validate_replication)
                     for c in trainer.get_state_components()}
            groups = {name: sorted(dist.get_process_group_ranks(pg)) for name, pg in trainer.get_process_groups().items()}
        interrupted = run_job(_job(kind, root, "resumed", interrupt_at=INTERRUPT), [_detector()]).output
        out[kind] = {"losses": full.step_losses, "params": local_tensors(trainer.model),
                     "detector": detector.state_dict(), "table": table, "groups": groups,
                     "interrupted": interrupted.step_losses, "interrupted_reason": interrupted.stop_reason,
                     "interrupted_last": interrupted.last_checkpoint}
    return out


def _resumed_runs(rank: int, world: int, root: str) -> dict:
    warnings.simplefilter("ignore")
    out = {}
    for kind in KINDS:
        detector = _detector()
        result = run_job(_job(kind, root, "resumed", resume=True), [detector])
        resumed = result.output
        out[kind] = {"losses": resumed.step_losses, "params": result.params,
                     "detector": detector.state_dict(), "resumed_from": resumed.resumed_from,
                     "last": resumed.last_checkpoint}
    return out


@pytest.fixture(scope="module")
def runs(ranks, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("trainers"))
    first = ranks(_first_runs, WORLD, root, timeout=400)
    resumed = ranks(_resumed_runs, WORLD, root, timeout=400)
    return first, resumed


@pytest.mark.parametrize("kind", KINDS)
def test_components_and_groups_match_the_seed_tables(runs, kind):
    first, _ = runs
    for rank in range(WORLD):
        table = first[rank][kind]["table"]
        assert table.pop("callbacks") == (table["trainer"][0], None, True)  # stateful callbacks ride along
        assert table == EXPECTED[kind], f"rank {rank}"
        groups = first[rank][kind]["groups"]
        assert set(groups) == set(EXPECTED_GROUPS[kind])
        for name, members in groups.items():
            assert members in EXPECTED_GROUPS[kind][name] and rank in members, (rank, name, members)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_in_fresh_processes_is_bit_exact(runs, kind):
    first, resumed = runs
    for rank in range(WORLD):
        full, part, again = first[rank][kind], first[rank][kind], resumed[rank][kind]
        assert part["interrupted_reason"] == f"interrupted after step {INTERRUPT}"
        assert part["interrupted"] == full["losses"][:INTERRUPT]
        assert os.path.basename(part["interrupted_last"]) == f"checkpoint-{RESUME_STEP}"
        assert again["resumed_from"] == part["interrupted_last"]
        assert again["losses"] == full["losses"][RESUME_STEP:], f"rank {rank}: losses after resume differ"
        assert again["params"].keys() == full["params"].keys()
        for name, value in full["params"].items():
            assert torch.equal(again["params"][name], value), f"rank {rank}: {name} differs"
        assert again["detector"] == full["detector"], "the stateful callback resumed its state"
    # the losses are global means: every rank reports the same curve
    assert all(first[r][kind]["losses"] == first[0][kind]["losses"] for r in range(WORLD))


def _holders(manifest, key: str) -> list[list[int]]:
    return sorted(sorted(copy.holders) for copy in manifest.components[key].copies.values())


def test_checkpoints_store_each_component_once_per_copy(runs):
    _, resumed = runs
    manifests = {kind: read_manifest(resumed[0][kind]["last"]) for kind in KINDS}
    for kind, manifest in manifests.items():
        assert manifest.world_size == WORLD and manifest.extra["step"] == K
        assert _holders(manifest, "rng") == [[r] for r in range(WORLD)], kind
        assert _holders(manifest, "scheduler") == ALL, kind
    assert _holders(manifests["ddp"], "model") == ALL
    assert manifests["ddp"].components["dataset"].ranks == [0]  # only the dispatching rank has loader state
    assert _holders(manifests["ddp-independent"], "dataset") == [[r] for r in range(WORLD)]
    assert _holders(manifests["pipeline"], "model") == [[r] for r in range(WORLD)]
    assert manifests["pipeline"].components["dataset"].ranks == [0]
    for kind in ("dp-pp", "dp-tp"):
        assert _holders(manifests[kind], "model") == SAME_SHARD, kind  # one copy per stage / shard
        assert _holders(manifests[kind], "optimizer") == SAME_SHARD, kind
        assert _holders(manifests[kind], "dataset") == SAME_REPLICA, kind  # one loader per replica
        assert sorted(manifests[kind].components["dataset"].ranks) == [0, 2], kind  # their loading ranks
    # FSDP2: one logical copy whose DTensor shards every rank wrote its part of
    assert sorted(manifests["fsdp"].components["model"].ranks) == [0, 1, 2, 3]
    # and every layout verifies clean, DP x TP's per-shard copies (part of each DTensor) included
    for kind in KINDS:
        assert verify_checkpoint(resumed[0][kind]["last"]) == [], kind
