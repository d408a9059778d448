"""TrainingArguments validate themselves when built; trainers refuse what they cannot run."""

from __future__ import annotations

import dataclasses

import pytest

from dcp_forge.trainers import (
    DDPTrainer,
    DDPTrainingArguments,
    DPOStrategy,
    DPTPTrainer,
    PipelineTrainer,
    PipelineTrainingArguments,
    PPOStrategy,
    Trainer,
    TrainingArguments,
)
from dcp_forge.trainers.data import MarkovTokenDataset
from dcp_forge.trainers.tiny_lm import TinyCritic, TinyLM, TinyLMConfig

CONFIG = TinyLMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)


@pytest.mark.parametrize("field, value", [
    ("output_dir", ""), ("output_dir", 3),
    ("max_steps", 0), ("max_steps", 2.5), ("num_train_epochs", 0), ("per_device_batch_size", -1),
    ("learning_rate", 0.0), ("learning_rate", float("nan")), ("learning_rate", True),
    ("seed", -1), ("warmup_steps", -2), ("preserve_n_best", -1), ("dataloader_num_workers", 1.0),
    ("save_strategy", "sometimes"), ("save_steps", 0), ("save_total_limit", 0), ("eval_steps", 0),
    ("logging_steps", 0), ("lr_scheduler_type", "exponential"),
    ("resume_from_checkpoint", 5), ("resume_from_checkpoint", ""),
    ("save_optimizer_state", "yes"), ("save_scheduler_state", 1), ("save_dataset_state", None),
    ("save_rng_state", 0), ("async_save", "no"), ("validate_replication", None), ("greater_is_better", 1),
    ("storage_options", ["key"]), ("metric_for_best_model", "accuracy"),
])
def test_invalid_fields_raise_value_errors_naming_them(field, value):
    with pytest.raises(ValueError, match=f"TrainingArguments.{field}"):
        TrainingArguments(**{field: value})


@pytest.mark.parametrize("kwargs, field", [
    (dict(save_strategy="no", save_total_limit=2), "save_total_limit"),
    (dict(save_strategy="no", preserve_n_best=1), "preserve_n_best"),
    (dict(save_strategy="no", async_save=True), "async_save"),
    (dict(preserve_n_best=1, metric_for_best_model="eval_loss"), "eval_steps"),
    (dict(max_steps=10, warmup_steps=10, lr_scheduler_type="linear"), "warmup_steps"),
])
def test_invalid_combinations_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TrainingArguments.{field}"):
        TrainingArguments(**kwargs)


def test_subclass_arguments_validate_their_fields():
    with pytest.raises(ValueError, match="dispatch_batches"):
        DDPTrainingArguments(dispatch_batches="yes")
    with pytest.raises(ValueError, match="n_microbatches"):
        PipelineTrainingArguments(per_device_batch_size=6, n_microbatches=4)
    with pytest.raises(ValueError, match="pipeline_schedule"):
        PipelineTrainingArguments(pipeline_schedule="zero-bubble")
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        PipelineTrainingArguments(pipeline_parallel_size=0)


def test_arguments_are_frozen_and_normalised(tmp_path):
    args = TrainingArguments(output_dir=tmp_path, resume_from_checkpoint=tmp_path / "checkpoint-5")
    assert args.output_dir == str(tmp_path) and args.resume_target == str(tmp_path / "checkpoint-5")
    assert TrainingArguments().resume_target is False and TrainingArguments(resume_from_checkpoint=True).resume_target
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.max_steps = 3


def test_training_hash_ignores_where_and_whether_to_resume_and_never_sees_credentials():
    base = TrainingArguments(learning_rate=1e-3)
    moved = TrainingArguments(learning_rate=1e-3, output_dir="s3://bucket/run", resume_from_checkpoint=True,
                              storage_options={"key": "AKIA-secret", "secret": "hunter2"})
    assert base.training_hash() == moved.training_hash()
    assert base.training_hash() != TrainingArguments(learning_rate=2e-3).training_hash()
    assert base.training_hash() != DDPTrainingArguments(learning_rate=1e-3).training_hash()
    assert "storage_options" not in moved.to_dict() and "hunter2" not in repr(moved.to_dict())


def _dataset():
    return MarkovTokenDataset(CONFIG.vocab_size, 16, 32)


def test_trainers_refuse_what_they_cannot_run():
    model = TinyLM(CONFIG)
    with pytest.raises(TypeError, match="DDPTrainingArguments"):
        DDPTrainer(model, TrainingArguments(), _dataset())
    with pytest.raises(ValueError, match="eval_dataset"):
        Trainer(model, TrainingArguments(eval_steps=5), _dataset())
    with pytest.raises(ValueError, match="TokenLossStrategy"):
        PipelineTrainer(model, PipelineTrainingArguments(), _dataset(), strategy=DPOStrategy(TinyLM(CONFIG)))
    critic = PPOStrategy(vf_coef=0.5, critic=TinyCritic(CONFIG))
    with pytest.raises(ValueError, match="critic"):
        DPTPTrainer(model, TrainingArguments(), _dataset(), tensor_parallel_size=2, strategy=critic)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        DPTPTrainer(model, TrainingArguments(), _dataset())
    with pytest.raises(RuntimeError, match="process group"):
        DDPTrainer(model, DDPTrainingArguments(), _dataset()).setup()
    with pytest.raises(RuntimeError, match="setup"):
        Trainer(model, TrainingArguments(), _dataset()).get_state_components()


def test_a_dataset_without_one_full_batch_is_refused(tmp_path):
    tiny = MarkovTokenDataset(CONFIG.vocab_size, 16, 3)
    with pytest.raises(ValueError, match="no full batch"):
        Trainer(TinyLM(CONFIG), TrainingArguments(output_dir=str(tmp_path), per_device_batch_size=4), tiny).setup()
