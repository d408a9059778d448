"""TrainingArguments validate themselves when built, with HF's names and defaults; trainers refuse
what they cannot run, and trainer-specific fields set for a trainer that does not read them."""

from __future__ import annotations

import dataclasses

import pytest

from dcp_forge.trainers import (
    AccelTrainer,
    BaseTrainer,
    DDPTrainer,
    DPOStrategy,
    DPPPTrainer,
    DPTPTrainer,
    FSDPTrainer,
    PipelineTrainer,
    PPOStrategy,
    Trainer,
    TrainingArguments,
)
from dcp_forge.trainers.args import TRAINER_FIELDS
from dcp_forge.trainers.data import MarkovTokenDataset
from dcp_forge.trainers.tiny_lm import TinyCritic, TinyLM, TinyLMConfig
from tests.support.paths import REPO

CONFIG = TinyLMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)


@pytest.mark.parametrize("field, value", [
    ("output_dir", ""), ("output_dir", 3),
    ("max_steps", 0), ("max_steps", 2.5), ("num_train_epochs", 0), ("per_device_train_batch_size", -1),
    ("per_device_eval_batch_size", 0), ("eval_strategy", "sometimes"), ("eval_strategy", None),
    ("load_best_model_at_end", "yes"), ("dispatch_batches", "yes"), ("n_microbatches", 0),
    ("pipeline_schedule", "zero-bubble"), ("pipeline_parallel_size", 0),
    ("learning_rate", 0.0), ("learning_rate", float("nan")), ("learning_rate", True),
    ("seed", -1), ("warmup_steps", -2), ("preserve_n_best", -1), ("dataloader_num_workers", 1.0),
    ("save_strategy", "sometimes"), ("save_steps", 0), ("save_total_limit", 0), ("eval_steps", 0),
    ("logging_steps", 0), ("lr_scheduler_type", "exponential"),
    ("resume_from_checkpoint", 5), ("resume_from_checkpoint", ""),
    ("save_optimizer_state", "yes"), ("save_scheduler_state", 1), ("save_dataset_state", None),
    ("save_rng_state", 0), ("async_save", "no"), ("validate_replication", None), ("greater_is_better", 1),
    ("storage_options", ["key"]), ("metric_for_best_model", ""), ("metric_for_best_model", 3),
])
def test_invalid_fields_raise_value_errors_naming_them(field, value):
    with pytest.raises(ValueError, match=f"TrainingArguments.{field}"):
        TrainingArguments(**{field: value})


@pytest.mark.parametrize("kwargs, field", [
    (dict(save_strategy="no", save_total_limit=2), "save_total_limit"),
    (dict(save_strategy="no", preserve_n_best=1), "preserve_n_best"),
    (dict(save_strategy="no", async_save=True), "async_save"),
    (dict(save_strategy="no", load_best_model_at_end=True), "load_best_model_at_end"),
    (dict(preserve_n_best=1, metric_for_best_model="eval_loss"), "eval_strategy"),
    (dict(load_best_model_at_end=True, metric_for_best_model="accuracy"), "eval_strategy"),
    (dict(eval_steps=5), "eval_steps"),  # HF would ignore it silently: eval_strategy is "no"
    (dict(eval_strategy="epoch", eval_steps=5), "eval_steps"),
    (dict(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="steps"), "load_best_model_at_end"),
    (dict(load_best_model_at_end=True, eval_strategy="steps", eval_steps=4, save_steps=6), "load_best_model_at_end"),
    (dict(max_steps=10, warmup_steps=10, lr_scheduler_type="linear"), "warmup_steps"),
])
def test_invalid_combinations_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TrainingArguments.{field}"):
        TrainingArguments(**kwargs)


def test_hugging_face_names_and_defaults():
    args = TrainingArguments(eval_strategy="steps", logging_steps=7, max_steps=-1)
    assert args.eval_steps == 7, "eval_steps defaults to logging_steps, as in HF"
    assert args.max_steps is None, "max_steps=-1 is HF's 'not set'"
    assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False
    assert TrainingArguments().metric_for_best_model == "train_loss", "no evaluation: ranked by training loss"
    accuracy = TrainingArguments(eval_strategy="epoch", metric_for_best_model="accuracy")
    assert accuracy.metric_for_best_model == "eval_accuracy" and accuracy.greater_is_better is True
    assert TrainingArguments(eval_strategy="epoch", metric_for_best_model="eval_loss",
                             greater_is_better=True).greater_is_better is True
    best = TrainingArguments(load_best_model_at_end=True, eval_strategy="steps", eval_steps=5, save_steps=10)
    assert best.checkpoint_policy().preserve_n_best == 1, "the best checkpoint is never deleted"
    with pytest.raises(TypeError, match="per_device_batch_size"):
        TrainingArguments(per_device_batch_size=4)  # the old name is HF's per_device_train_batch_size


def test_deprecated_argument_classes_are_the_one_class():
    import dcp_forge.trainers as trainers

    with pytest.warns(DeprecationWarning, match="DDPTrainingArguments is deprecated"):
        alias = trainers.DDPTrainingArguments
    assert alias is TrainingArguments
    with pytest.warns(DeprecationWarning, match="PipelineTrainingArguments"):
        from dcp_forge.trainers.args import PipelineTrainingArguments
    assert PipelineTrainingArguments is TrainingArguments


TRAINERS = {Trainer: {}, DDPTrainer: {}, FSDPTrainer: {}, AccelTrainer: {}, PipelineTrainer: {},
            DPPPTrainer: {"mesh": object()}, DPTPTrainer: {"tensor_parallel_size": 2}}
FIELD_VALUES = {"dispatch_batches": False, "n_microbatches": 2, "pipeline_schedule": "GPipe",
                "pipeline_parallel_size": 2}


@pytest.mark.parametrize("trainer_class", list(TRAINERS), ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(TRAINER_FIELDS))
def test_a_trainer_specific_field_is_read_or_refused(trainer_class, name):
    args = TrainingArguments(**{name: FIELD_VALUES[name]})
    if name in trainer_class.trainer_fields:
        trainer_class(TinyLM(CONFIG), args, _dataset(), **TRAINERS[trainer_class])
        assert args.trainer_field(name) == FIELD_VALUES[name]
    else:
        with pytest.raises(ValueError, match=f"TrainingArguments.{name}=.* is set, but {trainer_class.__name__} "
                                             "does not use it"):
            trainer_class(TinyLM(CONFIG), args, _dataset(), **TRAINERS[trainer_class])


def test_every_trainer_specific_field_has_a_reader_and_a_default():
    readers = {name for cls in (BaseTrainer, *TRAINERS) for name in cls.trainer_fields}
    assert readers == set(TRAINER_FIELDS)
    assert TrainingArguments().trainer_field("n_microbatches") == 2
    assert TrainingArguments().trainer_field("dispatch_batches") is True
    with pytest.raises(TypeError, match="not trainer-specific"):
        type("Odd", (Trainer,), {"trainer_fields": frozenset({"learning_rate"})})


def test_pipeline_trainers_check_their_fields_against_the_batch_sizes():
    with pytest.raises(ValueError, match="n_microbatches=4 must divide per_device_train_batch_size=6"):
        PipelineTrainer(TinyLM(CONFIG), TrainingArguments(per_device_train_batch_size=6, n_microbatches=4), _dataset())
    with pytest.raises(ValueError, match="n_microbatches=4 must divide per_device_eval_batch_size=6"):
        PipelineTrainer(TinyLM(CONFIG), TrainingArguments(per_device_eval_batch_size=6, n_microbatches=4), _dataset())
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        DPPPTrainer(TinyLM(CONFIG), TrainingArguments(), _dataset())


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
    assert base.training_hash() != TrainingArguments(learning_rate=1e-3, dispatch_batches=True).training_hash()
    assert "storage_options" not in moved.to_dict() and "hunter2" not in repr(moved.to_dict())


def _dataset():
    return MarkovTokenDataset(CONFIG.vocab_size, 16, 32)


def test_trainers_refuse_what_they_cannot_run():
    model = TinyLM(CONFIG)
    with pytest.raises(TypeError, match="needs args of type TrainingArguments"):
        DDPTrainer(model, {"max_steps": 3}, _dataset())
    with pytest.raises(ValueError, match="eval_dataset"):
        Trainer(model, TrainingArguments(eval_strategy="steps", eval_steps=5), _dataset())
    with pytest.raises(ValueError, match="TokenLossStrategy"):
        PipelineTrainer(model, TrainingArguments(), _dataset(), strategy=DPOStrategy(TinyLM(CONFIG)))
    critic = PPOStrategy(vf_coef=0.5, critic=TinyCritic(CONFIG))
    with pytest.raises(ValueError, match="critic"):
        DPTPTrainer(model, TrainingArguments(), _dataset(), tensor_parallel_size=2, strategy=critic)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        DPTPTrainer(model, TrainingArguments(), _dataset())
    with pytest.raises(RuntimeError, match="process group"):
        DDPTrainer(model, TrainingArguments(), _dataset()).setup()
    with pytest.raises(RuntimeError, match="setup"):
        Trainer(model, TrainingArguments(), _dataset()).get_state_components()


def test_a_dataset_without_one_full_batch_is_refused(tmp_path):
    tiny = MarkovTokenDataset(CONFIG.vocab_size, 16, 3)
    with pytest.raises(ValueError, match="no full batch"):
        Trainer(TinyLM(CONFIG), TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4), tiny).setup()


def test_the_readme_trainer_example_builds_valid_arguments():
    import ast
    import re

    readme = (REPO / "README.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "TrainingArguments(" in b]
    [call] = [node.value for node in ast.parse(block).body
              if isinstance(node, ast.Assign) and getattr(node.value.func, "id", None) == "TrainingArguments"]
    args = eval(compile(ast.Expression(call), "README.md", "eval"), {"TrainingArguments": TrainingArguments})
    assert "dispatch_batches" in DDPTrainer.trainer_fields and args.dispatch_batches is True
