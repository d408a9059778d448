"""Hugging Face ``transformers.Trainer`` through dcp_forge: a real Trainer trains a tiny GPT-2 built from a
config (nothing downloaded), saves at step k into dcp_forge, resumes with its own
``resume_from_checkpoint``, and reproduces the uninterrupted run's losses and weights bit for bit."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from dcp_forge import list_checkpoints, read_manifest, verify_checkpoint  # noqa: E402
from dcp_forge.integrations.hf import FORGE_DIR, ForgeTrainer, forge_checkpoint_of  # noqa: E402
from tests.support.tamper import data_files, flip_byte  # noqa: E402

STEPS, SAVE_AT = 6, 3

hf_logging.set_verbosity_error()


class TokenData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.tokens = torch.randint(0, 64, (16, 12), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


class StepCounter(TrainerCallback):
    """Optimizer steps run in this process (a resumed run runs only those after its checkpoint)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # Dropout stays on: the resumed run reproduces the uninterrupted one only if the RNG comes back too.
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def train(output_dir: str, *, save: bool, resume: bool | str | None = None, seed: int = 0, **forge) -> ForgeTrainer:
    args = TrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_strategy="steps" if save else "no",
        save_steps=SAVE_AT, report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    counter = StepCounter()
    trainer = ForgeTrainer(model=tiny_gpt2(seed), args=args, train_dataset=TokenData(), callbacks=[counter], **forge)
    trainer.train(resume_from_checkpoint=resume)
    trainer.steps_run = counter.steps
    return trainer


def losses(trainer: ForgeTrainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def assert_same_end(a: ForgeTrainer, b: ForgeTrainer) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    for index, moments in sa["state"].items():
        for k, v in moments.items():
            assert torch.equal(v, sb["state"][index][k]), (index, k)
    assert a.lr_scheduler.state_dict()["_last_lr"] == b.lr_scheduler.state_dict()["_last_lr"]


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
