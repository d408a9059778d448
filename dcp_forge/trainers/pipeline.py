"""Pipeline-parallel trainers on ``torch.distributed.pipelining``: PipelineTrainer (every rank one
stage) and DPPPTrainer (data-parallel replicas of a pipeline, on a 2-D DeviceMesh).

The model is cut into stages by ``model_splitter(model, n_stages)`` (default
``tiny_lm.split_into_stages``); each rank keeps its stage. Batches are loaded by the first stage of
each pipeline and broadcast to the others by a ``DataloaderDispatcher`` (the last stage needs the
labels). Losses come from the strategy's ``loss_from_logits`` per microbatch, so the strategy must be
a ``TokenLossStrategy`` (pretraining or SFT).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ..core.patterns import SharingPattern, ValidationLevel
from .args import TrainingArguments
from .base import BaseTrainer, ComponentSharing, OptimizerFactory
from .callbacks import TrainerCallback
from .data import make_dataloader
from .data_parallel import all_reduce_mean, average_gradients, model_parallel_mesh, require_process_group
from .dispatch import DataloaderDispatcher
from .strategies import TokenLossStrategy, TrainingStrategy
from .tiny_lm import split_into_stages

__all__ = ["DPPPTrainer", "PipelineTrainer"]

# ``split(model, n_stages)``: the stages of the model the trainer was given. The model is typed Any: the
# default (tiny_lm's) needs a TinyLM, a user's function its own model class.
ModelSplitter = Callable[[Any, int], Sequence[nn.Module]]


class PipelineTrainer(BaseTrainer):
    """Every rank holds one pipeline stage (no data parallelism).

    Model and optimizer PER_RANK (each rank its own stage), scheduler, trainer progress and callbacks
    REPLICATED, dataset GLOBAL (the first stage loads, all stages receive), RNG PER_RANK.

    Reads ``TrainingArguments.n_microbatches`` (default 2; must divide both per-device batch sizes)
    and ``pipeline_schedule`` ("1F1B", the default, or "GPipe").
    """

    trainer_fields = frozenset({"n_microbatches", "pipeline_schedule"})
    strategy: TokenLossStrategy  # _check_strategy refuses any other when the trainer is built

    def __init__(self, model: nn.Module, args: TrainingArguments, train_dataset: Dataset, *,
                 model_splitter: ModelSplitter = split_into_stages, eval_dataset: Dataset | None = None, strategy: TrainingStrategy | None = None,
                 optimizer_factory: OptimizerFactory | None = None,
                 callbacks: Sequence[TrainerCallback] = ()) -> None:
        super().__init__(model, args, train_dataset, eval_dataset=eval_dataset, strategy=strategy,
                         optimizer_factory=optimizer_factory, callbacks=callbacks)
        self.n_microbatches: int = args.trainer_field("n_microbatches")
        self.pipeline_schedule: str = args.trainer_field("pipeline_schedule")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(args, name) % self.n_microbatches:
                raise ValueError(f"TrainingArguments.n_microbatches={self.n_microbatches} must divide "
                                 f"{name}={getattr(args, name)} ({type(self).__name__} splits every batch)")
        self.model_splitter = model_splitter
        self.pipeline_group: Any = None  # the ranks of this rank's pipeline, in stage order
        self.stage_index, self.num_stages = 0, 1
        self._dp_rank, self._dp_size = 0, 1

    def _check_strategy(self) -> None:
        if not isinstance(self.strategy, TokenLossStrategy):
            raise ValueError(f"{type(self).__name__} needs a TokenLossStrategy (pretraining or SFT): the pipeline "
                             f"computes the loss per microbatch from logits (got {type(self.strategy).__name__})")
        if self.aux_modules:
            raise ValueError(f"{type(self).__name__} cannot run strategy modules {sorted(self.aux_modules)}")

    @property
    def dp_rank(self) -> int:
        return self._dp_rank

    @property
    def dp_size(self) -> int:
        return self._dp_size

    @property
    def is_first_stage(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def _layout(self) -> None:
        """Set the pipeline group, this rank's stage and its data-parallel coordinate."""
        self.pipeline_group = dist.group.WORLD
        self.stage_index, self.num_stages = dist.get_rank(), dist.get_world_size()

    def _setup_parallelism(self) -> None:
        require_process_group(type(self).__name__)
        from torch.distributed import pipelining

        self._layout()
        if self.pipeline_schedule == "1F1B" and self.n_microbatches < self.num_stages:
            raise ValueError(f"TrainingArguments.n_microbatches={self.n_microbatches} must be at least the "
                             f"number of pipeline stages ({self.num_stages}) for the 1F1B schedule")
        stages = self.model_splitter(self.model, self.num_stages)
        if len(stages) != self.num_stages:
            raise ValueError(f"model_splitter returned {len(stages)} stages for {self.num_stages} pipeline ranks")
        self.model = self.train_model = stages[self.stage_index]
        device = next(self.model.parameters()).device
        stage = pipelining.PipelineStage(self.model, self.stage_index, self.num_stages, device,
                                         group=self.pipeline_group)
        schedule_class = {"1F1B": pipelining.Schedule1F1B, "GPipe": pipelining.ScheduleGPipe}[self.pipeline_schedule]
        self.schedule = schedule_class(stage, n_microbatches=self.n_microbatches,
                                       loss_fn=self.strategy.loss_from_logits)

    def _build_loader(self, shard_index: int, num_shards: int) -> StatefulDataLoader:
        return make_dataloader(self.train_dataset, self.args.per_device_train_batch_size, shuffle=True,
                               seed=self.args.seed, num_workers=self.args.dataloader_num_workers,
                               num_shards=num_shards, shard_index=shard_index)

    def _build_train_dataloader(self) -> Any:
        loader = self._build_loader(0, 1) if self.is_first_stage else None
        return DataloaderDispatcher(loader, group=self.pipeline_group, src=0)

    def _run_schedule(self, batch: Mapping[str, Any], evaluate: bool) -> torch.Tensor:
        batch = self.strategy.prepare_batch(batch)
        losses: list[torch.Tensor] = []
        args = (batch["input_ids"],) if self.is_first_stage else ()
        run = self.schedule.eval if evaluate else self.schedule.step
        if self.is_last_stage:
            run(*args, target=batch["labels"], losses=losses)
        else:
            run(*args)
        # Equal microbatches: the mean of their losses is the batch's loss (exactly so for unpadded
        # pretraining; SFT microbatches weigh their own response tokens).
        return torch.stack(losses).mean().detach() if self.is_last_stage else torch.zeros(())

    def _forward_backward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self._run_schedule(batch, evaluate=False)

    def _from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        """The last stage's value on every stage of this pipeline, averaged over the replicas."""
        value = value.detach().clone().to(torch.float64)
        if self.num_stages > 1:
            dist.broadcast(value, group=self.pipeline_group, group_src=self.num_stages - 1)
        return all_reduce_mean(value, self._replica_group(), self.dp_size)

    def _replica_group(self) -> Any:
        """The ranks holding the same stage in other replicas (None: the world, unused at size 1)."""
        return None

    def _global_mean(self, value: torch.Tensor) -> float:
        return float(self._from_last_stage(value))

    def _global_mean_vector(self, values: torch.Tensor) -> torch.Tensor:
        return self._from_last_stage(values)

    def _eval_batches(self, dataset: Dataset) -> Iterable[Mapping[str, Any]]:
        # Every stage builds the same (stateless) loader, so evaluation needs no dispatching; whole
        # batches only, since each must split into n_microbatches.
        return make_dataloader(dataset, self.args.per_device_eval_batch_size, shuffle=False,
                               drop_last=True, num_shards=self.dp_size, shard_index=self.dp_rank)

    def _evaluate_batch(self, batch: Mapping[str, Any]) -> dict[str, float]:
        return {"loss": float(self._run_schedule(batch, evaluate=True))}

    def sharing(self) -> dict[str, ComponentSharing]:
        r = ComponentSharing(SharingPattern.REPLICATED, validation=ValidationLevel.QUICK)
        return {"model": ComponentSharing(SharingPattern.PER_RANK), "optimizer": ComponentSharing(SharingPattern.PER_RANK),
                "scheduler": ComponentSharing(SharingPattern.REPLICATED), "dataset": ComponentSharing(SharingPattern.GLOBAL),
                "trainer": r, "callbacks": r, "rng": ComponentSharing(SharingPattern.PER_RANK)}

    def get_process_groups(self) -> dict[str, Any]:
        return {"pp_group": self.pipeline_group}


class DPPPTrainer(PipelineTrainer):
    """Data-parallel replicas of a pipeline on a ("dp", "pp") DeviceMesh: ``pipeline_parallel_size``
    stages per replica, world size / that many replicas; stage gradients are averaged across replicas.

    Checkpoint groups follow docs/FORMAT.md: ``pp_group`` is the ranks holding the *same* stage (one
    per stage, across replicas) and ``dp_group`` the ranks of one replica's pipeline (one per replica,
    sharing its data stream). Model and optimizer PER_GROUP over pp_group (stored once per stage,
    checked per tensor / by hash to be equal across replicas), dataset PER_GROUP over dp_group (one
    loader per replica, on its first stage), scheduler, trainer and callbacks REPLICATED, RNG PER_RANK.
    """

    trainer_fields = PipelineTrainer.trainer_fields | {"pipeline_parallel_size"}

    def __init__(self, model: nn.Module, args: TrainingArguments, train_dataset: Dataset, *,
                 mesh: Any = None, model_splitter: ModelSplitter = split_into_stages,
                 eval_dataset: Dataset | None = None, strategy: TrainingStrategy | None = None,
                 optimizer_factory: OptimizerFactory | None = None,
                 callbacks: Sequence[TrainerCallback] = ()) -> None:
        if isinstance(args, TrainingArguments) and args.pipeline_parallel_size is None and mesh is None:
            raise ValueError("DPPPTrainer needs TrainingArguments.pipeline_parallel_size (or a ('dp', 'pp') mesh)")
        super().__init__(model, args, train_dataset, model_splitter=model_splitter, eval_dataset=eval_dataset,
                         strategy=strategy, optimizer_factory=optimizer_factory, callbacks=callbacks)
        self.mesh = mesh

    def _layout(self) -> None:
        self.mesh = model_parallel_mesh(self.mesh, self.args.pipeline_parallel_size, ("dp", "pp"), owner="DPPPTrainer",
                                        size_name="TrainingArguments.pipeline_parallel_size")
        self.pipeline_group = self.mesh.get_group("pp")
        self.stage_index, self.num_stages = self.mesh["pp"].get_local_rank(), self.mesh["pp"].size()
        self._dp_rank, self._dp_size = self.mesh["dp"].get_local_rank(), self.mesh["dp"].size()

    def _build_train_dataloader(self) -> Any:
        return DataloaderDispatcher.from_device_mesh(self.mesh, self._build_loader, dp_dim="dp")

    def _replica_group(self) -> Any:
        return self.mesh.get_group("dp")

    def _synchronize_gradients(self) -> None:
        average_gradients(list(self.model.parameters()), self._replica_group(), self.dp_size)

    def sharing(self) -> dict[str, ComponentSharing]:
        out = super().sharing()
        out.update(model=ComponentSharing(SharingPattern.PER_GROUP, "pp_group", ValidationLevel.TENSOR),
                   optimizer=ComponentSharing(SharingPattern.PER_GROUP, "pp_group", ValidationLevel.QUICK),
                   dataset=ComponentSharing(SharingPattern.PER_GROUP, "dp_group"))
        return out

    def get_process_groups(self) -> dict[str, Any]:
        return {"pp_group": self.mesh.get_group("dp"), "dp_group": self.mesh.get_group("pp")}
