"""One conformance suite for every storage backend: local disk, memory://, and s3:// on two real
S3 servers (SeaweedFS and moto in server mode, both over signed HTTP on 127.0.0.1).

Each test runs unchanged on every backend: save/load of every pattern, commit visibility,
latest/list order, deletion, overwrite refusal and concurrent savers sharing one output_dir. The
multi-rank test at the end runs every pattern on 4 gloo ranks (2 nodes x 2, a 2x2 mesh for
PER_GROUP) against S3, where ranks only share the bucket.
"""

from __future__ import annotations

import threading
import uuid
import warnings

import pytest
import torch

from dcp_forge import (
    CheckpointCoordinator,
    CheckpointExistsError,
    CheckpointNotFoundError,
    SharingPattern,
    StateComponent,
    delete_checkpoint,
    discard_partial_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    read_manifest,
)
from dcp_forge.storage import CheckpointState, checkpoint_state, join_url, open_backend
from tests.support.object_store import S3_BUCKET, fresh_prefix, storage_options_for
from tests.support.pattern_roundtrip import roundtrip_all_patterns
from tests.support.statefuls import Box

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# The object stores are reached through fixtures chosen per parameter, so those parameters carry their tier.
BACKENDS = ["local", "memory", pytest.param("s3-seaweedfs", marks=pytest.mark.s3),
            pytest.param("s3-moto", marks=pytest.mark.s3)]


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> tuple[str, dict]:
    """(output_dir URL, storage_options) of a fresh, empty place on one backend."""
    kind = request.param
    if kind == "local":
        return str(tmp_path / "run"), {}
    if kind == "memory":
        return f"memory://conformance/{uuid.uuid4().hex}", {}
    info = request.getfixturevalue("s3_server_info" if kind == "s3-seaweedfs" else "moto_server_info")
    return f"s3://{S3_BUCKET}/{fresh_prefix(request)}", storage_options_for(info)


def state(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(257, 33, generator=gen), "b": torch.arange(7, dtype=torch.int64) * seed,
            "meta": {"seed": seed, "name": f"s{seed}"}}


def same(a: dict, b: dict) -> bool:
    return (torch.equal(a["w"], b["w"]) and torch.equal(a["b"], b["b"]) and a["meta"] == b["meta"])


def coordinator(store, box: Box, pattern: str = "replicated") -> CheckpointCoordinator:
    url, options = store
    return CheckpointCoordinator([StateComponent("box", box, pattern)], output_dir=url, storage_options=options)


def save(store, seed: int, checkpoint_id: str, pattern: str = "replicated") -> str:
    return coordinator(store, Box(state(seed)), pattern).save_checkpoint(checkpoint_id=checkpoint_id)


def load(store, path: str | None = None, pattern: str = "replicated") -> dict:
    box = Box(state(0))
    coordinator(store, box, pattern).load_checkpoint(path)
    return box.state


class Exploding:
    """A value that fails while the save serialises it (after the checkpoint was claimed)."""

    def __reduce__(self):
        raise RuntimeError("serialiser on fire")


# Every pattern a single process can hold; PER_GROUP needs a group, see the multi-rank test.
SINGLE_PROCESS_PATTERNS = [p for p in SharingPattern if p is not SharingPattern.PER_GROUP]


@pytest.mark.parametrize("pattern", SINGLE_PROCESS_PATTERNS, ids=lambda p: p.value)
def test_every_pattern_round_trips(store, pattern):
    path = save(store, 3, "checkpoint-1", pattern.value)
    assert same(load(store, pattern=pattern.value), state(3))
    manifest = read_manifest(path, store[1])
    assert manifest.components["box"].sharing_pattern == pattern.value
    assert manifest.components["box"].size_bytes > 257 * 33 * 4


def test_an_uncommitted_save_is_invisible_and_can_be_discarded(store):
    url, options = store
    first = save(store, 1, "checkpoint-1")
    broken = Box({**state(2), "bad": Exploding()})
    with pytest.raises(RuntimeError, match="serialiser on fire"):
        coordinator(store, broken).save_checkpoint(checkpoint_id="checkpoint-2")
    backend, root = open_backend(url, options)
    assert checkpoint_state(backend, backend.join(root, "checkpoint-2")) in (
        CheckpointState.PARTIAL, CheckpointState.MISSING)
    assert latest_checkpoint(url, options) == first
    assert list_checkpoints(url, options) == [first]
    with pytest.raises(CheckpointNotFoundError):
        load(store, join_url(url, "checkpoint-2"))
    assert same(load(store), state(1))
    discard_partial_checkpoints(url, options)
    assert checkpoint_state(backend, backend.join(root, "checkpoint-2")) is CheckpointState.MISSING
    assert list_checkpoints(url, options) == [first]


def test_latest_and_list_follow_commit_order(store):
    url, options = store
    assert latest_checkpoint(url, options) is None and list_checkpoints(url, options) == []
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        load(store)
    paths = [save(store, seed, name) for seed, name in [(9, "checkpoint-9"), (10, "checkpoint-10"), (11, "best")]]
    assert list_checkpoints(url, options) == paths
    assert latest_checkpoint(url, options) == paths[-1]
    assert same(load(store), state(11))
    assert same(load(store, paths[0]), state(9))


def test_deleted_checkpoints_disappear_and_their_id_can_be_reused(store):
    url, options = store
    old, new = save(store, 1, "checkpoint-1"), save(store, 2, "checkpoint-2")
    delete_checkpoint(new, options)
    assert list_checkpoints(url, options) == [old]
    assert latest_checkpoint(url, options) == old
    with pytest.raises(CheckpointNotFoundError):
        load(store, new)
    again = save(store, 3, "checkpoint-2")
    assert again == new and same(load(store), state(3))
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        delete_checkpoint(join_url(url, "never-saved"), options)


def test_saves_never_overwrite(store):
    url, options = store
    path = save(store, 1, "checkpoint-1")
    with pytest.raises(CheckpointExistsError, match="already exists"):
        save(store, 2, "checkpoint-1")
    # A save that crashed after claiming its id leaves it taken until someone discards it.
    with pytest.raises(RuntimeError):
        coordinator(store, Box({"bad": Exploding()})).save_checkpoint(checkpoint_id="checkpoint-2")
    if checkpoint_state(*_native(store, "checkpoint-2")) is CheckpointState.PARTIAL:
        with pytest.raises(CheckpointExistsError, match="another save"):
            save(store, 3, "checkpoint-2")
    assert same(load(store, path), state(1))
    assert list_checkpoints(url, options) == [path]


def _native(store, name: str):
    backend, root = open_backend(*store)
    return backend, backend.join(root, name)


def _concurrently(fns) -> list:
    """Run ``fns`` on threads released together; each result is a value or the exception raised."""
    start = threading.Barrier(len(fns))
    results: list = [None] * len(fns)

    def run(i, fn):
        start.wait()
        try:
            results[i] = fn()
        except Exception as err:  # noqa: BLE001 - the test inspects what each saver got
            results[i] = err

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_concurrent_savers_share_one_output_dir(store):
    url, options = store
    warnings.simplefilter("ignore")
    # Different ids at once: every one commits and is listed.
    paths = _concurrently([lambda s=seed: save(store, s, f"checkpoint-{s}") for seed in range(1, 5)])
    assert all(isinstance(p, str) for p in paths), paths
    assert sorted(list_checkpoints(url, options)) == sorted(paths)
    for seed, path in enumerate(paths, start=1):
        assert same(load(store, path), state(seed))
    # One id at once: exactly one saver wins, the others are refused, the winner's state is stored.
    outcomes = _concurrently([lambda s=seed: save(store, s, "contended") for seed in range(10, 14)])
    winners = [seed for seed, o in zip(range(10, 14), outcomes, strict=True) if isinstance(o, str)]
    assert len(winners) == 1, outcomes
    assert all(isinstance(o, CheckpointExistsError) for o in outcomes if not isinstance(o, str)), outcomes
    assert same(load(store, join_url(url, "contended")), state(winners[0]))


def test_every_pattern_on_four_ranks_against_s3(ranks, s3_server_info, request):
    """Ranks share nothing but the bucket: 2 simulated nodes x 2 ranks, PER_GROUP on a 2x2 mesh."""
    url = f"s3://{S3_BUCKET}/{fresh_prefix(request)}"
    results = ranks(roundtrip_all_patterns, 4, url, storage_options_for(s3_server_info), ranks_per_node=2)
    for pattern in SharingPattern:
        assert all(r[pattern.value]["ok"] for r in results), (pattern, [r[pattern.value] for r in results])
    assert results[0]["per_rank"]["copies"] == 4 and results[0]["per_node"]["copies"] == 2
    assert results[0]["per_group"]["copies"] == 2 and results[0]["replicated"]["writers"] == [0, 1, 2, 3]
