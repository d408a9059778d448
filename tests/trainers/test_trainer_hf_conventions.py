"""The trainers follow Hugging Face's Trainer where HF has the same feature: callback events with
HF's names, order and ``(args, state, control, **kwargs)`` signatures, ``TrainerControl`` requests,
``train(resume_from_checkpoint=...)``, ``eval_strategy``, ``metric_for_best_model`` and
``load_best_model_at_end``; and a trainer is a context manager that closes itself."""

from __future__ import annotations

import os

import pytest
import torch

from dcp_forge import read_manifest
from dcp_forge.errors import CheckpointNotFoundError
from dcp_forge.trainers import DivergenceDetector, SFTStrategy, Trainer, TrainerCallback, TrainingArguments
from dcp_forge.trainers.callbacks import CALLBACK_EVENTS
from dcp_forge.trainers.data import ReversalSFTDataset
from dcp_forge.trainers.tiny_lm import TinyLM, TinyLMConfig

pytestmark = [pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.usefixtures("one_thread")]

CONFIG = TinyLMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, dropout=0.1)
STEPS_PER_EPOCH = 8  # 32 samples, batches of 4


def _trainer(output_dir, callbacks=(), **kwargs) -> Trainer:
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                             learning_rate=3e-3, **kwargs)
    dataset = ReversalSFTDataset(CONFIG.vocab_size, 16, 32, seed=1)
    return Trainer(TinyLM(CONFIG, seed=0), args, dataset, eval_dataset=dataset, strategy=SFTStrategy(),
                   callbacks=callbacks)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Recorder(TrainerCallback):
    """Records every event with the step it came at and the keyword arguments it got."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, dict]] = []

    def __getattribute__(self, name):
        if name in CALLBACK_EVENTS:
            def record(args, state, control, **kwargs):
                assert isinstance(args, TrainingArguments) and control is not None
                self.events.append((name, state.global_step, kwargs))
            return record
        return super().__getattribute__(name)


def test_callback_events_come_in_hf_order_with_hf_arguments(tmp_path):
    recorder = Recorder()
    trainer = _trainer(tmp_path / "run", [recorder], num_train_epochs=2, save_strategy="epoch",
                       eval_strategy="steps", eval_steps=4, logging_steps=2)
    trainer.train()
    expected = ["on_init_end", "on_train_begin"]
    for epoch in range(2):
        expected.append("on_epoch_begin")
        for step in range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1):
            expected += ["on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end"]
            if step % 2 == 0:
                expected.append("on_log")
            if step % 4 == 0:
                expected += ["on_log", "on_evaluate"]  # the evaluation's metrics are logged too, as in HF
        expected += ["on_epoch_end", "on_save"]
    expected.append("on_train_end")
    assert [name for name, _, _ in recorder.events] == expected
    assert set(CALLBACK_EVENTS) == set(expected), "every event the base class defines is called"
    for name, _, kwargs in recorder.events[1:]:
        assert {"model", "optimizer", "lr_scheduler", "train_dataloader"} <= set(kwargs), name
        assert kwargs["model"] is trainer.model and kwargs["optimizer"] is trainer.optimizer
    by_name = {}
    for name, step, kwargs in recorder.events:
        by_name.setdefault(name, []).append((step, kwargs))
    assert all(set(kw["logs"]) == {"loss", "learning_rate"} for _, kw in by_name["on_step_end"])
    assert [s for s, _ in by_name["on_evaluate"]] == [4, 8, 12, 16]
    assert all(set(kw["metrics"]) == {"eval_loss", "eval_tokens"} for _, kw in by_name["on_evaluate"])
    assert [os.path.basename(kw["checkpoint_path"]) for _, kw in by_name["on_save"]] == ["checkpoint-8", "checkpoint-16"]
    assert [s for s, _ in by_name["on_epoch_end"]] == [8, 16] and trainer.state.epoch == 2
    logged = [kw["logs"] for _, kw in by_name["on_log"]]
    assert logged == trainer.state.log_history and all({"step", "epoch"} <= set(e) for e in logged)


class Requests(TrainerCallback):
    """Asks for a save, an evaluation and a log off schedule, and ends the first epoch early."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            control.should_save = True
        if state.global_step == 5:
            control.should_evaluate = control.should_log = True
        if state.global_step == 6:
            control.should_epoch_stop = True


def test_control_requests_save_evaluate_log_and_end_the_epoch(tmp_path):
    only_on_log = type("OnlyOnLog", (), {"on_log": lambda self, args, state, control, logs, **kw: seen.append(logs)})
    seen: list = []
    trainer = _trainer(tmp_path / "run", [Requests()], num_train_epochs=2, save_steps=100, logging_steps=100)
    trainer.add_callback(only_on_log())  # any object with HF-style event methods
    detector = DivergenceDetector()
    trainer.add_callback(detector)
    with pytest.raises(ValueError, match="distinct names"):
        trainer.add_callback(DivergenceDetector())
    trainer.callbacks.remove(detector)
    out = trainer.train()
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-14", "checkpoint-3"], "off-schedule save, then the final"
    assert [e["step"] for e in trainer.state.log_history] == [5, 5]  # the requested log and the evaluation
    assert "eval_loss" in trainer.state.log_history[1] and seen == trainer.state.log_history
    assert out.global_step == 6 + STEPS_PER_EPOCH and trainer.state.epoch == 2, "epoch 1 ended after 6 steps"


class StopNow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            control.should_training_stop = True  # HF's flag, without a reason


def test_should_training_stop_ends_the_run_without_saving_that_step(tmp_path):
    out = _trainer(tmp_path / "run", [StopNow()], max_steps=10, save_steps=4).train()
    assert out.global_step == 4 and out.stop_reason == "stopped by a callback"
    assert out.last_checkpoint is None and not (tmp_path / "run").exists()
    assert out.training_loss == pytest.approx(sum(out.step_losses) / 4)


def test_train_takes_resume_from_checkpoint_like_hf(tmp_path):
    reference = _trainer(tmp_path / "reference", max_steps=12, save_steps=4).train()
    _trainer(tmp_path / "run", max_steps=8, save_steps=4).train()

    latest = _trainer(tmp_path / "run", max_steps=12, save_steps=4)
    out = latest.train(resume_from_checkpoint=True)
    assert os.path.basename(out.resumed_from) == "checkpoint-8" and out.step_losses == reference.step_losses[8:]

    from_path = _trainer(tmp_path / "elsewhere", max_steps=12, save_steps=4)
    out = from_path.train(resume_from_checkpoint=tmp_path / "run" / "checkpoint-4")
    assert out.resumed_from.endswith("checkpoint-4") and out.step_losses == reference.step_losses[4:]
    assert all(torch.equal(a, b) for a, b in zip(_params(from_path.model).values(), _params(latest.model).values(),
                                                 strict=True))

    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint in output_dir .*empty"):
        _trainer(tmp_path / "empty", max_steps=4).train(resume_from_checkpoint=True)
    # the argument overrides TrainingArguments.resume_from_checkpoint: False starts fresh, which an
    # output_dir holding checkpoints refuses
    with pytest.raises(ValueError, match="already holds"):
        _trainer(tmp_path / "run", max_steps=16, resume_from_checkpoint=True).train(resume_from_checkpoint=False)
    with pytest.raises(TypeError, match="resume_from_checkpoint"):
        _trainer(tmp_path / "other", max_steps=4).train(resume_from_checkpoint=3)


def test_a_trainer_is_a_context_manager_that_closes_itself(tmp_path):
    with _trainer(tmp_path / "run", max_steps=4, save_steps=2, async_save=True) as trainer:
        out = trainer.train()
    assert os.path.basename(out.last_checkpoint) == "checkpoint-4"
    with pytest.raises(ValueError, match="closed"):
        trainer.manager.coordinator.load_checkpoint()
    with pytest.raises(RuntimeError, match="boom"), _trainer(tmp_path / "failed", max_steps=2) as failing:
        failing.setup()
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="closed"):
        failing.manager.coordinator.load_checkpoint()


class Snapshots(TrainerCallback):
    """The model's parameters at every save, by checkpoint path; spoils training after ``spoil_at``."""

    def __init__(self, spoil_at: int) -> None:
        self.spoil_at, self.saved = spoil_at, {}

    def on_save(self, args, state, control, model, checkpoint_path, **kwargs):
        self.saved[checkpoint_path] = _params(model)

    def on_step_end(self, args, state, control, optimizer, **kwargs):
        if state.global_step == self.spoil_at:
            for group in optimizer.param_groups:
                group["lr"] *= 300  # later evaluations get worse, so the best checkpoint is an early one


@pytest.mark.parametrize("eval_strategy", ["steps", "epoch"])
def test_load_best_model_at_end_loads_the_best_evaluated_checkpoint(tmp_path, eval_strategy):
    snapshots = Snapshots(spoil_at=9)
    schedule = (dict(max_steps=24, eval_steps=4, save_steps=4) if eval_strategy == "steps"
                else dict(num_train_epochs=3))
    trainer = _trainer(tmp_path / "run", [snapshots], eval_strategy=eval_strategy, save_strategy=eval_strategy,
                       metric_for_best_model="loss", load_best_model_at_end=True, save_total_limit=1, **schedule)
    assert trainer.args.metric_for_best_model == "eval_loss", "HF prefixes the metric with eval_"
    out = trainer.train()
    evaluated = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    steps = [4, 8, 12, 16, 20, 24] if eval_strategy == "steps" else [8, 16, 24]
    assert sorted(evaluated) == steps, "evaluated on schedule"
    best_step = min(evaluated, key=evaluated.get)
    assert best_step < 24 and os.path.basename(out.best_checkpoint) == f"checkpoint-{best_step}"
    assert trainer.state.best_model_checkpoint == out.best_checkpoint
    extra = read_manifest(out.best_checkpoint).extra
    assert extra["metric_name"] == "eval_loss" and extra["metric"] == evaluated[best_step]
    assert sorted(os.listdir(tmp_path / "run")) == sorted({f"checkpoint-{best_step}", "checkpoint-24"})
    best = snapshots.saved[out.best_checkpoint]
    assert all(torch.equal(v, best[k]) for k, v in _params(trainer.model).items()), "the model is the best one"
    assert not all(torch.equal(v, snapshots.saved[out.last_checkpoint][k]) for k, v in _params(trainer.model).items())
