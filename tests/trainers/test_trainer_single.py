"""The single-device Trainer end to end: bit-exact resume in a fresh process, epoch checkpoints,
evaluation credit for best-N, divergence detection, strategies with extra models, components."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess

import pytest
import torch

from dcp_forge import SharingPattern, read_manifest
from dcp_forge.trainers import (
    DivergenceDetector,
    DPOStrategy,
    PPOStrategy,
    SFTStrategy,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from dcp_forge.trainers.data import ReversalPreferenceDataset, ReversalSFTDataset, synthetic_ppo_rollouts
from dcp_forge.trainers.run import TinyJob, run_job
from dcp_forge.trainers.tiny_lm import TinyCritic, TinyLM, TinyLMConfig
from tests.support.paths import REPO

pytestmark = [pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.usefixtures("one_thread")]

ROOT = str(REPO)
CONFIG = TinyLMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, dropout=0.1)


def test_resume_in_a_fresh_process_is_bit_exact(tmp_path, interpreters):
    """40 steps (past an epoch end) uninterrupted vs interrupted after step 25 (last checkpoint: 20)
    and resumed by `python -m dcp_forge.trainers.run --resume` in a new process; the interrupted and
    the resumed run save asynchronously, the reference synchronously."""
    job = TinyJob(trainer="single", max_steps=40, save_steps=10, output_dir=str(tmp_path / "interrupted"),
                  async_save=True)
    reference = run_job(TinyJob(**{**job.__dict__, "output_dir": str(tmp_path / "reference"),
                                   "async_save": False}))
    interrupted = run_job(TinyJob(**{**job.__dict__, "interrupt_at": 25}))
    assert interrupted.output.stop_reason == "interrupted after step 25"
    assert interrupted.output.step_losses == reference.output.step_losses[:25]
    results = tmp_path / "resumed.pt"
    proc = subprocess.run(
        [interpreters, "-m", "dcp_forge.trainers.run", "--trainer", "single", "--max-steps", "40",
         "--save-steps", "10", "--output-dir", job.output_dir, "--resume", "--async-save",
         "--results-file", str(results)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "checkpoint-20" in proc.stdout
    resumed = torch.load(results, weights_only=False)
    assert resumed["resumed_from"].endswith("checkpoint-20")
    assert resumed["step_losses"] == reference.output.step_losses[20:]
    assert resumed["params"].keys() == reference.params.keys()
    assert all(torch.equal(resumed["params"][k], reference.params[k]) for k in reference.params)


@pytest.mark.parametrize("upload", ["thread", pytest.param("process", marks=pytest.mark.proc)])
def test_overlapped_async_checkpoints_are_the_sync_ones(tmp_path, upload):
    """Saves that copy parameters and AdamW state during the next steps (the optimizer step waits for
    what is left), uploaded on a thread or by an upload process, write the files a sync save writes."""
    job = TinyJob(trainer="single", max_steps=12, save_steps=4, output_dir=str(tmp_path / "sync"))
    reference = run_job(job)
    overlapped = run_job(dataclasses.replace(job, output_dir=str(tmp_path / "overlapped"), async_save=True,
                                             async_staging="overlapped", async_upload=upload,
                                             async_lazy_min_bytes=1024))
    assert overlapped.output.step_losses == reference.output.step_losses
    skip = {"_CLAIMED", "_COMMITTED", "checkpoint_manifest.json", ".metadata"}
    for step in (4, 8, 12):
        sync_dir, async_dir = tmp_path / "sync" / f"checkpoint-{step}", tmp_path / "overlapped" / f"checkpoint-{step}"
        names = sorted(set(os.listdir(sync_dir)) - skip)
        assert names == sorted(set(os.listdir(async_dir)) - skip)
        assert all((sync_dir / n).read_bytes() == (async_dir / n).read_bytes() for n in names), step


def _trainer(tmp_path, name="run", dataset=None, **kwargs) -> Trainer:
    callbacks = kwargs.pop("callbacks", ())
    strategy = kwargs.pop("strategy", None)
    model = kwargs.pop("model", None) or TinyLM(CONFIG, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4, learning_rate=3e-3,
                             **kwargs)
    dataset = dataset if dataset is not None else ReversalSFTDataset(CONFIG.vocab_size, 16, 32, seed=1)
    return Trainer(model, args, dataset, eval_dataset=dataset, strategy=strategy or SFTStrategy(),
                   callbacks=callbacks)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_epoch_checkpoints_resume_at_the_next_epoch(tmp_path):
    full = _trainer(tmp_path, "full", save_strategy="epoch", num_train_epochs=3)
    reference = full.train()
    assert reference.global_step == 24 and full.state.epoch == 3
    first = _trainer(tmp_path, "part", save_strategy="epoch", num_train_epochs=1).train()
    assert os.path.basename(first.last_checkpoint) == "checkpoint-8"
    resumed_trainer = _trainer(tmp_path, "part", save_strategy="epoch", num_train_epochs=3,
                               resume_from_checkpoint=True)
    resumed = resumed_trainer.train()
    assert resumed.step_losses == reference.step_losses[8:]
    assert resumed_trainer.state.epoch == 3
    assert [os.path.basename(p) for p in sorted(os.listdir(tmp_path / "part"))] == [
        "checkpoint-16", "checkpoint-24", "checkpoint-8"]
    assert all(torch.equal(a, b) for a, b in zip(_params(full).values(), _params(resumed_trainer).values(),
                                                 strict=True))


def test_an_evaluation_between_saves_credits_the_next_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, max_steps=12, save_steps=6, eval_strategy="steps", eval_steps=4, preserve_n_best=1,
                       metric_for_best_model="eval_loss", save_total_limit=1)
    out = trainer.train()
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert sorted(evals) == [4, 8, 12]
    kept = {os.path.basename(p): read_manifest(p).extra for p in
            (str(tmp_path / "run" / d) for d in os.listdir(tmp_path / "run"))}
    # checkpoint-12 is credited with the best of the evaluations at 8 and 12; checkpoint-6 with the one at 4
    assert kept["checkpoint-12"]["metric"] == min(evals[8], evals[12])
    if "checkpoint-6" in kept:
        assert kept["checkpoint-6"]["metric"] == evals[4] < kept["checkpoint-12"]["metric"]
        assert os.path.basename(out.best_checkpoint) == "checkpoint-6"
    else:
        assert os.path.basename(out.best_checkpoint) == "checkpoint-12"
    assert set(out.metrics) == {"eval_loss", "eval_tokens"}


class BoostLearningRate(TrainerCallback):
    """Multiplies the learning rate after ``step``: a run that diverges, as too high a rate does."""

    def __init__(self, step: int, factor: float) -> None:
        self.step, self.factor = step, factor

    def on_step_end(self, args, state, control, optimizer, lr_scheduler, **kwargs):
        if state.global_step == self.step:
            for group in optimizer.param_groups:
                group["lr"] *= self.factor
            lr_scheduler.base_lrs = [lr * self.factor for lr in lr_scheduler.base_lrs]


def test_divergence_stops_the_run_and_keeps_the_best_checkpoint(tmp_path):
    boost = BoostLearningRate(step=12, factor=3e3)
    detector = DivergenceDetector(spike_factor=3.0, warmup_steps=5, patience=5)
    trainer = _trainer(tmp_path, max_steps=60, save_steps=4, save_total_limit=1, preserve_n_best=1,
                       callbacks=[boost, detector])
    out = trainer.train()
    assert out.stop_reason.startswith("divergence at step") and out.global_step < 60
    assert detector.tripped_at == out.global_step
    last = read_manifest(out.last_checkpoint).extra
    best = read_manifest(out.best_checkpoint).extra
    assert last["step"] <= detector.tripped_at, "nothing is saved after the divergence is detected"
    assert best["step"] <= 12 < last["step"], "a spiky checkpoint was saved, yet the good one was kept"
    assert best["metric"] < last["metric"]
    assert sorted(os.listdir(tmp_path / "run")) == sorted({f"checkpoint-{best['step']}", f"checkpoint-{last['step']}"})
    # the detector's own state went into the checkpoints
    saved = read_manifest(out.last_checkpoint).components
    assert saved["callbacks"].sharing_pattern == SharingPattern.GLOBAL.value


def test_strategy_models_are_trained_and_checkpointed_and_resume_exactly(tmp_path):
    policy = TinyLM(CONFIG, seed=0)
    rollouts = synthetic_ppo_rollouts(CONFIG.vocab_size, 16, 32, seed=2, policy=policy,
                                      critic=TinyCritic(CONFIG, seed=1))

    def ppo(name, **kwargs):
        strategy = PPOStrategy(vf_coef=0.5, critic=TinyCritic(CONFIG, seed=1))
        return _trainer(tmp_path, name, dataset=rollouts, strategy=strategy, model=TinyLM(CONFIG, seed=0),
                        save_steps=3, **kwargs)

    full = ppo("full", max_steps=8)
    reference = full.train()
    ppo("part", max_steps=8, callbacks=[StopAt(5)]).train()
    resumed_trainer = ppo("part", max_steps=8, resume_from_checkpoint=True)
    resumed = resumed_trainer.train()
    assert resumed.resumed_from.endswith("checkpoint-3") and resumed.step_losses == reference.step_losses[3:]
    for a, b in ((full.model, resumed_trainer.model), (full.aux_modules["critic"], resumed_trainer.aux_modules["critic"])):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(full.aux_modules["critic"].value_head.weight, TinyCritic(CONFIG, seed=1).value_head.weight)
    assert "critic" in read_manifest(reference.last_checkpoint).components

    policy = TinyLM(dataclasses.replace(CONFIG, dropout=0.0), seed=0)  # no dropout: policy == reference at first
    dpo = _trainer(tmp_path, "dpo", dataset=ReversalPreferenceDataset(CONFIG.vocab_size, 16, 16, seed=3),
                   strategy=DPOStrategy(copy.deepcopy(policy)), model=policy, max_steps=4, save_steps=4)
    out = dpo.train()
    assert out.step_losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: loss is ln 2
    assert "reference" in read_manifest(out.last_checkpoint).components


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.stop("test stop")


def test_components_follow_the_save_flags(tmp_path):
    trainer = _trainer(tmp_path, save_optimizer_state=False, save_rng_state=False, max_steps=2)
    trainer.setup()
    table = {c.key: c.sharing_pattern for c in trainer.get_state_components()}
    assert table == {"model": SharingPattern.GLOBAL, "scheduler": SharingPattern.GLOBAL,
                     "dataset": SharingPattern.GLOBAL, "trainer": SharingPattern.GLOBAL}
    assert trainer.get_process_groups() == {}
    out = trainer.train()
    assert set(read_manifest(out.last_checkpoint).components) == set(table)
