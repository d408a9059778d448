"""Checkpoint retention and best-N preservation: properties of the pure rules under random save/eval
schedules, and the CheckpointManager applying them to real checkpoints on disk."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcp_forge import (
    CheckpointNotFoundError,
    LocationNotFoundError,
    SharingPattern,
    StateComponent,
    delete_checkpoint,
    list_checkpoints,
    read_manifest,
)
from dcp_forge.manager.manager import CheckpointManager, CheckpointPolicy
from dcp_forge.manager.retention import (
    CheckpointRecord,
    MetricCredit,
    RetentionPolicy,
    best_checkpoints,
    plan_retention,
)
from tests.support.strategies import retention_policies, save_eval_schedules


def _better(a: float, b: float, greater: bool) -> bool:
    return a > b if greater else a < b


def simulate(events, policy: RetentionPolicy):
    """Run a schedule through the pure rules as the manager does; check invariants after every save.

    Returns the surviving records and every record ever saved."""
    credit, survivors, saved = MetricCredit(), [], []
    evals_since_save: list[float] = []
    for step, (kind, value) in enumerate(events, start=1):
        if kind == "eval":
            credit = credit.observe(value, policy.greater_is_better)
            evals_since_save.append(value)
            continue
        metric, credit = credit.claim()
        finite = [v for v in evals_since_save if math.isfinite(v)]
        # The credit is the best finite evaluation since the previous save (None without one).
        expected = (max(finite) if policy.greater_is_better else min(finite)) if finite else None
        assert metric == expected
        evals_since_save = []
        record = CheckpointRecord(f"checkpoint-{step}", step, metric)
        saved.append(record)
        survivors.append(record)
        plan = plan_retention(survivors, policy)
        ids = [r.checkpoint_id for r in survivors]
        assert set(plan.keep) | set(plan.delete) == set(ids) and not set(plan.keep) & set(plan.delete)
        assert record.checkpoint_id in plan.keep, "the newest checkpoint is never deleted"
        assert not set(plan.preserved) & set(plan.delete), "a preserved checkpoint is never deleted"
        if policy.save_total_limit is not None:
            unpreserved = [i for i in plan.keep if i not in plan.preserved]
            assert len(unpreserved) <= policy.save_total_limit
            # The limit only deletes what it must: the newest `limit` always survive.
            assert set(ids[-policy.save_total_limit:]) <= set(plan.keep)
        else:
            assert plan.delete == ()
        survivors = [r for r in survivors if r.checkpoint_id in plan.keep]
        # The best N ever saved are still there: deleted checkpoints can never have been among them.
        best_ever = best_checkpoints(saved, policy.preserve_n_best, policy.greater_is_better)
        assert set(best_ever) <= {r.checkpoint_id for r in survivors}
        assert set(best_ever) == set(plan.preserved)
    return survivors, saved


@settings(max_examples=400, deadline=None)
@given(save_eval_schedules(), retention_policies())
def test_retention_invariants_under_random_save_and_eval_schedules(events, policy):
    simulate(events, policy)


@settings(max_examples=200, deadline=None)
@given(save_eval_schedules(), retention_policies())
def test_the_best_evaluation_is_preserved_at_the_next_save(events, policy):
    """Eval and save schedules are independent: the best finite evaluation that some save followed
    is credited to the first save after it, and that checkpoint survives when preserve_n_best >= 1."""
    if policy.preserve_n_best == 0:
        return
    survivors, saved = simulate(events, policy)
    best_step = best_value = None
    for step, (kind, value) in enumerate(events, start=1):
        if kind == "eval" and math.isfinite(value) and (best_value is None
                                                        or _better(value, best_value, policy.greater_is_better)):
            best_step, best_value = step, value
    followed = [r for r in saved if best_step is not None and r.step > best_step]
    if not followed:
        return
    credited = followed[0]
    assert credited.metric == best_value
    assert credited.checkpoint_id in {r.checkpoint_id for r in survivors} or any(
        r.metric == best_value for r in survivors)  # a tie kept the earlier equal one


@given(st.lists(st.tuples(st.integers(0, 50), st.one_of(st.none(), st.floats(allow_nan=True))), max_size=12,
                unique_by=lambda t: t[0]),
       retention_policies())
def test_plans_are_idempotent(entries, policy):
    records = [CheckpointRecord(f"c{s}", s, m) for s, m in entries]
    first = plan_retention(records, policy)
    kept = [r for r in records if r.checkpoint_id in first.keep]
    second = plan_retention(kept, policy)
    assert second.delete == () and second.keep == first.keep and second.preserved == first.preserved


def test_best_checkpoints_ignores_missing_and_non_finite_metrics_and_breaks_ties_by_step():
    records = [CheckpointRecord("a", 1, None), CheckpointRecord("b", 2, float("nan")),
               CheckpointRecord("c", 3, 0.5), CheckpointRecord("d", 4, 0.5), CheckpointRecord("e", 5, 0.7)]
    assert best_checkpoints(records, 2, greater_is_better=False) == ("c", "d")
    assert best_checkpoints(records, 1, greater_is_better=True) == ("e",)
    assert best_checkpoints(records, 5, greater_is_better=False) == ("c", "d", "e")


@pytest.mark.parametrize("kwargs, field", [
    (dict(save_total_limit=0), "save_total_limit"),
    (dict(preserve_n_best=-1), "preserve_n_best"),
    (dict(save_total_limit=True), "save_total_limit"),
])
def test_policy_validates_its_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RetentionPolicy(**kwargs)


def test_duplicate_ids_are_refused():
    with pytest.raises(ValueError, match="unique"):
        plan_retention([CheckpointRecord("a", 1), CheckpointRecord("a", 2)], RetentionPolicy(1))


# --- the manager on real storage ------------------------------------------------------------------


class TensorCounter:
    def __init__(self) -> None:
        self.value = torch.zeros(4)

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value.copy_(state["value"])


def _ids(output_dir: str) -> list[str]:
    return [os.path.basename(p) for p in list_checkpoints(output_dir)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(save_eval_schedules(max_events=14), retention_policies())
def test_manager_keeps_on_disk_exactly_what_the_rules_keep(tmp_path_factory, events, policy):
    out = str(tmp_path_factory.mktemp("run"))
    args = CheckpointPolicy(output_dir=out, save_total_limit=policy.save_total_limit,
                            preserve_n_best=policy.preserve_n_best, greater_is_better=policy.greater_is_better,
                            metric_for_best_model="eval_loss")
    counter = TensorCounter()
    manager = CheckpointManager(args, [StateComponent("counter", counter, SharingPattern.GLOBAL)])
    survivors, _ = simulate(events, policy)
    for step, (kind, value) in enumerate(events, start=1):
        if kind == "eval":
            manager.observe({"eval_loss": value})
        else:
            counter.value += 1
            manager.save(step=step, epoch=0)
    assert _ids(out) == [r.checkpoint_id for r in survivors]
    for record in survivors:
        extra = read_manifest(os.path.join(out, record.checkpoint_id)).extra
        assert extra["step"] == record.step and extra["metric_name"] == "eval_loss"
        assert extra["metric"] == record.metric or (extra["metric"] is None and record.metric is None)
    if policy.preserve_n_best and manager.preserved:
        assert os.path.basename(manager.best_checkpoint()) == best_checkpoints(
            survivors, 1, policy.greater_is_better)[0]


def test_retention_never_touches_checkpoints_it_did_not_write(tmp_path):
    from dcp_forge import CheckpointCoordinator

    out = str(tmp_path)
    foreign = CheckpointCoordinator([StateComponent("counter", TensorCounter(), SharingPattern.GLOBAL)], output_dir=out)
    foreign.save_checkpoint(checkpoint_id="hand-made")
    manager = CheckpointManager(CheckpointPolicy(output_dir=out, save_total_limit=1),
                                [StateComponent("counter", TensorCounter(), SharingPattern.GLOBAL)])
    for step in (1, 2, 3):
        manager.save(step=step, epoch=0)
    assert _ids(out) == ["hand-made", "checkpoint-3"]
    assert manager.deleted == ["checkpoint-1", "checkpoint-2"]


def test_resuming_discards_uncommitted_leftovers_and_fresh_runs_refuse_old_checkpoints(tmp_path):
    out = str(tmp_path)
    args = CheckpointPolicy(output_dir=out)
    manager = CheckpointManager(args, [StateComponent("counter", TensorCounter(), SharingPattern.GLOBAL)])
    manager.save(step=5, epoch=0)
    partial = tmp_path / "checkpoint-10"
    partial.mkdir()
    (partial / "_CLAIMED").write_text("{}")  # a save that crashed before committing
    with pytest.raises(ValueError, match="output_dir.*resume_from_checkpoint=True"):
        manager.prepare_output_dir(resuming=False)
    assert not partial.exists()
    counter = TensorCounter()
    resumed = CheckpointManager(args, [StateComponent("counter", counter, SharingPattern.GLOBAL)])
    assert resumed.prepare_output_dir(resuming=True) == []
    assert resumed.resume(True).endswith("checkpoint-5")
    resumed.save(step=10, epoch=0)  # the id the crashed save had claimed is free again
    assert _ids(out) == ["checkpoint-5", "checkpoint-10"]


def test_resume_true_without_checkpoints_starts_fresh(tmp_path):
    manager = CheckpointManager(CheckpointPolicy(output_dir=str(tmp_path)),
                                [StateComponent("counter", TensorCounter(), SharingPattern.GLOBAL)])
    assert manager.resume(True) is None


def test_resume_true_starts_fresh_in_a_new_output_dir_but_refuses_a_mistyped_one(tmp_path):
    # A new run directory (its parent exists; the first save creates it) starts from scratch. One
    # whose parent does not exist either is far more often a typo: refused, naming the parent.
    def resume(output_dir) -> str | None:
        return CheckpointManager(CheckpointPolicy(output_dir=str(output_dir)),
                                 [StateComponent("counter", TensorCounter(), SharingPattern.GLOBAL)]).resume(True)

    assert resume(tmp_path / "run-2") is None
    with pytest.raises(LocationNotFoundError, match=r"neither does its parent .*rnus.*a mistyped path") as err:
        resume(tmp_path / "rnus" / "run-2")
    assert isinstance(err.value, FileNotFoundError) and not isinstance(err.value, CheckpointNotFoundError)
    assert str(tmp_path / "rnus" / "run-2") in str(err.value)
    assert not (tmp_path / "run-2").exists() and not (tmp_path / "rnus").exists()


def test_save_schedules(tmp_path):
    def manager(**kwargs) -> CheckpointManager:
        args = CheckpointPolicy(output_dir=str(tmp_path), **kwargs)
        return CheckpointManager(args, [StateComponent("counter", TensorCounter(), SharingPattern.GLOBAL)])

    steps = manager(save_steps=5)
    assert [s for s in range(1, 13) if steps.should_save(s)] == [5, 10]
    assert steps.should_save(12, final=True) and not steps.should_save(12, epoch_end=True)
    steps.save(step=12, epoch=0)
    assert not steps.should_save(12, final=True), "never twice for one step"
    epochs = manager(save_strategy="epoch")
    assert epochs.should_save(7, epoch_end=True) and not epochs.should_save(500)
    never = manager(save_strategy="no")
    assert not never.should_save(500, final=True)


def test_async_saves_apply_retention_once_committed(tmp_path):
    out = str(tmp_path)
    counter = TensorCounter()
    manager = CheckpointManager(CheckpointPolicy(output_dir=out, save_total_limit=2, async_save=True),
                                [StateComponent("counter", counter, SharingPattern.GLOBAL)])
    for step in range(1, 6):
        counter.value += 1
        assert manager.save(step=step, epoch=0).endswith(f"checkpoint-{step}")
        # the previous save committed (and retention ran) before this one started
        assert manager.last_checkpoint is None if step == 1 else manager.last_checkpoint.endswith(f"checkpoint-{step - 1}")
    manager.close()
    assert manager.last_checkpoint.endswith("checkpoint-5")
    assert _ids(out) == ["checkpoint-4", "checkpoint-5"]
    restored = TensorCounter()
    CheckpointManager(CheckpointPolicy(output_dir=out),
                      [StateComponent("counter", restored, SharingPattern.GLOBAL)]).resume(True)
    assert torch.equal(restored.value, torch.full((4,), 5.0))


def test_retention_async_saves_and_resume_on_s3(s3_url, s3_storage_options):
    args = CheckpointPolicy(output_dir=s3_url, storage_options=s3_storage_options, save_total_limit=2,
                            async_save=True)
    counter = TensorCounter()
    manager = CheckpointManager(args, [StateComponent("counter", counter, SharingPattern.GLOBAL)])
    for step in range(1, 5):
        counter.value += 1
        manager.save(step=step, epoch=0)
    manager.close()
    names = [p.rsplit("/", 1)[-1] for p in list_checkpoints(s3_url, s3_storage_options)]
    assert names == ["checkpoint-3", "checkpoint-4"]
    restored = TensorCounter()
    resumed = CheckpointManager(args, [StateComponent("counter", restored, SharingPattern.GLOBAL)])
    assert resumed.resume(True).endswith("checkpoint-4")
    assert torch.equal(restored.value, torch.full((4,), 4.0))
    resumed.close()


def test_resuming_from_an_older_checkpoint_than_output_dirs_newest_is_refused_up_front(tmp_path):
    args = CheckpointPolicy(output_dir=str(tmp_path))
    manager = CheckpointManager(args, [StateComponent("counter", TensorCounter(), SharingPattern.GLOBAL)])
    old, _ = manager.save(step=5, epoch=0), manager.save(step=10, epoch=0)
    resumed = CheckpointManager(args, [StateComponent("counter", TensorCounter(), SharingPattern.GLOBAL)])
    with pytest.raises(ValueError, match=r"step 5.*collide with them when it saves step 10"):
        resumed.resume(old)
    delete_checkpoint(os.path.join(str(tmp_path), "checkpoint-10"))
    assert resumed.resume(old) == old


@pytest.mark.parametrize("target", [False, None, 3])
def test_resume_refuses_what_is_neither_true_nor_a_path(tmp_path, target):
    """Not resuming is decided before calling resume; False or None there is a caller's mistake, named as such."""
    manager = CheckpointManager(CheckpointPolicy(output_dir=str(tmp_path)),
                                [StateComponent("counter", TensorCounter(), SharingPattern.GLOBAL)])
    with pytest.raises(TypeError, match=r"CheckpointManager\.resume takes True or a checkpoint path \(got .* <"):
        manager.resume(target)
