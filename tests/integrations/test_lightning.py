"""PyTorch Lightning through dcp_forge: a real ``Trainer.fit`` saves with ``ForgeCheckpointIO``, resumes
with ``ckpt_path=...``, and ends bit for bit where an uninterrupted run ends (sync, async, s3, 2 ranks)."""

from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from dcp_forge import latest_checkpoint, list_checkpoints, read_manifest, verify_checkpoint
from dcp_forge.integrations.lightning import ForgeCheckpointIO, ForgeDDPStrategy, ForgeSingleDeviceStrategy

EPOCHS, SAMPLES, BATCH = 3, 16, 4


class TinyRegression(pl.LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        self.steps_run = 0  # in this process: a resumed fit runs only the steps after its checkpoint

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.05)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(SAMPLES, 4, generator=g), torch.randn(SAMPLES, 2, generator=g))
        return DataLoader(data, batch_size=BATCH, shuffle=False)


def fit(root: str, *, max_epochs: int, ckpt_path: str | None = None, io: ForgeCheckpointIO | None = None,
        strategy=None, devices: int = 1) -> tuple[TinyRegression, pl.Trainer]:
    model = TinyRegression(seed=0 if ckpt_path is None else 1)  # a resumed model starts from other weights
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
        strategy=strategy or ForgeSingleDeviceStrategy(device="cpu"),
        plugins=[io or ForgeCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=root, filename="{epoch}-{step}", save_top_k=-1, every_n_epochs=1)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|sync_dist|Checkpoint directory).*")
        trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


def training_state(model: TinyRegression, trainer: pl.Trainer) -> dict:
    optimizer = trainer.optimizers[0]
    return {"params": {k: v.clone() for k, v in model.state_dict().items()},
            "moments": {model_name: {k: v.clone() for k, v in optimizer.state[p].items()}
                        for model_name, p in model.named_parameters()},
            "lr": optimizer.param_groups[0]["lr"], "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "global_step": trainer.global_step, "epoch": trainer.current_epoch, "steps_run": model.steps_run}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    for name, moments in a["moments"].items():
        assert moments.keys() == b["moments"][name].keys()
        for k, v in moments.items():
            assert torch.equal(v, b["moments"][name][k]), (name, k)
    assert (a["lr"], a["scheduler"], a["global_step"], a["epoch"]) == (
        b["lr"], b["scheduler"], b["global_step"], b["epoch"])


@pytest.fixture
def one_thread_run(one_thread):
    return one_thread


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_resumed_fit_matches_an_uninterrupted_one_bit_for_bit(tmp_path, one_thread_run, async_save):
    straight = training_state(*fit(str(tmp_path / "straight"), max_epochs=EPOCHS))

    first = str(tmp_path / "interrupted")
    fit(first, max_epochs=EPOCHS - 1, io=ForgeCheckpointIO(async_save=async_save))
    saved = list_checkpoints(first)  # teardown waited for the async save: everything is committed
    assert [os.path.basename(p) for p in saved] == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    assert verify_checkpoint(saved[-1]) == []
    manifest = read_manifest(saved[-1])
    assert sorted(manifest.components) == ["lightning", "model", "optimizers"]
    assert manifest.components["model"].sharing_pattern == "replicated"

    resumed = training_state(*fit(first, max_epochs=EPOCHS, ckpt_path=latest_checkpoint(first)))
    assert_bitwise_equal(straight, resumed)
    assert (straight["steps_run"], resumed["steps_run"]) == (EPOCHS * SAMPLES // BATCH, SAMPLES // BATCH)


def test_resuming_needs_the_forge_strategy(tmp_path, one_thread_run):
    root = str(tmp_path)
    fit(root, max_epochs=1)
    with pytest.raises(RuntimeError, match="use it with a strategy that includes ForgeCheckpointing"):
        model = TinyRegression()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, plugins=[ForgeCheckpointIO()], enable_checkpointing=False)
        trainer.fit(model, ckpt_path=latest_checkpoint(root))


def test_the_forge_strategy_needs_the_forge_plugin(tmp_path, one_thread_run):
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    with pytest.raises(TypeError, match=r"needs plugins=\[ForgeCheckpointIO"):
        fit(str(tmp_path), max_epochs=1, io=AsyncCheckpointIO(ForgeCheckpointIO()))


def test_a_committed_checkpoint_is_never_overwritten(tmp_path, one_thread_run):
    model, trainer = fit(str(tmp_path), max_epochs=1)
    path = latest_checkpoint(str(tmp_path))
    with pytest.raises(FileExistsError):
        trainer.save_checkpoint(path)


def test_fit_saves_to_s3_and_resumes_from_it(s3_url, s3_storage_options, s3_env, monkeypatch, tmp_path, one_thread_run):
    for name, value in s3_env.items():  # Lightning's own fsspec calls (ModelCheckpoint listing) reach the server too
        monkeypatch.setenv(name, value)
    straight = training_state(*fit(str(tmp_path), max_epochs=2))
    fit(s3_url, max_epochs=1, io=ForgeCheckpointIO(storage_options=s3_storage_options, async_save=True))
    latest = latest_checkpoint(s3_url, s3_storage_options)
    assert latest is not None and latest.endswith("epoch=0-step=4.ckpt")
    resumed = training_state(*fit(s3_url, max_epochs=2, ckpt_path=latest,
                                  io=ForgeCheckpointIO(storage_options=s3_storage_options)))
    assert_bitwise_equal(straight, resumed)
    assert resumed["steps_run"] == SAMPLES // BATCH


def _ddp_fit(rank, world_size, root):
    def run(sub, **kwargs):
        return training_state(*fit(os.path.join(root, sub), devices=world_size,
                                   strategy=ForgeDDPStrategy(process_group_backend="gloo"), **kwargs))

    straight = run("straight", max_epochs=EPOCHS)
    run("interrupted", max_epochs=EPOCHS - 1, io=ForgeCheckpointIO(async_save=True, validate_replication=True))
    latest = latest_checkpoint(os.path.join(root, "interrupted"))
    resumed = run("interrupted", max_epochs=EPOCHS, ckpt_path=latest)
    assert_bitwise_equal(straight, resumed)
    assert resumed["steps_run"] == SAMPLES // BATCH // world_size  # each rank trains on its half of the data
    return read_manifest(latest).components["model"].ranks


def test_ddp_fit_on_two_ranks_resumes_bit_for_bit(ranks, tmp_path):
    writers, _ = ranks(_ddp_fit, 2, str(tmp_path))
    assert sorted(writers) == [0, 1]  # the replicated model is written once, its bytes spread over both ranks
