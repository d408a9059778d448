"""A failed save leaves storage as it found it.

Whatever stops a save after it claimed its directory (a full disk, a rank the filesystem refuses, a
value that cannot be stored, a store that stops answering), once every rank has given up, the rank
that claimed the directory removes it: its own files, other ranks' files, the records and the claim.
Nothing else is touched: not the checkpoints committed before, not a directory another save holds.
The error raised is the cause, never an error of the cleanup.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
import warnings

import pytest
import torch

from dcp_forge import (
    CheckpointCoordinator,
    CheckpointExistsError,
    StateComponent,
    list_checkpoints,
    verify_checkpoint,
)
from dcp_forge.storage import open_backend
from dcp_forge.storage.lifecycle import claim
from tests.support.statefuls import Box

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tensors(count: int, numel: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(numel, generator=gen) for i in range(count)}


def coordinator(out, state: dict, **kwargs) -> CheckpointCoordinator:
    return CheckpointCoordinator([StateComponent("model", Box(state), "global")], output_dir=out, **kwargs)


def unpicklable() -> object:
    return threading.Lock()


# Values no save can store, refused while the data is written (after the claim) or before.
UNSUPPORTED = {
    "an object pickle refuses": lambda: {"w": torch.randn(8), "lock": unpicklable()},
    "a function": lambda: {"w": torch.randn(8), "f": lambda x: x},
    "a tensor on the meta device": lambda: {"w": torch.randn(8), "m": torch.empty(4, device="meta")},
}


# ---------------------------------------------------------------------------------------- local disk

@pytest.mark.parametrize("value", list(UNSUPPORTED))
def test_a_save_of_a_value_it_cannot_store_leaves_nothing(tmp_path, value):
    out = tmp_path / "run"
    kept = coordinator(out, tensors(2, 64)).save_checkpoint(checkpoint_id="ckpt-1")
    with pytest.raises(Exception):  # noqa: B017 - which builtin is the value kinds' business; here: no debris
        coordinator(out, UNSUPPORTED[value](), thread_count=2).save_checkpoint(checkpoint_id="ckpt-2")
    assert sorted(os.listdir(out)) == ["ckpt-1"]
    assert list_checkpoints(out) == [kept] and verify_checkpoint(kept) == []


def test_a_failed_save_never_removes_a_directory_another_save_claimed(tmp_path):
    out = tmp_path / "run"
    backend, native = open_backend(str(out / "ckpt-1"))
    claim(backend, native, "the-other-save", str(out / "ckpt-1"))
    theirs = sorted(os.listdir(out / "ckpt-1"))
    with pytest.raises(CheckpointExistsError, match="being written by another save"):
        coordinator(out, tensors(2, 64)).save_checkpoint(checkpoint_id="ckpt-1")
    assert sorted(os.listdir(out / "ckpt-1")) == theirs


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs: writes past it fail with ENOSPC from the kernel."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_save_that_fills_the_disk_leaves_it_as_it_was(small_disk):
    out = small_disk / "run"
    kept = coordinator(out, tensors(2, 32 * 1024)).save_checkpoint(checkpoint_id="ckpt-1")  # 256 KiB
    used = shutil.disk_usage(small_disk).used
    # 3 MiB in four files: some complete, one runs out of space part-way.
    with pytest.raises(OSError, match=r"No space left on device: rank 0 writing __0_\d\.distcp of checkpoint "
                                      r".*ckpt-2") as failure:
        coordinator(out, tensors(4, 192 * 1024, seed=1), thread_count=4).save_checkpoint(checkpoint_id="ckpt-2")
    assert not getattr(failure.value, "__notes__", None)  # the cleanup itself went through
    assert sorted(os.listdir(out)) == ["ckpt-1"]
    assert shutil.disk_usage(small_disk).used == used
    # What fitted before fits again: 1.5 MiB of the 1.75 MiB left.
    again = coordinator(out, tensors(2, 192 * 1024, seed=2)).save_checkpoint(checkpoint_id="ckpt-2")
    assert list_checkpoints(out) == [kept, again]
    assert verify_checkpoint(kept) == [] and verify_checkpoint(again) == []


def test_an_async_save_that_fills_the_disk_leaves_it_as_it_was(small_disk):
    out = small_disk / "run"
    with coordinator(out, tensors(4, 192 * 1024), thread_count=4) as coord:
        handle = coord.async_save(checkpoint_id="ckpt-1")  # staged in memory; the upload fails
        with pytest.raises(OSError, match="No space left on device"):
            handle.result()
        coord.wait()  # the failure reached the caller at result(): it is not raised again
    assert os.listdir(out) == []


# --------------------------------------------------------------------------------------- several ranks

_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER = 1, 2, 3


def _drop_file_capabilities() -> None:
    """Give up root's right to ignore file permissions, for this thread and the threads it starts
    (Linux keeps capabilities per thread): from now on a read-only directory refuses us."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER):
        data[cap // 32].effective &= ~(1 << (cap % 32))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _failing_saves(rank: int, world: int, root: str) -> dict:
    warnings.simplefilter("ignore")
    outcome = {}

    def attempt(name: str, coord: CheckpointCoordinator, checkpoint_id: str) -> None:
        try:
            coord.save_checkpoint(checkpoint_id=checkpoint_id)
            outcome[name] = None
        except Exception as err:  # reported to the parent, which checks it
            outcome[name] = (type(err).__name__, str(err), list(getattr(err, "__notes__", [])))
        outcome[f"{name}: left"] = sorted(os.listdir(os.path.join(root, name)))

    # Rank 1 may not write into the directory rank 0 claims: rank 0 creates it read-only (umask),
    # which root ignores; rank 1 is root without that privilege. Rank 0's file is written, rank 1
    # is refused: rank 0 removes its own file and the claim.
    state = {"r": torch.full((1000,), float(rank))}
    refused = CheckpointCoordinator([StateComponent("mine", Box(state), "per_rank")],
                                    output_dir=os.path.join(root, "refused"))
    refused.save_checkpoint(checkpoint_id="ckpt-1")
    if rank == 1:
        _drop_file_capabilities()
    previous = os.umask(0o222) if rank == 0 else None
    try:
        attempt("refused", refused, "ckpt-2")
    finally:
        if previous is not None:
            os.umask(previous)
    # Rank 0's data cannot be written (a value that fails only while it is written: values the save
    # can tell are unstorable are refused before the claim); rank 1's file is complete: rank 0
    # removes rank 1's file too.
    from dcp_forge.storage import writer

    def unwritable(tensor: torch.Tensor, stream: object) -> None:
        raise TypeError(f"cannot pickle {unpicklable()!r} found inside the tensor being written")

    if rank == 0:  # every tensor written by save_tensor (no packs), which fails
        writer.save_tensor = unwritable
        writer._packable = lambda item, data, form: None
    value = {"r": torch.full((1000,), float(rank)), "x": 1}
    attempt("unstorable", CheckpointCoordinator([StateComponent("mine", Box(value), "per_rank")],
                                                output_dir=os.path.join(root, "unstorable")), "ckpt-1")
    return outcome


def test_the_claiming_rank_removes_every_rank_s_files_once_all_ranks_gave_up(tmp_path, ranks):
    if os.geteuid() != 0:
        pytest.skip("one rank is refused where the other may write only when the ranks run as root "
                    "(one of them without root's file privileges); CI runs as root")
    results = ranks(_failing_saves, 2, str(tmp_path))
    for outcome in results:
        kind, message, notes = outcome["refused"]
        assert kind == "PermissionError" and "rank 1 writing __1_0.distcp" in message, message
        assert "refused/ckpt-2" in message and not notes, (message, notes)
        kind, message, notes = outcome["unstorable"]
        assert kind == "TypeError" and "pickle" in message and not any("removing" in n for n in notes), notes
        # Rank 0 claimed both directories and removed them; every rank returned after that.
        assert outcome["refused: left"] == ["ckpt-1"] and outcome["unstorable: left"] == []
    assert list_checkpoints(tmp_path / "refused") == [str(tmp_path / "refused" / "ckpt-1")]
    assert verify_checkpoint(tmp_path / "refused" / "ckpt-1") == []
