"""TrainingProgress: the public Stateful for the step, epoch and data a run consumed, saved and
resumed exactly (ints beyond float precision included); bad values refused."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from dcp_forge import CheckpointCoordinator, RNGState, SharingPattern, StateComponent, TrainingProgress
from dcp_forge.errors import StateMismatchError
from tests.support.strategies import progress_advances, progress_counts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=progress_counts, advances=progress_advances, epochs=progress_counts)
def test_progress_round_trips_exactly_through_a_checkpoint(tmp_path_factory, start, advances, epochs):
    progress = TrainingProgress(step=start, samples_seen=start, tokens_seen=start)
    for samples, tokens, steps in advances:
        progress.advance(samples=samples, tokens=tokens, steps=steps)
    progress.epoch = epochs
    out = tmp_path_factory.mktemp("progress")
    with CheckpointCoordinator([StateComponent("progress", progress, SharingPattern.GLOBAL)], output_dir=out) as coord:
        coord.save_checkpoint(checkpoint_id="checkpoint-1")
    resumed = TrainingProgress()
    with CheckpointCoordinator([StateComponent("progress", resumed, SharingPattern.GLOBAL)], output_dir=out) as coord:
        coord.load_checkpoint()
    assert resumed == progress
    assert all(type(v) is int for v in resumed.state_dict().values())
    assert resumed.step == start + sum(s for _, _, s in advances)


def test_a_resumed_loop_continues_at_the_saved_step(tmp_path):
    """The README's pattern: the step to continue from comes out of the checkpoint."""
    def components(progress):
        return [StateComponent("progress", progress, SharingPattern.REPLICATED),
                StateComponent("rng", RNGState(), SharingPattern.PER_RANK, on_topology_change="reseed")]

    progress = TrainingProgress()
    with CheckpointCoordinator(components(progress), output_dir=tmp_path) as coord:
        while progress.step < 30:
            progress.advance(samples=8, tokens=8 * 128)
            if progress.step % 10 == 0:
                coord.save_checkpoint(checkpoint_id=f"checkpoint-{progress.step}")
        progress.end_epoch()
    again = TrainingProgress()
    with CheckpointCoordinator(components(again), output_dir=tmp_path) as coord:
        coord.load_checkpoint()
    assert (again.step, again.epoch, again.samples_seen, again.tokens_seen) == (30, 0, 240, 240 * 128)


@pytest.mark.parametrize("kwargs", [dict(step=-1), dict(epoch=1.0), dict(samples_seen=True), dict(tokens_seen="3")])
def test_bad_counts_are_refused_naming_the_field(kwargs):
    [(name, _)] = kwargs.items()
    with pytest.raises(StateMismatchError, match=f"TrainingProgress.{name} must be a non-negative int"):
        TrainingProgress(**kwargs)


def test_bad_advances_and_saved_states_are_refused():
    progress = TrainingProgress()
    with pytest.raises(ValueError, match="advance.samples must be a non-negative int"):
        progress.advance(samples=-3)
    with pytest.raises(ValueError, match=r"missing \['tokens_seen'\]"):
        progress.load_state_dict({"step": 1, "epoch": 0, "samples_seen": 0})
    with pytest.raises(ValueError, match="TrainingProgress.step"):
        progress.load_state_dict({"step": 1.5, "epoch": 0, "samples_seen": 0, "tokens_seen": 0})
    assert progress == TrainingProgress(), "a refused state leaves the progress as it was"
