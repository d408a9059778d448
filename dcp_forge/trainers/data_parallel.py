"""Data-parallel trainers: DDPTrainer (torch DDP), FSDPTrainer (FSDP2 ``fully_shard``) and
AccelTrainer (Hugging Face accelerate).

All three train one model replica per rank on different data and keep the replicas equal, so they
share the data path. DDPTrainer and FSDPTrainer read ``TrainingArguments.dispatch_batches``: True
(their default) loads each global batch on rank 0 and scatters a slice to every rank through a
``DataloaderDispatcher`` (dataset state GLOBAL: only rank 0 has any); False gives every rank its own
shard of each epoch (dataset state PER_RANK), which is what AccelTrainer always does. They need an
initialised process group (torchrun, or ``init_process_group`` yourself) — one rank works too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.utils.data import Dataset

from ..core.patterns import SharingPattern, ValidationLevel
from ..statefuls import OptimizerState
from .args import TrainingArguments
from .base import BaseTrainer, ComponentSharing, OptimizerFactory
from .callbacks import TrainerCallback
from .data import make_dataloader
from .dispatch import DataloaderDispatcher
from .strategies import TrainingStrategy
from .tiny_lm import apply_fsdp2

__all__ = ["AccelTrainer", "DDPTrainer", "FSDPTrainer"]

# ``parallelize(model, mesh)``: shards the model the trainer was given over ``mesh`` and returns it. The
# model is typed Any: each default (tiny_lm's) needs its own model class, a user's function another.
ModelParallelizer = Callable[[Any, DeviceMesh], nn.Module]


def require_process_group(owner: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{owner} needs an initialised torch.distributed process group: launch with torchrun (and "
            "call dist.init_process_group, or use `python -m dcp_forge.trainers.run`), or use Trainer")


def model_parallel_mesh(mesh: DeviceMesh | None, model_parallel_size: int | None, names: tuple[str, str], *,
                        owner: str, size_name: str) -> DeviceMesh:
    """``mesh``, or when it is None a CPU mesh of shape (world size // ``model_parallel_size``,
    ``model_parallel_size``); either way a 2-D mesh named ``names`` (data-parallel dimension first).
    ``owner`` and ``size_name`` (where the size comes from) name them in errors."""
    if mesh is None:
        if model_parallel_size is None:
            raise ValueError(f"{owner} needs {size_name} or a {names} mesh")
        world = dist.get_world_size()
        if world % model_parallel_size:
            raise ValueError(f"{owner}: {size_name}={model_parallel_size} must divide the world size {world}")
        mesh = init_device_mesh("cpu", (world // model_parallel_size, model_parallel_size), mesh_dim_names=names)
    if tuple(mesh.mesh_dim_names or ()) != names:
        raise ValueError(f"{owner} needs a 2-D mesh named {names} (got {mesh.mesh_dim_names})")
    return mesh


def all_reduce_mean(tensor: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """In place: the mean over ``group``. SUM then divide, since gloo has no AVG."""
    if size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor /= size
    return tensor


def average_gradients(parameters: list[nn.Parameter], group: Any, size: int) -> None:
    """Average the gradients of ``parameters`` over ``group`` (for modules no DDP wrapper covers).
    DTensor gradients are reduced through their local shards."""
    for p in parameters:
        if p.grad is not None:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            all_reduce_mean(grad, group, size)


class _DataParallelTrainer(BaseTrainer):
    """Shared by the data-parallel trainers: world-wide replicas, dispatched or sharded data."""

    def _dispatching(self) -> bool:
        return bool(self.args.trainer_field("dispatch_batches"))

    @property
    def dp_rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def dp_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def _build_train_dataloader(self) -> Any:
        batch = self.args.per_device_train_batch_size
        build = functools.partial(make_dataloader, self.train_dataset, shuffle=True, seed=self.args.seed,
                                  num_workers=self.args.dataloader_num_workers)
        if not self._dispatching():
            return build(batch, num_shards=self.dp_size, shard_index=self.dp_rank)
        loader = build(batch * self.dp_size) if self.dp_rank == 0 else None
        return DataloaderDispatcher(loader, split_batches=True)

    def _dataset_sharing(self) -> ComponentSharing:
        return ComponentSharing(SharingPattern.GLOBAL if self._dispatching() else SharingPattern.PER_RANK)

    def _global_mean(self, value: torch.Tensor) -> float:
        return float(all_reduce_mean(value.detach().clone().float(), None, self.dp_size))

    def _global_mean_vector(self, values: torch.Tensor) -> torch.Tensor:
        return all_reduce_mean(values, None, self.dp_size)

    def _synchronize_gradients(self) -> None:
        # The wrapper averages the model's gradients; a strategy's trainable modules (a PPO critic)
        # are called outside it.
        aux = [p for m in self.aux_modules.values() for p in m.parameters() if p.requires_grad]
        average_gradients(aux, None, self.dp_size)

    def get_process_groups(self) -> dict[str, Any]:
        return {"ddp_group": dist.group.WORLD}

    def _settle_gradient_buckets(self) -> None:
        """One throwaway forward and backward, so DDP fixes its gradient buckets before the first step.

        DDP lays out its first iteration's buckets by parameter order, then rebuilds them in the order
        gradients became ready. Ring all-reduce sums each element in an order that depends on its
        position in the bucket, so with more than two ranks a process's first step would round
        differently from the same step of an uninterrupted run, and a resumed run would drift from
        it in the last bits. Nothing else changes: no dropout or RNG draws reach the training
        stream (eval mode, forked RNG), the gradients are dropped and the optimizer does not step.
        """
        probe = make_dataloader(self.train_dataset, self.args.per_device_train_batch_size, num_shards=self.dp_size,
                                shard_index=self.dp_rank)
        batch = self.strategy.prepare_batch(next(iter(probe)))
        self.train_model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                loss, _ = self.strategy.compute_loss(self.train_model, batch)
                self._backward(loss)
        finally:
            self.train_model.train()
            for p in self._trainable_parameters():
                p.grad = None


class DDPTrainer(_DataParallelTrainer):
    """torch ``DistributedDataParallel`` over all ranks (model and optimizer REPLICATED).

    Model and optimizer are REPLICATED (checked at every save: model per tensor, optimizer by one
    hash), scheduler, trainer progress and callbacks REPLICATED, dataset GLOBAL or PER_RANK by
    ``dispatch_batches`` (default True), RNG PER_RANK.
    """

    trainer_fields = frozenset({"dispatch_batches"})

    def _setup_parallelism(self) -> None:
        require_process_group(type(self).__name__)
        from torch.nn.parallel import DistributedDataParallel

        self.train_model = DistributedDataParallel(self.model)
        if self.dp_size > 1:
            self._settle_gradient_buckets()

    def sharing(self) -> dict[str, ComponentSharing]:
        r = ComponentSharing(SharingPattern.REPLICATED)
        return {"model": ComponentSharing(SharingPattern.REPLICATED, validation=ValidationLevel.TENSOR),
                "optimizer": ComponentSharing(SharingPattern.REPLICATED, validation=ValidationLevel.QUICK),
                "scheduler": r, "dataset": self._dataset_sharing(),
                "trainer": ComponentSharing(SharingPattern.REPLICATED, validation=ValidationLevel.QUICK),
                "callbacks": ComponentSharing(SharingPattern.REPLICATED, validation=ValidationLevel.QUICK),
                "rng": ComponentSharing(SharingPattern.PER_RANK)}


class FSDPTrainer(_DataParallelTrainer):
    """FSDP2: ``shard_fn(model, mesh)`` (default ``tiny_lm.apply_fsdp2``) shards parameters over a
    1-D data-parallel mesh of all ranks.

    Model and optimizer are GLOBAL: their tensors are DTensor shards, written by their owners and
    resharded on load (the optimizer as FQN-keyed state through ``statefuls.OptimizerState``).
    Scheduler, trainer progress and callbacks REPLICATED, dataset GLOBAL/PER_RANK by
    ``dispatch_batches`` (default True), RNG PER_RANK.
    """

    trainer_fields = frozenset({"dispatch_batches"})

    def __init__(self, model: nn.Module, args: TrainingArguments, train_dataset: Dataset, *,
                 shard_fn: ModelParallelizer = apply_fsdp2, eval_dataset: Dataset | None = None, strategy: TrainingStrategy | None = None,
                 optimizer_factory: OptimizerFactory | None = None,
                 callbacks: Sequence[TrainerCallback] = ()) -> None:
        super().__init__(model, args, train_dataset, eval_dataset=eval_dataset, strategy=strategy,
                         optimizer_factory=optimizer_factory, callbacks=callbacks)
        self.shard_fn = shard_fn
        self.mesh: DeviceMesh | None = None

    def _check_strategy(self) -> None:
        self._refuse_trainable_strategy_modules()

    def _setup_parallelism(self) -> None:
        require_process_group(type(self).__name__)
        device = "cuda" if next(self.model.parameters()).is_cuda else "cpu"
        self.mesh = init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("dp",))
        self.model = self.train_model = self.shard_fn(self.model, self.mesh)

    def _optimizer_stateful(self) -> Any:
        if self.optimizer is None:
            raise RuntimeError(f"{type(self).__name__}: the optimizer is built by setup()")
        return OptimizerState(self.model, self.optimizer)

    def sharing(self) -> dict[str, ComponentSharing]:
        r = ComponentSharing(SharingPattern.REPLICATED, validation=ValidationLevel.QUICK)
        return {"model": ComponentSharing(SharingPattern.GLOBAL), "optimizer": ComponentSharing(SharingPattern.GLOBAL),
                "scheduler": ComponentSharing(SharingPattern.REPLICATED), "dataset": self._dataset_sharing(),
                "trainer": r, "callbacks": r, "rng": ComponentSharing(SharingPattern.PER_RANK)}

    def get_process_groups(self) -> dict[str, Any]:
        if self.mesh is None:
            raise RuntimeError(f"{type(self).__name__}: the device mesh is built by setup()")
        return {"dp_group": self.mesh.get_group("dp")}


class AccelTrainer(_DataParallelTrainer):
    """Hugging Face accelerate (DDP under the hood); ``accelerator`` defaults to ``Accelerator()`` on
    CPU when no GPU is present. Needs the ``accelerate`` extra.

    Model REPLICATED (checked per tensor), optimizer REPLICATED without replication
    checks (accelerate's ``AcceleratedOptimizer`` wrapper), scheduler and trainer REPLICATED, dataset
    PER_RANK (every rank iterates its own shard; the loader is not handed to accelerate, whose
    wrappers would replace StatefulDataLoader's resumable state), RNG PER_RANK. The LR scheduler is
    not prepared either: accelerate would step it once per process.
    """

    def __init__(self, model: nn.Module, args: TrainingArguments, train_dataset: Dataset, *,
                 accelerator: Any = None, eval_dataset: Dataset | None = None, strategy: TrainingStrategy | None = None,
                 optimizer_factory: OptimizerFactory | None = None,
                 callbacks: Sequence[TrainerCallback] = ()) -> None:
        super().__init__(model, args, train_dataset, eval_dataset=eval_dataset, strategy=strategy,
                         optimizer_factory=optimizer_factory, callbacks=callbacks)
        self.accelerator = accelerator

    def _dispatching(self) -> bool:
        return False

    def _setup_parallelism(self) -> None:
        try:
            from accelerate import Accelerator
        except ImportError as err:
            raise ImportError("AccelTrainer needs Hugging Face accelerate: pip install 'dcp-forge[accelerate]'") from err
        if self.accelerator is None:
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.train_model = self.accelerator.prepare(self.model)
        if self.dp_size > 1:
            self._settle_gradient_buckets()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        return self.accelerator.prepare(super()._build_optimizer())

    def _backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def sharing(self) -> dict[str, ComponentSharing]:
        r = ComponentSharing(SharingPattern.REPLICATED)
        return {"model": ComponentSharing(SharingPattern.REPLICATED, validation=ValidationLevel.TENSOR),
                "optimizer": r, "scheduler": r, "dataset": ComponentSharing(SharingPattern.PER_RANK),
                "trainer": ComponentSharing(SharingPattern.REPLICATED, validation=ValidationLevel.QUICK),
                "callbacks": ComponentSharing(SharingPattern.REPLICATED, validation=ValidationLevel.QUICK),
                "rng": ComponentSharing(SharingPattern.PER_RANK)}

    def get_process_groups(self) -> dict[str, Any]:
        return {}
