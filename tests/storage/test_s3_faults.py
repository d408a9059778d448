"""Checkpoints on s3:// through injected faults: retries, the retry budget, lost replies, deletion.

Every test puts ``tests/support/fault_proxy.py`` (a real HTTP proxy on loopback) between the clients and
the session's SeaweedFS; the proxy answers a chosen fraction of requests with 500 InternalError,
503 SlowDown, a connection reset before the request reaches S3 (``reset``) or after S3 applied it
(``reset_after``: the reply is lost), or a delay. What the tests check, through a second client
that talks to SeaweedFS directly:

- with >= 10% of requests faulted, saves and loads with either data client are bit-exact;
- past the retry budget a save fails with a builtin OSError subclass naming the checkpoint and file
  (never the secret), and leaves nothing behind; the previous checkpoint still loads;
- a commit (or claim) marker whose PUT was applied but whose reply was lost commits exactly once,
  and a second saver of the same id is refused;
- deletion removes the marker first: when deleting the data fails, nothing committed is left.
"""

from __future__ import annotations

import logging
import threading
import warnings

import pytest
import torch

from dcp_forge import (
    CheckpointCoordinator,
    CheckpointExistsError,
    CheckpointNotFoundError,
    StateComponent,
    delete_checkpoint,
    discard_partial_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from dcp_forge.format.manifest import checksum_bytes
from dcp_forge.format.names import CLAIM_FILE, MANIFEST_FILE
from dcp_forge.storage import CheckpointState, checkpoint_state, open_backend, open_reader
from dcp_forge.storage.lifecycle import claim, read_commit
from tests.support.fault_proxy import FAILING_KINDS, KINDS, FaultConfig, FaultProxy
from tests.support.object_store import S3_BUCKET, fresh_prefix, storage_options_for
from tests.support.statefuls import Box

pytest.importorskip("s3fs")
from botocore.retries.standard import ExponentialBackoff  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DATA_CLIENTS = ["arrow", "s3fs"]


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """botocore sleeps up to 2**n s before retrying a SlowDown (20 s cap), right for a real service
    and minutes of sleep for these tests. Cap each sleep at 20 ms; the attempts stay as configured.
    (Arrow's C++ backoff cannot be tuned; its first retries are tens of milliseconds.)"""
    delay = ExponentialBackoff.delay_amount
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: min(delay(self, context), 0.02))


@pytest.fixture
def out(s3_server_info, request) -> str:
    return f"s3://{S3_BUCKET}/{fresh_prefix(request)}"


@pytest.fixture
def clean(s3_server_info) -> dict:
    """Options of a client that talks to SeaweedFS directly: the truth after the faults."""
    return storage_options_for(s3_server_info)


def via(proxy: FaultProxy, info, data_client: str = "auto", attempts: int | None = None) -> dict:
    options = {**storage_options_for(info), "endpoint_url": proxy.endpoint_url, "data_client": data_client}
    if attempts is not None:
        options["config_kwargs"] = {**options["config_kwargs"], "retries": {"total_max_attempts": attempts}}
    return options


def state(seed: int) -> dict:
    """A few tensors of several dtypes and sizes (one of 1 MiB), and a non-tensor value."""
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(512, 512, generator=gen), "b": torch.randn(33, generator=gen),
            "h": torch.randn(64, 48, generator=gen).to(torch.bfloat16),
            "ids": torch.randint(-2**40, 2**40, (1000,), generator=gen), "step": seed}


def bit_exact(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
        if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def coordinator(out: str, options: dict, box: Box) -> CheckpointCoordinator:
    return CheckpointCoordinator([StateComponent("model", box, "global")], output_dir=out,
                                 storage_options=options, thread_count=3)


def save(out: str, options: dict, seed: int, checkpoint_id: str) -> str:
    return coordinator(out, options, Box(state(seed))).save_checkpoint(checkpoint_id=checkpoint_id)


def load(out: str, options: dict, path: str | None = None) -> dict:
    box = Box({k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else None) for k, v in state(0).items()})
    coordinator(out, options, box).load_checkpoint(path)
    return box.state


# ------------------------------------------------------------------------- faults within budget

@pytest.mark.parametrize("data_client", DATA_CLIENTS)
def test_saves_and_loads_through_a_fifth_of_requests_faulted_are_bit_exact(s3_server_info, out, clean,
                                                                           data_client):
    config = FaultConfig(fraction=0.2, kinds=KINDS, seed=5, delay_s=0.05)
    with FaultProxy(s3_server_info.endpoint_url, config) as proxy:
        options = via(proxy, s3_server_info, data_client)
        paths = [save(out, options, seed, f"ckpt-{seed}") for seed in (1, 2)]
        loaded = [load(out, options, path) for path in paths]
        latest = load(out, options)
        stats = proxy.stats()
    assert all(bit_exact(got, state(seed)) for got, seed in zip(loaded, (1, 2), strict=True))
    assert bit_exact(latest, state(2))
    # The faults really happened, of every failing kind, on well over 10% of the requests.
    failing = sum(stats["faults_by_kind"].get(kind, 0) for kind in FAILING_KINDS)
    assert failing >= 0.1 * stats["requests"], stats
    assert set(stats["faults_by_kind"]) >= set(FAILING_KINDS), stats
    # What the faulted client committed is what a clean one sees, and it verifies clean.
    assert list_checkpoints(out, clean) == paths
    assert all(verify_checkpoint(path, clean) == [] for path in paths)


# ------------------------------------------------------------------------- past the retry budget

@pytest.mark.parametrize("data_client", DATA_CLIENTS)
@pytest.mark.parametrize(("target", "named"), [(r"\.distcp", "__0_"), (r"/\.metadata", ".metadata"),
                                               (r"/_COMMITTED", "_COMMITTED")])
def test_a_save_past_the_retry_budget_fails_clearly_and_leaves_nothing(s3_server_info, out, clean, caplog,
                                                                        data_client, target, named):
    caplog.set_level(logging.DEBUG)
    secret = s3_server_info.secret_key
    with FaultProxy(s3_server_info.endpoint_url) as proxy:
        options = via(proxy, s3_server_info, data_client, attempts=3)
        previous = save(out, options, 1, "ckpt-1")
        # Every upload of the target fails (before reaching S3) on each of its 3 attempts.
        proxy.configure(fraction=1.0, kinds=("internal_error", "slow_down", "reset"), methods=("PUT", "POST"),
                        path_pattern=target)
        with pytest.raises(OSError) as failure:
            save(out, options, 2, "ckpt-2")
        faults = proxy.stats()["faults"]
    message = str(failure.value)
    assert faults >= 3
    assert f"{out}/ckpt-2" in message and named in message, message
    assert secret not in message and secret not in repr(failure.value)
    assert not any(secret in record.getMessage() for record in caplog.records)
    # Nothing new looks committed to a clean client, nothing of the failed save is left (it removed
    # what it wrote: every object under its prefix), the previous checkpoint still loads bit-exact.
    assert list_checkpoints(out, clean) == [previous]
    assert latest_checkpoint(out, clean) == previous
    backend, native = open_backend(f"{out}/ckpt-2", clean)
    assert backend.list_dir(native) == [] and not getattr(failure.value, "__notes__", None)
    assert checkpoint_state(backend, native) is CheckpointState.MISSING
    with pytest.raises(CheckpointNotFoundError):
        open_reader(f"{out}/ckpt-2", clean).read_metadata()
    assert bit_exact(load(out, clean), state(1))


@pytest.mark.parametrize("lost", [("PUT",), ("PUT", "GET")], ids=["put-replies-lost", "put-and-get-replies-lost"])
def test_a_commit_whose_every_reply_is_lost_is_settled_by_reading_the_marker(s3_server_info, out, clean, lost):
    # The marker PUT is applied and its reply lost on every attempt. One GET of the marker settles
    # it (it carries this save's id); if that reply is lost too, the saver cannot know and says so
    # (ConnectionError). Since the marker is written last, a committed checkpoint is complete either
    # way: it verifies clean and loads bit-exact.
    with FaultProxy(s3_server_info.endpoint_url, fraction=1.0, kinds=("reset_after",), methods=lost,
                    path_pattern="/_COMMITTED") as proxy:
        if lost == ("PUT",):
            assert save(out, via(proxy, s3_server_info, attempts=2), 1, "ckpt-1") == f"{out}/ckpt-1"
        else:
            with pytest.raises(ConnectionError, match="may or may not exist") as failure:
                save(out, via(proxy, s3_server_info, attempts=2), 1, "ckpt-1")
            assert f"committing checkpoint {out}/ckpt-1" in str(failure.value)
    assert list_checkpoints(out, clean) == [f"{out}/ckpt-1"]
    assert verify_checkpoint(f"{out}/ckpt-1", clean) == []
    assert bit_exact(load(out, clean), state(1))


# ------------------------------------------------------------------------------ lost replies

@pytest.mark.parametrize("marker", [CLAIM_FILE, "_COMMITTED"])
def test_a_marker_whose_reply_was_lost_commits_exactly_once(s3_server_info, out, clean, marker):
    with FaultProxy(s3_server_info.endpoint_url, fraction=1.0, kinds=("reset_after",), methods=("PUT",),
                    path_pattern=f"/{marker}$", max_faults=1) as proxy:
        options = via(proxy, s3_server_info)
        path = save(out, options, 1, "ckpt-1")  # the retry meets 412, the read-back finds our own marker
        assert proxy.stats()["faults_by_kind"] == {"reset_after": 1}
        proxy.configure(max_faults=2)  # the second saver's marker PUT loses its reply too
        with pytest.raises(CheckpointExistsError, match="already exists"):
            save(out, options, 2, "ckpt-1")
    assert list_checkpoints(out, clean) == [path]
    backend, native = open_backend(path, clean)
    record = read_commit(backend, native)
    assert record.manifest_checksum == checksum_bytes(backend.read_bytes(backend.join(native, MANIFEST_FILE)))
    assert bit_exact(load(out, clean), state(1))


def test_a_refused_claim_whose_reply_was_lost_is_not_taken_for_our_own(s3_server_info, out, clean):
    # Another save holds the id (claimed, still writing). Our conditional PUT is refused by S3 and
    # the refusal is lost; the retry gets 412 too, and reading the marker back shows someone
    # else's bytes: the id is refused, and their claim is left as it was.
    url = f"{out}/ckpt-1"
    backend, native = open_backend(url, clean)
    claim(backend, native, "the-other-save", url)
    theirs = backend.read_bytes(backend.join(native, CLAIM_FILE))
    with FaultProxy(s3_server_info.endpoint_url, fraction=1.0, kinds=("reset_after",), methods=("PUT",),
                    path_pattern=f"/{CLAIM_FILE}$", max_faults=1) as proxy:
        with pytest.raises(CheckpointExistsError, match="being written by another save"):
            save(out, via(proxy, s3_server_info), 1, "ckpt-1")
        assert proxy.stats()["faults_by_kind"] == {"reset_after": 1}
    assert backend.read_bytes(backend.join(native, CLAIM_FILE)) == theirs
    assert list_checkpoints(out, clean) == []


# ---------------------------------------------------------------------------------- deletion

def test_deletion_through_faults_removes_everything(s3_server_info, out, clean):
    paths = [save(out, clean, seed, f"ckpt-{seed}") for seed in (1, 2)]
    with FaultProxy(s3_server_info.endpoint_url, fraction=0.3, kinds=KINDS, seed=3, delay_s=0.05) as proxy:
        delete_checkpoint(paths[0], via(proxy, s3_server_info))
        assert proxy.stats()["faults"] >= 1
    assert list_checkpoints(out, clean) == [paths[1]]
    backend, native = open_backend(paths[0], clean)
    assert backend.list_dir(native) == []


@pytest.mark.parametrize(("failing", "committed_after"), [
    (r"\?delete", False),  # the batched delete of the data: the marker is already gone
    (r"/_COMMITTED$", True),  # the marker's own delete: nothing was deleted, it stays whole
])
def test_a_deletion_that_fails_midway_never_leaves_a_half_deleted_checkpoint_committed(
        s3_server_info, out, clean, failing, committed_after):
    older, newer = (save(out, clean, seed, f"ckpt-{seed}") for seed in (1, 2))
    with FaultProxy(s3_server_info.endpoint_url, fraction=1.0, kinds=("internal_error", "reset"),
                    methods=("POST", "DELETE"), path_pattern=failing) as proxy:
        with pytest.raises(OSError, match="ckpt-2"):
            delete_checkpoint(newer, via(proxy, s3_server_info, attempts=2))
        assert proxy.stats()["faults"] >= 2
    backend, native = open_backend(newer, clean)
    if committed_after:
        assert list_checkpoints(out, clean) == [older, newer]
        assert verify_checkpoint(newer, clean) == []
        assert bit_exact(load(out, clean), state(2))
        return
    assert checkpoint_state(backend, native) is CheckpointState.PARTIAL
    assert list_checkpoints(out, clean) == [older] and latest_checkpoint(out, clean) == older
    with pytest.raises(CheckpointNotFoundError):
        open_reader(newer, clean).read_metadata()
    assert bit_exact(load(out, clean), state(1))
    # What the failed deletion left is a partial checkpoint: the resume-time sweep removes it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert discard_partial_checkpoints(out, clean) == [newer]
    assert backend.list_dir(native) == []


# ------------------------------------------------------------------ the budget after an outage

# Both SDKs' "standard" retry modes put a client-wide quota in front of the per-request budget (500
# tokens, 5 or more a retry, one back per success): about 100 retries, whichever requests made them.
CLIENT_WIDE_QUOTA_RETRIES = 100


def sixteen_tensors(seed: int) -> dict:
    """One data file per tensor with thread_count=16: a save makes 16 uploads."""
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(64, generator=gen) for i in range(16)}


@pytest.mark.parametrize("data_client", DATA_CLIENTS)
def test_every_request_keeps_its_retry_budget_after_a_long_outage(s3_server_info, out, clean, data_client):
    # A long outage fails save after save, spending several times the retries a client-wide quota
    # holds. The store comes back, and the first uploads of the next save meet a short outage:
    # fewer consecutive failures than one request's budget. That save must ride it out, however
    # long the process has run. (The outage resets connections; the short one answers 500, which
    # s3fs's own retry loop leaves to botocore's budget.)
    attempts = 4
    with FaultProxy(s3_server_info.endpoint_url) as proxy:
        options = via(proxy, s3_server_info, data_client, attempts=attempts)

        def save_sixteen(seed: int, checkpoint_id: str) -> str:
            return CheckpointCoordinator([StateComponent("model", Box(sixteen_tensors(seed)), "global")],
                                         output_dir=out, storage_options=options, thread_count=16
                                         ).save_checkpoint(checkpoint_id=checkpoint_id)

        proxy.configure(fraction=1.0, kinds=("reset",), methods=("PUT", "POST"), path_pattern=r"\.distcp")
        outage = 0
        while proxy.stats()["faults"] <= 4 * CLIENT_WIDE_QUOTA_RETRIES:
            with pytest.raises(OSError, match=f"outage-{outage}"):
                save_sixteen(outage, f"outage-{outage}")
            outage += 1
        faults = proxy.stats()["faults"]
        proxy.configure(kinds=("internal_error",), max_faults=faults + attempts - 1)
        saved = save_sixteen(1, "ckpt-1")
        assert proxy.stats()["faults"] == faults + attempts - 1
    assert list_checkpoints(out, clean) == [saved]
    assert verify_checkpoint(saved, clean) == []
    backend, native = open_backend(saved, clean)
    assert len([name for name in backend.list_dir(native) if name.endswith(".distcp")]) == 16


# ------------------------------------------------------------------ connection lost mid-upload

@pytest.mark.parametrize("data_client", DATA_CLIENTS)
def test_a_connection_lost_mid_upload_is_a_connection_error_naming_rank_checkpoint_and_file(
        s3_server_info, out, clean, data_client):
    # 12 MiB in 5 MiB parts: the upload is multipart on either client, so the failure comes while
    # parts are in flight, and discarding the upload (abort, or delete) meets the dead connection too.
    big = {"w": torch.randn(3 * 2**20, generator=torch.Generator().manual_seed(3))}
    with FaultProxy(s3_server_info.endpoint_url) as proxy:
        options = {**via(proxy, s3_server_info, data_client, attempts=2), "default_block_size": 5 * 2**20}
        coordinator_ = CheckpointCoordinator([StateComponent("model", Box(big), "global")], output_dir=out,
                                             storage_options=options, thread_count=1)
        # The multipart upload starts (POST), then every part upload (PUT) and the abort (DELETE)
        # lose their connection.
        proxy.configure(fraction=1.0, kinds=("reset",), methods=("PUT", "DELETE"), path_pattern=r"\.distcp")
        with pytest.raises(ConnectionError) as failure:
            coordinator_.save_checkpoint(checkpoint_id="ckpt-1")
    message = str(failure.value)
    assert "rank 0" in message and f"{out}/ckpt-1" in message and "__0_0.distcp" in message, message
    assert "upload" in message.lower() and s3_server_info.secret_key not in message
    # s3fs's abort of the multipart upload failed on the dead connection too: said in a note, never
    # raised in place of the cause. (Arrow's upload never completed, so there is no object to delete.)
    notes = getattr(failure.value, "__notes__", [])
    assert all("discarding the partly written" in note and "__0_0.distcp" in note for note in notes), notes
    assert len(notes) == (1 if data_client == "s3fs" else 0), notes


# ------------------------------------------------------------------------- what a failed save leaves

@pytest.mark.parametrize("data_client", DATA_CLIENTS)
def test_a_save_of_a_value_it_cannot_store_leaves_no_object(s3_server_info, out, clean, data_client):
    options = {**clean, "data_client": data_client}
    previous = save(out, options, 1, "ckpt-1")
    unstorable = Box({**state(2), "lock": threading.Lock()})
    with pytest.raises(TypeError, match="pickle"):
        coordinator(out, options, unstorable).save_checkpoint(checkpoint_id="ckpt-2")
    backend, native = open_backend(f"{out}/ckpt-2", clean)
    assert backend.list_dir(native) == []
    assert list_checkpoints(out, clean) == [previous] and verify_checkpoint(previous, clean) == []


def test_a_cleanup_the_store_refuses_is_a_note_on_the_cause(s3_server_info, out, clean):
    # The data uploads fail, and so does every delete: the save raises the upload's error, with a
    # note that removing what it wrote failed too. The claim stays (uncommitted, invisible) for
    # discard_partial_checkpoints, as the note says.
    with FaultProxy(s3_server_info.endpoint_url) as proxy:
        options = via(proxy, s3_server_info, attempts=2)
        proxy.configure(fraction=1.0, kinds=("internal_error",), methods=("PUT", "POST", "DELETE"),
                        path_pattern=r"\.distcp|\?delete")
        with pytest.raises(OSError, match=r"rank 0 writing __0_\d\.distcp") as failure:
            save(out, options, 1, "ckpt-1")
    notes = getattr(failure.value, "__notes__", [])
    assert len(notes) == 1 and "removing what the failed save wrote failed too" in notes[0], notes
    assert "discard_partial_checkpoints" in notes[0] and s3_server_info.secret_key not in notes[0]
    backend, native = open_backend(f"{out}/ckpt-1", clean)
    assert checkpoint_state(backend, native) is CheckpointState.PARTIAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert discard_partial_checkpoints(out, clean) == [f"{out}/ckpt-1"]
    assert backend.list_dir(native) == []
