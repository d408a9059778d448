"""DPTPTrainer: data-parallel replicas of a tensor-parallel model on a ("dp", "tp") DeviceMesh.

Within a replica, ``parallelize_fn(model, tp_mesh)`` (default ``tiny_lm.apply_tensor_parallel``)
shards the projections over the "tp" dimension; across replicas, gradients are averaged over the
"dp" dimension. One rank per replica loads each batch and broadcasts it to its tensor-parallel
peers (a ``DataloaderDispatcher`` per replica), since they all need the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..core.patterns import SharingPattern, ValidationLevel
from .args import TrainingArguments
from .base import BaseTrainer, ComponentSharing, OptimizerFactory
from .callbacks import TrainerCallback
from .data import make_dataloader
from .data_parallel import (
    ModelParallelizer,
    all_reduce_mean,
    average_gradients,
    model_parallel_mesh,
    require_process_group,
)
from .dispatch import DataloaderDispatcher
from .strategies import TrainingStrategy
from .tiny_lm import apply_tensor_parallel

__all__ = ["DPTPTrainer"]


class DPTPTrainer(BaseTrainer):
    """``tensor_parallel_size`` ranks per replica, world size / that many replicas (or pass ``mesh``).

    Checkpoint groups (docs/FORMAT.md's PER_GROUP definition):
    ``tp_group`` is the ranks holding the *same* tensor-parallel shard (one per shard index, across
    replicas) and ``dp_group`` the ranks of one replica (sharing its data stream). Model and optimizer
    PER_GROUP over tp_group (one copy per shard, its DTensor chunks; checked equal across replicas),
    dataset PER_GROUP over dp_group (one loader per replica), scheduler, trainer and callbacks
    REPLICATED, RNG PER_RANK (tensor-parallel peers are seeded alike, since dropout on their
    replicated activations must agree).
    """

    def __init__(self, model: nn.Module, args: TrainingArguments, train_dataset: Dataset, *,
                 tensor_parallel_size: int | None = None, mesh: Any = None,
                 parallelize_fn: ModelParallelizer = apply_tensor_parallel,
                 eval_dataset: Dataset | None = None, strategy: TrainingStrategy | None = None,
                 optimizer_factory: OptimizerFactory | None = None,
                 callbacks: Sequence[TrainerCallback] = ()) -> None:
        if mesh is None and not (isinstance(tensor_parallel_size, int) and tensor_parallel_size >= 1):
            raise ValueError(f"DPTPTrainer needs tensor_parallel_size (a positive int) or a ('dp', 'tp') mesh "
                             f"(got tensor_parallel_size={tensor_parallel_size!r})")
        super().__init__(model, args, train_dataset, eval_dataset=eval_dataset, strategy=strategy,
                         optimizer_factory=optimizer_factory, callbacks=callbacks)
        self.tensor_parallel_size, self.mesh, self.parallelize_fn = tensor_parallel_size, mesh, parallelize_fn

    def _check_strategy(self) -> None:
        self._refuse_trainable_strategy_modules()

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.mesh["dp"].size()

    def _setup_parallelism(self) -> None:
        require_process_group(type(self).__name__)
        self.mesh = model_parallel_mesh(self.mesh, self.tensor_parallel_size, ("dp", "tp"), owner="DPTPTrainer",
                                        size_name="tensor_parallel_size")
        self.model = self.train_model = self.parallelize_fn(self.model, self.mesh["tp"])

    def _build_train_dataloader(self) -> Any:
        def build(shard_index: int, num_shards: int) -> Any:
            return make_dataloader(self.train_dataset, self.args.per_device_train_batch_size, shuffle=True,
                                   seed=self.args.seed, num_workers=self.args.dataloader_num_workers,
                                   num_shards=num_shards, shard_index=shard_index)

        return DataloaderDispatcher.from_device_mesh(self.mesh, build, dp_dim="dp")

    def _synchronize_gradients(self) -> None:
        average_gradients(list(self.model.parameters()), self.mesh.get_group("dp"), self.dp_size)

    def _global_mean(self, value: torch.Tensor) -> float:
        # Tensor-parallel peers computed the same loss; average over the replicas only.
        return float(all_reduce_mean(value.detach().clone().float(), self.mesh.get_group("dp"), self.dp_size))

    def _global_mean_vector(self, values: torch.Tensor) -> torch.Tensor:
        return all_reduce_mean(values, self.mesh.get_group("dp"), self.dp_size)

    def sharing(self) -> dict[str, ComponentSharing]:
        r = ComponentSharing(SharingPattern.REPLICATED, validation=ValidationLevel.QUICK)
        return {"model": ComponentSharing(SharingPattern.PER_GROUP, "tp_group", ValidationLevel.TENSOR),
                "optimizer": ComponentSharing(SharingPattern.PER_GROUP, "tp_group", ValidationLevel.QUICK),
                "scheduler": ComponentSharing(SharingPattern.REPLICATED),
                "dataset": ComponentSharing(SharingPattern.PER_GROUP, "dp_group"),
                "trainer": r, "callbacks": r, "rng": ComponentSharing(SharingPattern.PER_RANK)}

    def get_process_groups(self) -> dict[str, Any]:
        return {"tp_group": self.mesh.get_group("dp"), "dp_group": self.mesh.get_group("tp")}
