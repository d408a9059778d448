"""Hugging Face ``transformers.Trainer`` through dcp_forge: a real Trainer trains a tiny GPT-2 built from a
config (nothing downloaded), saves at step k into dcp_forge, resumes with its own
``resume_from_checkpoint``, and reproduces the uninterrupted run's losses and weights bit for bit, in
one process and on two DDP ranks."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import TrainerCallback  # noqa: E402

from dcp_forge import list_checkpoints, read_manifest, verify_checkpoint  # noqa: E402
from dcp_forge.integrations.hf import FORGE_DIR, forge_checkpoint_of  # noqa: E402
from tests.support.hf_trainer import SAVE_AT, STEPS, assert_same_end, losses, train  # noqa: E402
from tests.support.tamper import data_files, flip_byte  # noqa: E402


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_resumed_training_matches_an_uninterrupted_run_bit_for_bit(tmp_path, one_thread, async_save):
    straight = train(str(tmp_path / "straight"), save=False)

    out = str(tmp_path / "run")
    train(out, save=True, forge_async_save=async_save)
    checkpoint = os.path.join(out, f"checkpoint-{SAVE_AT}")
    assert sorted(os.listdir(checkpoint)) == [FORGE_DIR, "trainer_state.json"]  # no torch.save files beside ours
    assert list_checkpoints(checkpoint) == [forge_checkpoint_of(checkpoint)]
    assert verify_checkpoint(forge_checkpoint_of(checkpoint)) == []
    assert sorted(read_manifest(forge_checkpoint_of(checkpoint)).components) == ["model", "optimizer", "rng", "scheduler"]

    resumed = train(out, save=False, resume=checkpoint, seed=1)  # other initial weights: all must come from the checkpoint
    # Steps up to the checkpoint come from its trainer_state.json, the others were computed again.
    assert losses(resumed) == losses(straight) and sorted(losses(straight)) == list(range(1, STEPS + 1))
    assert (straight.steps_run, resumed.steps_run) == (STEPS, STEPS - SAVE_AT)
    assert_same_end(straight, resumed)


def test_resume_true_finds_the_latest_checkpoint(tmp_path, one_thread):
    out = str(tmp_path)
    first = train(out, save=True)
    shutil.rmtree(os.path.join(out, f"checkpoint-{STEPS}"))  # as if the job had died before its last save
    resumed = train(out, save=False, resume=True, seed=1)
    assert resumed.steps_run == STEPS - SAVE_AT
    assert_same_end(first, resumed)


def test_a_torn_checkpoint_is_refused(tmp_path, one_thread):
    out = str(tmp_path)
    train(out, save=True)
    forge = forge_checkpoint_of(os.path.join(out, f"checkpoint-{SAVE_AT}"))
    flip_byte(os.path.join(forge, data_files(forge)[0]), 64)
    with pytest.raises(ValueError, match="checksum|IntegrityError|xxh3"):
        train(out, save=False, resume=os.path.join(out, f"checkpoint-{SAVE_AT}"), seed=1)


class RankDraws(TrainerCallback):
    """Moves each rank's RNG on by a different number of draws as training begins. The Trainer seeds
    every rank alike, so without it the ranks' RNG states would be equal, and mixing them up on load
    (one rank's state restored on another) would go unseen."""

    def on_train_begin(self, args, state, control, **kwargs):
        torch.rand(1 + args.process_index)


def _two_ranks_interrupted_and_resumed(rank: int, world: int, root: str, async_save: bool) -> dict:
    torch.set_num_threads(1)
    straight = train(os.path.join(root, "straight"), save=False, callbacks=[RankDraws()])
    out = os.path.join(root, "run")
    train(out, save=True, forge_async_save=async_save, callbacks=[RankDraws()])
    resumed = train(out, save=False, resume=os.path.join(out, f"checkpoint-{SAVE_AT}"), seed=1 + rank,
                    callbacks=[RankDraws()])
    assert_same_end(straight, resumed)
    return {"losses": (losses(straight), losses(resumed)), "steps": resumed.steps_run,
            "weights": {k: v.clone() for k, v in resumed.model.state_dict().items()},
            "distributed": (str(resumed.args.distributed_state.distributed_type), resumed.args.world_size)}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_two_ddp_ranks_resume_bit_for_bit(ranks, tmp_path, async_save):
    first, second = ranks(_two_ranks_interrupted_and_resumed, 2, str(tmp_path), async_save)
    for run in (first, second):
        assert run["distributed"] == ("DistributedType.MULTI_CPU", 2)
        straight, resumed = run["losses"]
        assert resumed == straight and sorted(straight) == list(range(1, STEPS + 1))
        assert run["steps"] == STEPS - SAVE_AT
    for name, value in first["weights"].items():  # DDP: the ranks end with the same weights
        assert torch.equal(value, second["weights"][name]), name
    checkpoint = forge_checkpoint_of(tmp_path / "run" / f"checkpoint-{SAVE_AT}")
    assert verify_checkpoint(checkpoint) == []
    manifest = read_manifest(checkpoint)
    assert manifest.world_size == 2
    assert sorted(manifest.components) == ["model", "optimizer", "rng", "scheduler"]
