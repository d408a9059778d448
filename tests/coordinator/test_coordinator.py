"""CheckpointCoordinator in one process: round trips, strictness, errors, DCP interop both ways,
and the commit protocol (a crashed save never shadows the previous checkpoint)."""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_forge import (
    CheckpointCoordinator,
    CheckpointExistsError,
    CheckpointNotFoundError,
    MissingComponentError,
    RNGState,
    StateComponent,
    StateMismatchError,
    UnexpectedComponentError,
    latest_checkpoint,
    list_checkpoints,
    read_manifest,
)
from dcp_forge.ops.convert import load_checkpoint_state
from dcp_forge.planners import ForgeLoadPlanner, ForgeSavePlanner
from dcp_forge.storage import open_reader, open_writer
from tests.support.statefuls import Counter
from tests.support.tamper import data_files, flip_byte

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def trained(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    for _ in range(3):
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def components(model, opt, sched, counter, **over):
    comps = [StateComponent("model", model, "global"), StateComponent("optimizer", opt, "global"),
             StateComponent("scheduler", sched, "global"), StateComponent("trainer", counter, "global"),
             StateComponent("rng", RNGState(), "per_rank", required=False)]
    return [over.get(c.key, c) for c in comps]


def test_full_training_state_round_trip(tmp_path):
    model, opt, sched = trained()
    coord = CheckpointCoordinator(components(model, opt, sched, Counter(3)), output_dir=tmp_path)
    path = coord.save_checkpoint(checkpoint_id="checkpoint-3")
    expected_rng = torch.rand(3)
    m2, o2, s2 = trained(seed=1)
    c2 = Counter()
    torch.manual_seed(99)
    CheckpointCoordinator(components(m2, o2, s2, c2), output_dir=tmp_path).load_checkpoint()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values(), strict=True))
    assert c2.step == 3 and s2.state_dict() == sched.state_dict()
    for p, q in zip(opt.state.values(), o2.state.values(), strict=True):
        assert all(torch.equal(p[k], q[k]) for k in p)
    assert torch.equal(torch.rand(3), expected_rng)  # RNG restored to the moment of the save
    manifest = read_manifest(path)
    assert set(manifest.components) == {"model", "optimizer", "scheduler", "trainer", "rng"}
    assert manifest.components["rng"].sharing_pattern == "per_rank"
    assert list(manifest.components["rng"].copies) == ["rng@rank0"]


def test_single_process_saves_and_loads_do_not_warn_that_they_are_single_process(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, opt, sched = trained()
        with CheckpointCoordinator(components(model, opt, sched, Counter(3)), output_dir=tmp_path) as coord:
            coord.save_checkpoint(checkpoint_id="checkpoint-3")
            coord.load_checkpoint()
        load_checkpoint_state(tmp_path / "checkpoint-3")
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]


def test_fresh_optimizer_gets_saved_state(tmp_path):
    model, opt, sched = trained()
    CheckpointCoordinator(components(model, opt, sched, Counter()), output_dir=tmp_path).save_checkpoint(
        checkpoint_id="c")
    m2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    assert not o2.state
    CheckpointCoordinator([StateComponent("model", m2, "global"), StateComponent("optimizer", o2, "global")],
                          output_dir=tmp_path).load_checkpoint(strict=False)
    assert int(o2.state[m2[0].weight]["step"]) == 3
    assert torch.equal(o2.state[m2[0].weight]["exp_avg"], opt.state[model[0].weight]["exp_avg"])


def test_missing_required_component_names_it(tmp_path):
    CheckpointCoordinator([StateComponent("trainer", Counter(1), "global")], output_dir=tmp_path).save_checkpoint(
        checkpoint_id="c")
    coord = CheckpointCoordinator([StateComponent("trainer", Counter(), "global"),
                                   StateComponent("model", torch.nn.Linear(2, 2), "replicated")],
                                  output_dir=tmp_path)
    with pytest.raises(MissingComponentError, match=r"component 'model' \(rank 0\) is not in checkpoint"):
        coord.load_checkpoint()
    with pytest.warns(UserWarning, match="'model'"):
        coord.load_checkpoint(strict=False)


def test_missing_optional_component_is_skipped_with_a_warning(tmp_path):
    CheckpointCoordinator([StateComponent("trainer", Counter(1), "global")], output_dir=tmp_path).save_checkpoint(
        checkpoint_id="c")
    rng = StateComponent("rng", RNGState(), "per_rank", required=False)
    counter = Counter()
    with pytest.warns(UserWarning, match="'rng'"):
        CheckpointCoordinator([StateComponent("trainer", counter, "global"), rng], output_dir=tmp_path
                              ).load_checkpoint()
    assert counter.step == 1


def test_unknown_component_in_strict_mode(tmp_path):
    CheckpointCoordinator([StateComponent("trainer", Counter(1), "global"),
                           StateComponent("extra", Counter(2), "global")], output_dir=tmp_path
                          ).save_checkpoint(checkpoint_id="c")
    coord = CheckpointCoordinator([StateComponent("trainer", Counter(), "global")], output_dir=tmp_path)
    with pytest.raises(UnexpectedComponentError, match=r"nobody declared: \['extra'\]"):
        coord.load_checkpoint()
    with pytest.warns(UserWarning, match="extra"):
        coord.load_checkpoint(strict=False)


def test_shape_and_dtype_mismatch_name_component_and_key(tmp_path):
    CheckpointCoordinator([StateComponent("model", torch.nn.Linear(4, 3), "replicated")], output_dir=tmp_path
                          ).save_checkpoint(checkpoint_id="c")
    with pytest.raises(StateMismatchError, match=r"component 'model'.*shape mismatch for 'model.weight'.*"
                                                 r"\(3, 4\).*\(5, 4\)"):
        CheckpointCoordinator([StateComponent("model", torch.nn.Linear(4, 5), "replicated")], output_dir=tmp_path
                              ).load_checkpoint()
    with pytest.raises(StateMismatchError, match="dtype mismatch for 'model.weight'"):
        CheckpointCoordinator([StateComponent("model", torch.nn.Linear(4, 3).double(), "replicated")],
                              output_dir=tmp_path).load_checkpoint()


def test_dcp_forge_checkpoint_loads_with_plain_dcp(tmp_path):
    model, *_ = trained()
    rng = RNGState()
    path = CheckpointCoordinator([StateComponent("model", model, "replicated"),
                                  StateComponent("rng", rng, "per_rank")], output_dir=tmp_path
                                 ).save_checkpoint(checkpoint_id="c")
    sd = {"model": torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).state_dict(),
          "rng@rank0": rng.state_dict()}  # the documented storage keys (docs/FORMAT.md)
    dcp.load(sd, checkpoint_id=path)  # DCP's own FileSystemReader and DefaultLoadPlanner
    assert all(torch.equal(a, b) for a, b in zip(sd["model"].values(), model.state_dict().values(), strict=True))


def test_plain_dcp_checkpoint_loads_through_dcp_forge(tmp_path):
    model, opt, sched = trained()
    dcp.save({"model": model, "trainer": Counter(5)}, checkpoint_id=tmp_path / "legacy-1")
    assert latest_checkpoint(tmp_path).endswith("legacy-1")
    m2, _, _ = trained(seed=4)
    c2 = Counter()
    CheckpointCoordinator([StateComponent("model", m2, "replicated"), StateComponent("trainer", c2, "global")],
                          output_dir=tmp_path).load_checkpoint()
    assert c2.step == 5 and torch.equal(m2[0].weight, model[0].weight)


def test_planners_work_straight_in_dcp_with_dcps_own_storage(tmp_path):
    model, *_ = trained()
    big = torch.randn(1 << 20)  # 4 MiB, cut into chunks by the planner
    from dcp_forge.core.placement import ChunkPolicy

    planner = ForgeSavePlanner({"rng": "per_rank", "model": "replicated"}, chunk_policy=ChunkPolicy(1 << 18))
    dcp.save({"model": model, "big": big, "rng": RNGState()}, checkpoint_id=tmp_path / "c", planner=planner)
    m2, *_ = trained(seed=3)
    big2 = torch.zeros(1 << 20)
    dcp.load({"model": m2, "big": big2, "rng": RNGState()}, checkpoint_id=tmp_path / "c",
             planner=ForgeLoadPlanner({"rng": "per_rank", "model": "replicated"}))
    assert torch.equal(big2, big) and torch.equal(m2[2].bias, model[2].bias)
    # ... and with dcp_forge's storage, also directly
    dcp.save({"big": big}, storage_writer=open_writer(tmp_path / "d"), planner=ForgeSavePlanner())
    big3 = torch.zeros(1 << 20)
    dcp.load({"big": big3}, storage_reader=open_reader(tmp_path / "d"), planner=ForgeLoadPlanner())
    assert torch.equal(big3, big)


def test_a_failed_save_never_shadows_the_previous_checkpoint_and_leaves_no_debris(tmp_path, monkeypatch):
    from dcp_forge.storage import writer

    class Exploding(Counter):
        def state_dict(self):
            return {"step": self.step, "t": torch.ones(3)}

    def exploding_write(tensor, stream):  # fails while the data files are being written
        stream.write(b"partial")
        raise RuntimeError("disk on fire")

    good = CheckpointCoordinator([StateComponent("trainer", Counter(1), "global")], output_dir=tmp_path)
    first = good.save_checkpoint(checkpoint_id="checkpoint-1")
    bad = CheckpointCoordinator([StateComponent("trainer", Exploding(2), "global")], output_dir=tmp_path)
    monkeypatch.setattr(writer, "save_tensor", exploding_write)
    monkeypatch.setattr(writer, "_packable", lambda item, data, form: None)  # every tensor through save_tensor
    with pytest.raises(Exception, match="disk on fire"):
        bad.save_checkpoint(checkpoint_id="checkpoint-2")
    assert not os.path.exists(tmp_path / "checkpoint-2")  # removed once the save failed
    assert latest_checkpoint(tmp_path) == first
    assert list_checkpoints(tmp_path) == [first]
    with pytest.raises(CheckpointNotFoundError):
        CheckpointCoordinator([StateComponent("trainer", Counter(), "global")], output_dir=tmp_path
                              ).load_checkpoint(tmp_path / "checkpoint-2")


def test_saves_never_overwrite(tmp_path):
    coord = CheckpointCoordinator([StateComponent("trainer", Counter(1), "global")], output_dir=tmp_path)
    coord.save_checkpoint(checkpoint_id="c")
    with pytest.raises(CheckpointExistsError, match="already exists"):
        coord.save_checkpoint(checkpoint_id="c")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(CheckpointExistsError, match="not empty"):
        coord.save_checkpoint(checkpoint_id="junk")


@pytest.mark.parametrize("bad_id", ["../escape", "/abs", "", "a/b", ".hidden", "x..y"])
def test_checkpoint_ids_cannot_escape_output_dir(tmp_path, bad_id):
    coord = CheckpointCoordinator([StateComponent("trainer", Counter(1), "global")], output_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoint_id"):
        coord.save_checkpoint(checkpoint_id=bad_id)


def test_latest_follows_commit_order_and_no_checkpoint_is_clear(tmp_path):
    coord = CheckpointCoordinator([StateComponent("trainer", Counter(1), "global")], output_dir=tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        coord.load_checkpoint()
    paths = [coord.save_checkpoint(checkpoint_id=name) for name in ["checkpoint-9", "checkpoint-10", "best"]]
    assert list_checkpoints(tmp_path) == paths
    assert latest_checkpoint(tmp_path) == paths[-1]
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_corrupted_byte_is_detected_on_load(tmp_path):
    warnings.simplefilter("ignore")
    coord = CheckpointCoordinator([StateComponent("model", torch.nn.Linear(64, 64), "replicated")],
                                  output_dir=tmp_path)
    path = coord.save_checkpoint(checkpoint_id="c")
    data_file = data_files(path)[0]
    flip_byte(os.path.join(path, data_file), 900)
    with pytest.raises(ValueError, match=rf"checksum mismatch in {data_file}.*'model'"):
        coord.load_checkpoint(path)


class _SeesCollector(Counter):
    """Records whether the garbage collector ran while DCP asked for or handed over its state."""

    seen: list[bool]

    def state_dict(self) -> dict:
        self.seen.append(gc.isenabled())
        return super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.seen.append(gc.isenabled())
        super().load_state_dict(state)


def test_save_and_load_pause_the_garbage_collector_and_restore_it(tmp_path):
    counter = _SeesCollector(5)
    counter.seen = []
    coord = CheckpointCoordinator([StateComponent("trainer", counter, "global")], output_dir=tmp_path)
    assert gc.isenabled()
    coord.load_checkpoint(coord.save_checkpoint(checkpoint_id="checkpoint-5"))
    assert counter.seen and not any(counter.seen)
    assert gc.isenabled()
