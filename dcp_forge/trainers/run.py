"""The tiny-LM training job: one definition for ``dcp-forge demo``, the tests, the resume benchmark
and torchrun.

Under torchrun (env:// rendezvous; the job runs on CPU with gloo, also on machines with GPUs)::

    torchrun --nproc-per-node 2 -m dcp_forge.trainers.run --trainer ddp --output-dir ./checkpoints \\
        --max-steps 200 --save-steps 50
    # after an interruption: the same command with --resume continues from the latest checkpoint

Without torchrun it runs on one process (``--trainer single``). Rank 0 prints the loss every
``--log-every`` steps and what the last checkpoint holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..async_save import STAGING_MODES, UPLOAD_MODES, AsyncOptions
from .args import TrainingArguments
from .base import BaseTrainer, Trainer
from .callbacks import TrainerCallback
from .data import MarkovTokenDataset
from .data_parallel import AccelTrainer, DDPTrainer, FSDPTrainer
from .pipeline import DPPPTrainer, PipelineTrainer
from .state import TrainerControl, TrainerState, TrainOutput
from .tensor_parallel import DPTPTrainer
from .tiny_lm import TinyLM, TinyLMConfig

__all__ = ["TRAINER_KINDS", "InterruptAt", "JobResult", "TinyJob", "build_trainer", "init_distributed", "main",
           "run_job"]

# trainer kind -> (class, its trainer-specific TrainingArguments fields)
TRAINER_KINDS: Mapping[str, tuple[type[BaseTrainer], dict[str, Any]]] = {
    "single": (Trainer, {}),
    "ddp": (DDPTrainer, {"dispatch_batches": True}),
    "ddp-independent": (DDPTrainer, {"dispatch_batches": False}),
    "fsdp": (FSDPTrainer, {"dispatch_batches": False}),
    "accelerate": (AccelTrainer, {}),
    "pipeline": (PipelineTrainer, {}),
    "dp-pp": (DPPPTrainer, {}),
    "dp-tp": (DPTPTrainer, {}),
}


@dataclass(frozen=True)
class TinyJob:
    """One run of the job. ``parallel_size`` is the pipeline (dp-pp) or tensor-parallel (dp-tp)
    size; ``interrupt_at`` stops the run after that step without saving (a simulated failure)."""

    trainer: str = "ddp"
    output_dir: str = "./checkpoints"
    max_steps: int = 60
    save_steps: int = 10
    save_total_limit: int | None = None
    resume: bool = False
    interrupt_at: int | None = None
    per_device_train_batch_size: int = 8
    seq_len: int = 32
    num_samples: int = 256
    seed: int = 0
    learning_rate: float = 3e-3
    dropout: float = 0.1
    n_layers: int = 2
    d_model: int = 32
    parallel_size: int = 2
    n_microbatches: int = 4
    async_save: bool = False
    async_staging: str = "blocking"
    async_upload: str = "thread"
    async_lazy_min_bytes: int = AsyncOptions.lazy_min_bytes
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.trainer not in TRAINER_KINDS:
            raise ValueError(f"TinyJob.trainer must be one of {sorted(TRAINER_KINDS)} (got {self.trainer!r})")

    def model_config(self) -> TinyLMConfig:
        return TinyLMConfig(vocab_size=64, d_model=self.d_model, n_layers=self.n_layers, n_heads=2,
                            max_seq_len=self.seq_len, dropout=self.dropout)

    def training_arguments(self) -> TrainingArguments:
        trainer_class, extra = TRAINER_KINDS[self.trainer]
        if "n_microbatches" in trainer_class.trainer_fields:
            extra = {**extra, "n_microbatches": self.n_microbatches}
        if "pipeline_parallel_size" in trainer_class.trainer_fields:
            extra = {**extra, "pipeline_parallel_size": self.parallel_size}
        return TrainingArguments(
            output_dir=self.output_dir, max_steps=self.max_steps, save_steps=self.save_steps,
            save_total_limit=self.save_total_limit, resume_from_checkpoint=self.resume,
            per_device_train_batch_size=self.per_device_train_batch_size, seed=self.seed,
            learning_rate=self.learning_rate, logging_steps=10, async_save=self.async_save,
            async_staging=self.async_staging, async_upload=self.async_upload,
            async_lazy_min_bytes=self.async_lazy_min_bytes, storage_options=dict(self.storage_options), **extra)


class InterruptAt(TrainerCallback):
    """Stops the run after ``step`` without saving, like a crash right after that step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.stop(f"interrupted after step {self.step}")


def build_trainer(job: TinyJob, callbacks: Sequence[TrainerCallback] = ()) -> BaseTrainer:
    trainer_class, _ = TRAINER_KINDS[job.trainer]
    callbacks = list(callbacks) + ([InterruptAt(job.interrupt_at)] if job.interrupt_at is not None else [])
    kwargs: dict[str, Any] = {"callbacks": callbacks}
    if trainer_class is DPTPTrainer:
        kwargs["tensor_parallel_size"] = job.parallel_size
    config = job.model_config()
    dataset = MarkovTokenDataset(config.vocab_size, job.seq_len, job.num_samples, seed=job.seed)
    return trainer_class(TinyLM(config, seed=job.seed), job.training_arguments(), dataset, **kwargs)


@dataclass(frozen=True)
class JobResult:
    """This rank's view of a finished run: its output and its local model tensors (DTensor shards as
    their local parts)."""

    rank: int
    output: TrainOutput
    params: dict[str, torch.Tensor]


def local_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in module.state_dict().items():
        value = value.to_local() if hasattr(value, "to_local") else value
        out[name] = value.detach().clone().cpu()
    return out


def run_job(job: TinyJob, callbacks: Sequence[TrainerCallback] = ()) -> JobResult:
    """Build the trainer and train. Collective when a process group is initialised."""
    with build_trainer(job, callbacks) as trainer:
        output = trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    return JobResult(rank, output, local_tensors(trainer.model))


def init_distributed() -> bool:
    """Join torchrun's process group (env://, gloo: the job's tensors live on the CPU) when launched
    by it; True when distributed."""
    if dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ:
        return False
    dist.init_process_group("gloo")
    return True


def _storage_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (got {text!r})")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dcp_forge.trainers.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TinyJob()
    p.add_argument("--trainer", choices=sorted(TRAINER_KINDS), default=defaults.trainer)
    p.add_argument("--output-dir", default=defaults.output_dir, help="local path or fsspec URL (s3://...)")
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--save-steps", type=int, default=defaults.save_steps)
    p.add_argument("--save-total-limit", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the latest committed checkpoint")
    p.add_argument("--async-save", action="store_true", help="save in the background while training goes on")
    p.add_argument("--async-staging", choices=STAGING_MODES, default=defaults.async_staging,
                   help="overlapped: copy the large tensors during the next forward/backward (with --async-save)")
    p.add_argument("--async-upload", choices=UPLOAD_MODES, default=defaults.async_upload,
                   help="process: upload in a process of its own (with --async-save)")
    p.add_argument("--interrupt-at", type=int, default=None, help="stop after this step without saving")
    p.add_argument("--batch-size", type=int, default=defaults.per_device_train_batch_size, help="per device")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--parallel-size", type=int, default=defaults.parallel_size,
                   help="pipeline (dp-pp) or tensor-parallel (dp-tp) size")
    p.add_argument("--n-layers", type=int, default=defaults.n_layers,
                   help="transformer blocks (at least the number of pipeline stages)")
    p.add_argument("--storage-option", action="append", type=_storage_option, default=[], metavar="KEY=VALUE",
                   help="fsspec storage option (repeatable), e.g. endpoint_url=http://host:8333")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--results-file", default=None, metavar="PATH",
                   help="torch.save each rank's step losses and model tensors here ('{rank}' is replaced)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    distributed = init_distributed()
    job = TinyJob(trainer=opts.trainer, output_dir=opts.output_dir, max_steps=opts.max_steps,
                  save_steps=opts.save_steps, save_total_limit=opts.save_total_limit, resume=opts.resume,
                  interrupt_at=opts.interrupt_at, per_device_train_batch_size=opts.batch_size, seed=opts.seed,
                  parallel_size=opts.parallel_size, n_layers=opts.n_layers, async_save=opts.async_save,
                  async_staging=opts.async_staging, async_upload=opts.async_upload,
                  storage_options=dict(opts.storage_option))
    try:
        result = run_job(job)
        if opts.results_file:
            torch.save({"step_losses": result.output.step_losses, "params": result.params,
                        "stop_reason": result.output.stop_reason, "resumed_from": result.output.resumed_from},
                       opts.results_file.format(rank=result.rank))
        if result.rank == 0:
            _report(job, result, opts.log_every)
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def _report(job: TinyJob, result: JobResult, every: int) -> None:
    from ..coordinator import read_manifest
    from ..storage import redact_url

    out = result.output
    first = out.global_step - len(out.step_losses)
    if out.resumed_from:
        print(f"resumed from {redact_url(out.resumed_from)} at step {first}")
    for i, loss in enumerate(out.step_losses, start=first + 1):
        if i % every == 0 or i == out.global_step:
            print(f"step {i:>5}  loss {loss:.6f}")
    print(f"stopped at step {out.global_step}: {out.stop_reason}")
    if out.last_checkpoint:
        manifest = read_manifest(out.last_checkpoint, job.storage_options)
        print(f"last checkpoint {redact_url(out.last_checkpoint)} (world size {manifest.world_size}):")
        for key, comp in manifest.components.items():
            print(f"  {key:<10} {comp.sharing_pattern:<11} {len(comp.copies)} cop{'y' if len(comp.copies) == 1 else 'ies'}"
                  f", {comp.size_bytes:>8} bytes, written by ranks {comp.ranks}")
    print(json.dumps({"final_loss": out.step_losses[-1] if out.step_losses else None, **asdict(job)},
                     default=str))


if __name__ == "__main__":
    sys.exit(main())
