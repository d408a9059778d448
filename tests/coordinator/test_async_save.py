"""Async save in one process: exactness under mutation (small, >= 512 MiB, views, shared storages),
byte-identical to a sync save (local disk, memory://), one save in flight, failures that are never
lost, close / context manager, staging memory."""

from __future__ import annotations

import os
import threading
import warnings

import fsspec
import pytest
import torch

from dcp_forge import (
    AsyncSaveError,
    AsyncSaveHandle,
    CheckpointCoordinator,
    CheckpointExistsError,
    RNGState,
    StateComponent,
    latest_checkpoint,
    list_checkpoints,
    read_manifest,
)
from dcp_forge.core.placement import ChunkPolicy
from dcp_forge.format.names import CLAIM_FILE, COMMIT_FILE, MANIFEST_FILE, METADATA_FILE
from dcp_forge.format.safe_load import load_dcp_metadata
from tests.support.statefuls import Box
from tests.support.states import assert_same, empty_like_state, mutate_in_place, snapshot, tricky_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL_CHUNKS = ChunkPolicy(min_chunk_bytes=4096, chunks_per_holder=2)


def load_into_fresh(path: str, like: dict, key: str = "box", pattern: str = "replicated") -> dict:
    target = Box(empty_like_state(like))
    CheckpointCoordinator([StateComponent(key, target, pattern)], output_dir=os.path.dirname(path)
                          ).load_checkpoint(path, strict=False)
    return target.state


def test_checkpoint_holds_the_values_of_the_call_despite_in_place_changes(tmp_path):
    state = tricky_state(1)
    box = Box(state)
    model = torch.nn.Linear(16, 8)
    coord = CheckpointCoordinator([StateComponent("box", box, "replicated"),
                                   StateComponent("model", model, "replicated")],
                                  output_dir=tmp_path, chunk_policy=SMALL_CHUNKS)
    for step in range(3):  # the first save allocates staging buffers, later ones reuse them
        expected, expected_model = snapshot(state), snapshot(dict(model.state_dict()))
        handle = coord.async_save(checkpoint_id=f"checkpoint-{step}")
        assert isinstance(handle, AsyncSaveHandle)
        mutate_in_place(state)
        with torch.no_grad():
            model.weight.mul_(-1)
        path = handle.result(timeout=60)
        assert_same(load_into_fresh(path, expected), expected)
        loaded_model = torch.nn.Linear(16, 8)
        CheckpointCoordinator([StateComponent("model", loaded_model, "replicated")], output_dir=tmp_path
                              ).load_checkpoint(path, strict=False)
        assert_same(dict(loaded_model.state_dict()), expected_model)
    coord.close()


def test_a_tensor_of_512_mib_with_views_is_exact_under_mutation(tmp_path):
    numel = (512 << 20) // 4
    big = torch.arange(numel, dtype=torch.int32)
    # Views into big's storage: a tail slice and a strided column of a reshaped view.
    state = {"big": big, "tail_view": big[-1000:], "same_storage": big.view(-1, 1024)[:, 7]}
    coord = CheckpointCoordinator([StateComponent("box", Box(state), "global")], output_dir=tmp_path)
    handle = coord.async_save(checkpoint_id="big")
    big.add_(1)  # in place, while the upload runs
    assert handle.staged_bytes == big.nbytes  # views share big's staging buffer
    path = handle.result(timeout=300)
    coord.close()
    target = Box({"big": torch.empty(numel, dtype=torch.int32), "tail_view": torch.empty(1000, dtype=torch.int32),
                     "same_storage": torch.empty(numel // 1024, dtype=torch.int32)})
    CheckpointCoordinator([StateComponent("box", target, "global")], output_dir=tmp_path).load_checkpoint(path)
    big.sub_(1)  # the values at the moment of the call
    assert torch.equal(target.state["big"], big)
    assert torch.equal(target.state["tail_view"], big[-1000:])
    assert torch.equal(target.state["same_storage"], big.view(-1, 1024)[:, 7])


def test_a_storage_grown_in_place_between_saves_is_staged_again(tmp_path):
    t = torch.arange(10.0)
    box = Box({"t": t})
    coord = CheckpointCoordinator([StateComponent("box", box, "global")], output_dir=tmp_path)
    coord.async_save(checkpoint_id="a").result()
    t.resize_(1000)  # grows the storage DCP's stager cached a buffer for
    t.copy_(torch.arange(1000.0))
    path = coord.async_save(checkpoint_id="b").result()
    assert torch.equal(load_into_fresh(path, {"t": t}, pattern="global")["t"], torch.arange(1000.0))
    coord.close()


def _files(fs, root: str) -> dict[str, bytes]:
    return {os.path.basename(p): fs.cat_file(p) for p in fs.ls(root, detail=False)}


@pytest.mark.parametrize("scheme", ["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def test_async_checkpoint_is_byte_identical_to_a_sync_one(tmp_path, scheme, request):
    warnings.simplefilter("ignore")
    options = {}
    if scheme == "s3":
        out, options = request.getfixturevalue("s3_url"), request.getfixturevalue("s3_storage_options")
    else:
        out = str(tmp_path) if scheme == "local" else f"memory://async-identical-{os.getpid()}"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    comps = [StateComponent("model", model, "replicated"), StateComponent("optimizer", opt, "replicated"),
             StateComponent("box", Box(tricky_state(3)), "global"),
             StateComponent("rng", RNGState(), "per_rank", required=False)]
    with CheckpointCoordinator(comps, output_dir=out, storage_options=options, chunk_policy=SMALL_CHUNKS) as coord:
        sync_path = coord.save_checkpoint(checkpoint_id="sync", extra={"step": 5})
        async_path = coord.async_save(checkpoint_id="async", extra={"step": 5}).result()
    fs, sync_root = fsspec.core.url_to_fs(sync_path, **options)
    _, async_root = fsspec.core.url_to_fs(async_path, **options)
    sync_files, async_files = _files(fs, sync_root), _files(fs, async_root)
    assert set(sync_files) == set(async_files)
    data_files = set(sync_files) - {CLAIM_FILE, COMMIT_FILE, MANIFEST_FILE, METADATA_FILE}
    assert {"index.parquet", "__0_0.distcp"} <= data_files
    for name in sorted(data_files):
        assert sync_files[name] == async_files[name], name
    # .metadata differs only in storage_meta: each save's own id and path, as DCP's FileSystemWriter records them.
    sync_md, async_md = (load_dcp_metadata(files[METADATA_FILE], name=METADATA_FILE) for files in (sync_files, async_files))
    assert sync_md.storage_meta.save_id != async_md.storage_meta.save_id
    assert async_md.storage_meta.checkpoint_id.endswith("async")
    async_md.storage_meta = sync_md.storage_meta
    assert async_md == sync_md
    sync_manifest, async_manifest = read_manifest(sync_path, options), read_manifest(async_path, options)
    assert async_manifest.checkpoint_path.endswith("async")
    assert async_manifest.files["index.parquet"] == sync_manifest.files["index.parquet"]
    for field in ("timestamp", "checkpoint_path", "files"):  # files: .metadata holds each save's id
        setattr(async_manifest, field, getattr(sync_manifest, field))
    assert async_manifest == sync_manifest
    if scheme == "memory":
        fs.rm(sync_root.rsplit("/", 1)[0], recursive=True)


class PicklesBadly(Box):
    """Staging (a deep copy) works; writing (pickling) fails in the background."""

    class Bomb:
        def __deepcopy__(self, memo):
            return self

        def __reduce__(self):
            raise RuntimeError("disk on fire")

    def state_dict(self):
        return {"t": torch.ones(3), "bomb": self.Bomb()}


def test_a_background_failure_raises_at_result_and_then_the_next_save_proceeds(tmp_path):
    good = Box({"t": torch.ones(4)})
    bad = PicklesBadly({})
    coord = CheckpointCoordinator([StateComponent("box", good, "global")], output_dir=tmp_path)
    first = coord.async_save(checkpoint_id="checkpoint-1").result()
    broken = CheckpointCoordinator([StateComponent("box", bad, "global")], output_dir=tmp_path)
    handle = broken.async_save(checkpoint_id="checkpoint-2")
    with pytest.raises(RuntimeError, match="disk on fire"):
        handle.result(timeout=60)
    assert isinstance(handle.exception(), RuntimeError) and handle.done()
    assert latest_checkpoint(tmp_path) == first  # the failed save is invisible
    # The caller has the failure: the next save does not raise it again, it saves.
    broken.components[0].stateful.state_dict = lambda: {"t": torch.zeros(2)}
    assert broken.async_save(checkpoint_id="checkpoint-3").result().endswith("checkpoint-3")
    broken.close()
    coord.close()


@pytest.mark.parametrize("seen_by", ["result", "exception", "done_callback", "nobody"])
def test_a_failure_raises_again_only_if_it_never_reached_the_caller(tmp_path, seen_by):
    """One failure costs one checkpoint: once the caller saw it on the handle, the next save saves;
    a failure nobody looked at is raised by the next save (which saves nothing), never lost."""
    box = PicklesBadly({})
    coord = CheckpointCoordinator([StateComponent("box", box, "global")], output_dir=tmp_path)
    seen = []
    handle = coord.async_save(checkpoint_id="failing")
    if seen_by == "done_callback":
        handle.add_done_callback(lambda h: seen.append(type(h.exception()).__name__))
    while not handle.done():
        threading.Event().wait(0.01)
    if seen_by == "result":
        with pytest.raises(RuntimeError, match="disk on fire"):
            handle.result()
    elif seen_by == "exception":
        assert isinstance(handle.exception(), RuntimeError)
    box.state_dict = lambda: {"t": torch.ones(3)}
    if seen_by == "nobody":
        with pytest.raises(AsyncSaveError, match="failing failed in the background.*disk on fire"):
            coord.async_save(checkpoint_id="next")
        assert not os.path.exists(tmp_path / "next")  # raising it started nothing
        assert coord.async_save(checkpoint_id="after").result().endswith("after")  # raised once, then cleared
    else:
        assert coord.async_save(checkpoint_id="next").result().endswith("next")
    coord.close()
    assert seen == (["RuntimeError"] if seen_by == "done_callback" else [])


def test_a_failure_nobody_asked_for_raises_at_close_and_at_a_sync_save(tmp_path):
    coord = CheckpointCoordinator([StateComponent("box", Box({"t": torch.ones(2)}), "global")],
                                  output_dir=tmp_path)
    coord.save_checkpoint(checkpoint_id="taken")
    coord.async_save(checkpoint_id="taken")  # fails in the background: the id is committed already
    with pytest.raises(AsyncSaveError, match="taken failed in the background") as err:
        coord.save_checkpoint(checkpoint_id="next")
    assert isinstance(err.value.__cause__, CheckpointExistsError)
    coord.async_save(checkpoint_id="taken")
    with pytest.raises(AsyncSaveError, match="already exists"):
        coord.close()
    assert coord.close() is None  # idempotent; the failure was raised once
    with pytest.raises(ValueError, match="closed"):
        coord.async_save(checkpoint_id="later")


def test_a_staging_failure_raises_in_the_caller_and_starts_nothing(tmp_path):
    class Uncopyable:
        def __reduce_ex__(self, protocol):
            raise TypeError("cannot copy this")

    coord = CheckpointCoordinator([StateComponent("box", Box({"x": Uncopyable()}), "global")],
                                  output_dir=tmp_path)
    with pytest.raises(TypeError, match="cannot copy this"):
        coord.async_save(checkpoint_id="c")
    assert not os.path.exists(tmp_path / "c")
    coord.close()  # nothing pending


def test_one_save_in_flight_and_commits_in_call_order(tmp_path):
    box = Box({"t": torch.zeros(1 << 16)})
    coord = CheckpointCoordinator([StateComponent("box", box, "global")], output_dir=tmp_path)
    handles = []
    threads_before = threading.active_count()
    for i in range(4):
        box.state["t"].fill_(i)
        handles.append(coord.async_save(checkpoint_id=f"c{i}"))
        assert all(h.done() for h in handles[:-1])  # the previous one finished before this returned
        # the background save's thread (and the previous one's, possibly still exiting) and while it
        # writes its writer threads: nothing accumulates across saves
        assert threading.active_count() <= threads_before + 2 + coord.thread_count
    sync = coord.save_checkpoint(checkpoint_id="sync")  # waits for the in-flight async save too
    assert handles[-1].done()
    assert list_checkpoints(tmp_path) == [h.checkpoint_path for h in handles] + [sync]
    coord.async_save(checkpoint_id="last")
    coord.load_checkpoint()  # waits for it: the latest is the one just saved
    assert coord.last_manifest.checkpoint_path.endswith("last")
    coord.close()


def test_context_manager_waits_and_keeps_the_body_exception(tmp_path):
    box = Box({"t": torch.ones(1 << 16)})
    with CheckpointCoordinator([StateComponent("box", box, "global")], output_dir=tmp_path) as coord:
        handle = coord.async_save(checkpoint_id="c")
    assert handle.done() and handle.result() == str(tmp_path / "c")
    assert coord.last_manifest is not None and handle.manifest == coord.last_manifest
    assert handle.upload_seconds is not None and handle.staging_seconds > 0

    with pytest.raises(KeyError, match="from the body") as err, \
            CheckpointCoordinator([StateComponent("box", box, "global")], output_dir=tmp_path) as coord:
        coord.async_save(checkpoint_id="c")  # fails in the background: exists
        raise KeyError("from the body")
    assert any("closing the CheckpointCoordinator raised" in note for note in err.value.__notes__)


def test_staging_memory_is_the_state_size_and_reused(tmp_path):
    tensors = {f"w{i}": torch.randn(1 << 14) for i in range(8)}
    state_bytes = sum(t.nbytes for t in tensors.values())
    coord = CheckpointCoordinator([StateComponent("box", Box(tensors), "global")], output_dir=tmp_path)
    first = coord.async_save(checkpoint_id="a")
    first.result()
    second = coord.async_save(checkpoint_id="b")
    second.result()
    assert first.staged_bytes == second.staged_bytes == state_bytes
    # one buffer per source storage, reused by the second save
    assert coord._async_saves._stager.buffer_count() == len(tensors)
    coord.close()
    assert coord._async_saves._stager is None
