"""A real ``transformers.Trainer`` run through dcp_forge's ``ForgeTrainer``: a tiny GPT-2 built from a config
(nothing downloaded) trained on fixed tokens, for tests that interrupt, resume and compare runs."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from dcp_forge.integrations.hf import ForgeTrainer  # noqa: E402

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


def train(output_dir: str, *, save: bool, resume: bool | str | None = None, seed: int = 0,
          callbacks: Sequence[TrainerCallback] = (), **forge) -> ForgeTrainer:
    args = TrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_strategy="steps" if save else "no",
        save_steps=SAVE_AT, report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    counter = StepCounter()
    trainer = ForgeTrainer(model=tiny_gpt2(seed), args=args, train_dataset=TokenData(), callbacks=[counter, *callbacks],
                           **forge)
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
