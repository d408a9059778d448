"""How many threads a load reads with: one for local files holding only small items (interpreter work,
which threads contend for), ``thread_count`` where large reads or an object store's round trips are
what threads overlap. Every choice loads the same values."""

from __future__ import annotations

import torch

from dcp_forge import CheckpointCoordinator, StateComponent
from dcp_forge.core.patterns import SharingPattern
from dcp_forge.format.pack import SMALL_ITEM_BYTES
from dcp_forge.storage.item_reader import StoredRead
from dcp_forge.storage.read_batches import BATCH_ITEM_BYTES
from dcp_forge.storage.reader import ForgeStorageReader
from tests.support.statefuls import Box

_PACKED_VALUE = StoredRead("f", 0, 900, (), gap=(100, 300))
_SMALL_BLOB = StoredRead("f", 900, BATCH_ITEM_BYTES, ())
_LARGE_BLOB = StoredRead("f", 2 * BATCH_ITEM_BYTES, BATCH_ITEM_BYTES + 1, ())


def test_local_files_of_small_items_are_read_on_one_thread(tmp_path):
    reader = ForgeStorageReader(tmp_path, thread_count=3)
    assert reader.read_threads([_PACKED_VALUE, _SMALL_BLOB]) == 1
    assert reader.read_threads([_PACKED_VALUE, _SMALL_BLOB, _LARGE_BLOB]) == 3
    assert reader.read_threads([]) == 1


def test_object_stores_keep_their_threads():
    reader = ForgeStorageReader("memory://threads/ckpt", thread_count=3)
    assert reader.read_threads([_PACKED_VALUE, _SMALL_BLOB]) == 3


def test_small_and_large_items_load_exactly_whatever_the_threads(tmp_path):
    gen = torch.Generator().manual_seed(0)
    small = {f"s{i}": torch.randn(i + 1, generator=gen) for i in range(40)}
    large = {"w": torch.randn(SMALL_ITEM_BYTES, generator=gen)}
    for name, state in (("small", small), ("mixed", {**small, **large})):
        box = Box({k: v.clone() for k, v in state.items()})
        coord = CheckpointCoordinator([StateComponent("m", box, SharingPattern.REPLICATED)], output_dir=tmp_path,
                                      thread_count=2)
        path = coord.save_checkpoint(checkpoint_path=str(tmp_path / name))
        for value in box.state.values():
            value.zero_()
        coord.load_checkpoint(path)
        assert all(torch.equal(box.state[k], v) for k, v in state.items()), name
