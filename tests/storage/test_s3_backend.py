"""The S3 backend's data path against the real SeaweedFS fixture: both data clients round-trip bit-exactly.

The default data client (``auto``) and the s3fs fallback (asked for, or chosen by ``auto`` because an
option only s3fs understands is set) each save and load a state whose large tensor spans several
multipart parts and is read back as parallel ranges; checkpoints written by one client load with the
other. Throughput is measured by ``benchmarks/s3.py``, not here.
"""

from __future__ import annotations

import threading

import pytest
import torch

from dcp_forge import CheckpointCoordinator, SharingPattern, StateComponent
from dcp_forge.storage import arrow_io
from dcp_forge.storage.registry import open_backend

pytest.importorskip("s3fs")

# Above 2 x RANGE_BYTES (read as parallel ranges) and 2 x PART_BYTES (three parts, the last partial).
BIG_ELEMENTS = (2 * max(arrow_io.RANGE_BYTES, arrow_io.PART_BYTES) + 3 * 2**20 + 12) // 4


class TensorState:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict:
        return self.tensors

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if value is not self.tensors[key]:
                self.tensors[key].copy_(value)


def make_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"big": torch.randn(BIG_ELEMENTS, generator=gen),
            "small": torch.randn(3, 5, generator=gen),
            "ints": torch.randint(0, 1 << 30, (1000,), generator=gen, dtype=torch.int64),
            "half": torch.randn(4096, generator=gen).to(torch.bfloat16)}


def coordinator(url: str, options: dict, tensors: dict[str, torch.Tensor]) -> CheckpointCoordinator:
    return CheckpointCoordinator([StateComponent("model", TensorState(tensors), SharingPattern.REPLICATED)],
                                 output_dir=url, storage_options=options)


def roundtrip(url: str, save_options: dict, load_options: dict, seed: int) -> None:
    state = make_state(seed)
    path = coordinator(url, save_options, state).save_checkpoint(checkpoint_id="ckpt")
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    coordinator(url, load_options, target).load_checkpoint(path)
    for key, value in state.items():
        # Bitwise: compare the raw bytes, not values (NaN-safe, dtype-exact).
        assert target[key].view(torch.uint8).equal(value.view(torch.uint8)), key


def data_client(url: str, options: dict) -> str:
    return open_backend(url, options)[0].data_client


def test_default_data_client_round_trips(s3_url, s3_storage_options):
    assert data_client(s3_url, s3_storage_options) == "arrow"  # the measured faster client
    roundtrip(s3_url, s3_storage_options, s3_storage_options, seed=1)


@pytest.mark.parametrize("save_client,load_client", [("s3fs", "s3fs"), ("arrow", "s3fs"), ("s3fs", "arrow")])
def test_s3fs_fallback_round_trips_and_interoperates(s3_url, s3_storage_options, save_client, load_client):
    save = {**s3_storage_options, "data_client": save_client}
    load = {**s3_storage_options, "data_client": load_client}
    assert data_client(s3_url, save) == save_client
    roundtrip(s3_url, save, load, seed=2)


def test_auto_falls_back_to_s3fs_for_s3fs_only_options(s3_url, s3_storage_options):
    options = {**s3_storage_options, "s3_additional_kwargs": {"Metadata": {"origin": "test"}}}
    assert data_client(s3_url, options) == "s3fs"
    roundtrip(s3_url, options, options, seed=3)


def test_part_sizes_stay_within_s3_limits():
    assert arrow_io.part_size(0) == arrow_io.PART_BYTES >= 5 * 2**20  # S3's minimum for all but the last part
    assert arrow_io.part_size(999) == arrow_io.PART_BYTES and arrow_io.part_size(1000) == 2 * arrow_io.PART_BYTES
    assert arrow_io.part_size(9999) <= arrow_io.MAX_PART_BYTES
    assert sum(arrow_io.part_size(i) for i in range(10_000)) > 10 * 2**40  # 10,000 parts hold > 10 TiB


def test_large_reads_are_split_into_bounded_ranges():
    MiB = 2**20
    assert arrow_io.range_step(MiB) == MiB and arrow_io.range_step(2 * arrow_io.RANGE_BYTES - 1) == 2 * arrow_io.RANGE_BYTES - 1
    for length in (2 * arrow_io.RANGE_BYTES, 64 * MiB + 5, 3 * 2**30 + 7):
        step = arrow_io.range_step(length)
        assert arrow_io.RANGE_BYTES // 2 < step <= arrow_io.RANGE_BYTES


def test_upload_with_one_part_in_flight_completes(s3_url, s3_storage_options):
    """Part buffers are given back as uploads finish: with one slot, writing many parts must not stall."""
    backend, path = open_backend(s3_url, s3_storage_options)
    payload = torch.randint(0, 256, (3 * 5 * 2**20 + 17,), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    raw = memoryview(payload.numpy())
    out = arrow_io.ArrowOutput(backend.arrow_fs, backend.join(path, "obj"), part_bytes=5 * 2**20, max_in_flight=1)
    done = threading.Event()

    def write() -> None:
        for start in range(0, len(raw), 3 * 2**20):  # writes that straddle part boundaries
            out.write(raw[start:start + 3 * 2**20])
        out.close()
        done.set()
    threading.Thread(target=write, daemon=True).start()
    assert done.wait(120), "upload stalled: part buffers were not released after their uploads"
    assert backend.read_bytes(backend.join(path, "obj")) == raw.tobytes()


def test_a_load_reads_each_blob_where_the_index_says_on_one_handle_per_object(s3_server_info, s3_url):
    """Each data object is opened once (opening costs a HEAD; edge windows are read positionally on
    that handle) and each recorded tensor arrives in one GET, its edges from the prefetched windows."""
    from tests.support.fault_proxy import FaultProxy
    from tests.support.object_store import storage_options_for

    gen = torch.Generator().manual_seed(5)
    state = {f"t{i}": torch.randn(2**18 + i, generator=gen) for i in range(6)}  # ~1 MiB each, all recorded
    with FaultProxy(s3_server_info.endpoint_url) as proxy:  # faults off: it relays and counts
        options = {**storage_options_for(s3_server_info), "endpoint_url": proxy.endpoint_url, "data_client": "arrow"}
        path = coordinator(s3_url, options, state).save_checkpoint(checkpoint_id="ckpt")
        proxy.reset_stats()
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        coordinator(s3_url, options, target).load_checkpoint(path)
        requests = [(method, target_path) for _, method, target_path, _ in proxy.events()]
    assert all(torch.equal(target[k], state[k]) for k in state)
    data = [(method, p.rsplit("/", 1)[1]) for method, p in requests if p.endswith(".distcp")]
    heads = [name for method, name in data if method == "HEAD"]
    assert sorted(heads) == sorted(set(heads)) and heads  # one handle per object
    gets = sum(method == "GET" for method, _ in data)
    assert gets <= 2 * len(state) + len(heads)  # a GET per tensor, about one small window per blob


@pytest.mark.parametrize("data_client", ["arrow", "s3fs"])
def test_a_load_costs_no_request_per_small_item_and_none_for_zip_records(s3_server_info, s3_url, data_client):
    """Requests per load, counted at the proxy: the records in one listing and one GET each (no HEAD
    first), per data object one open, one GET per large tensor straight into place, one GET for the
    trailers of each large pack, one for each run of small items (packs): nothing per small item, and
    no request for any tensor's zip header or trailer alone."""
    from tests.support.fault_proxy import FaultProxy
    from tests.support.object_store import storage_options_for

    gen = torch.Generator().manual_seed(6)
    large = {f"w{i}": torch.randn(2**18 + i, generator=gen) for i in range(6)}  # ~1 MiB each: large packs
    small = {f"norm{i}": torch.randn(64, generator=gen) for i in range(60)}
    state = {**large, **small}
    with FaultProxy(s3_server_info.endpoint_url) as proxy:  # faults off: it relays and counts
        options = {**storage_options_for(s3_server_info), "endpoint_url": proxy.endpoint_url,
                   "data_client": data_client}
        path = coordinator(s3_url, options, state).save_checkpoint(checkpoint_id="ckpt")
        proxy.reset_stats()
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        coordinator(s3_url, options, target).load_checkpoint(path)
        requests = [(method, target_path.split("?")[0]) for _, method, target_path, _ in proxy.events()]
    assert all(torch.equal(target[k], state[k]) for k in state)
    data = [(method, p.rsplit("/", 1)[1]) for method, p in requests if p.endswith(".distcp")]
    records = [(method, p) for method, p in requests if not p.endswith(".distcp")]
    objects = {name for _, name in data}
    assert len(records) <= 5 and not [r for r in records if r[0] == "HEAD"], records  # a listing, 4 GETs
    assert sum(method == "HEAD" for method, _ in data) <= len(objects)  # opening an object: at most a HEAD
    # one GET per large tensor, per large pack's trailers and per run of small items in each object
    assert sum(method == "GET" for method, _ in data) <= len(large) + 2 * len(objects), data
