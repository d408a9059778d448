"""Damaging checkpoints on purpose, the way disks, people and attackers do (for integrity tests).

``reseal`` recomputes every record (index checksums, manifest, commit marker) after a deliberate
change, so a test can check the defences *behind* the checksums (safe unpickling, path checks,
format versions) on a checkpoint whose checksums all agree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import torch
import xxhash
from torch.distributed.checkpoint.metadata import MetadataIndex

from dcp_forge.format.index import decode_index, encode_index, own_pieces
from dcp_forge.format.manifest import CheckpointManifest, checksum_bytes, combine_checksums
from dcp_forge.format.names import COMMIT_FILE, INDEX_FILE, MANIFEST_FILE, METADATA_FILE


def data_files(path: str | os.PathLike) -> list[str]:
    return sorted(name for name in os.listdir(path) if name.endswith(".distcp"))


def flip_byte(file: str | os.PathLike, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def flip_value_byte(path: str | os.PathLike, record, needle: bytes) -> None:
    """Flip a byte inside the stored value ``needle`` (raw tensor bytes) of index row ``record``."""
    file = os.path.join(path, record.file)
    with open(file, "rb") as f:
        f.seek(record.offset)
        at = f.read(record.length).find(needle)
    if at < 0:
        raise LookupError(f"{needle[:8]!r}... is not stored in {record.fqn}")
    flip_byte(file, record.offset + at + len(needle) // 2)


def truncate(file: str | os.PathLike, drop: int) -> None:
    size = os.path.getsize(file)
    os.truncate(file, max(0, size - drop))


def read_metadata(path: str | os.PathLike):
    with open(os.path.join(path, METADATA_FILE), "rb") as f:
        return pickle.load(f)  # our own test checkpoint: trusted


def write_metadata(path: str | os.PathLike, metadata) -> None:
    with open(os.path.join(path, METADATA_FILE), "wb") as f:
        pickle.dump(metadata, f)


def replace_item_bytes(path: str | os.PathLike, fqn: str, payload: bytes) -> None:
    """Make the stored item ``fqn`` hold ``payload``: appended to its file, locations updated."""
    metadata = read_metadata(path)
    index = next(i for i in metadata.storage_data if i.fqn == fqn)
    info = metadata.storage_data[index]
    file = os.path.join(path, info.relative_path)
    offset = os.path.getsize(file)
    with open(file, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload))
    write_metadata(path, metadata)
    if not os.path.exists(os.path.join(path, INDEX_FILE)):
        return  # a plain DCP checkpoint: .metadata is the only record
    # The row now describes a zip of its own: no gap (it was perhaps packed), no recorded tensor offset.
    records = [dataclasses.replace(r, offset=offset, length=len(payload), data_offset=None, gap_offset=None,
                                   gap_length=None) if r.fqn == fqn else r
               for r in decode_index(Path(os.path.join(path, INDEX_FILE)).read_bytes())]
    with open(os.path.join(path, INDEX_FILE), "wb") as f:
        f.write(encode_index(records))


def edit_metadata(path: str | os.PathLike, edit) -> None:
    """Apply ``edit(metadata)`` (in place) to ``.metadata``, then ``reseal`` (when there is an index)."""
    metadata = read_metadata(path)
    edit(metadata)
    write_metadata(path, metadata)
    if os.path.exists(os.path.join(path, INDEX_FILE)):
        reseal(path)


def edit_index(path: str | os.PathLike, edit) -> None:
    """Replace the index rows by ``edit(rows)``, then ``reseal``."""
    index = os.path.join(path, INDEX_FILE)
    records = edit(decode_index(Path(index).read_bytes()))
    with open(index, "wb") as f:
        f.write(encode_index(records))
    reseal(path)


def drop_chunks(path, fqn: str, which) -> None:
    """Remove chunks ``which(chunks)`` of ``fqn`` from .metadata and the index, then reseal."""
    def edit(metadata):
        md = metadata.state_dict_metadata[fqn]
        gone = which(md.chunks)
        md.chunks = [c for c in md.chunks if c not in gone]
        for chunk in gone:
            del metadata.storage_data[MetadataIndex(fqn, chunk.offsets)]
        dropped.extend(tuple(c.offsets) for c in gone)

    dropped: list[tuple[int, ...]] = []
    edit_metadata(path, edit)
    edit_index(path, lambda rows: [r for r in rows if not (r.fqn == fqn and tuple(r.chunk_offsets) in dropped)])


def move_chunk(path, fqn: str, delta: int) -> None:
    """Move the second chunk of ``fqn`` ``delta`` rows up, in .metadata and the index alike."""
    def edit(metadata):
        md = metadata.state_dict_metadata[fqn]
        chunk = md.chunks[1]
        moved = dataclasses.replace(chunk, offsets=torch.Size([chunk.offsets[0] + delta, *chunk.offsets[1:]]))
        md.chunks[1] = moved
        metadata.storage_data[MetadataIndex(fqn, moved.offsets)] = metadata.storage_data.pop(
            MetadataIndex(fqn, chunk.offsets))
        offsets.append((tuple(chunk.offsets), tuple(moved.offsets)))

    offsets: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    edit_metadata(path, edit)
    old, new = offsets[0]
    edit_index(path, lambda rows: [dataclasses.replace(r, chunk_offsets=new) if r.fqn == fqn
                                   and tuple(r.chunk_offsets) == old else r for r in rows])


def set_data_offsets(path: str | os.PathLike, change) -> None:
    """Record ``change(record)`` as each index row's ``data_offset``, then ``reseal``."""
    index = os.path.join(path, INDEX_FILE)
    records = [dataclasses.replace(r, data_offset=change(r)) for r in decode_index(Path(index).read_bytes())]
    with open(index, "wb") as f:
        f.write(encode_index(records))
    reseal(path)


def reseal(path: str | os.PathLike, manifest_edit=None) -> None:
    """Recompute item checksums, the index, the manifest and the commit marker from what is stored.

    ``manifest_edit(dict)`` may change the manifest's JSON before it is sealed.
    """
    index_file = os.path.join(path, INDEX_FILE)
    records = []
    for r in decode_index(Path(index_file).read_bytes()):
        if r.offset < 0 or r.length < 0 or not os.path.isfile(os.path.join(path, r.file)):
            records.append(r)  # nothing there to checksum: the row stays as edited
            continue
        with open(os.path.join(path, r.file), "rb") as f:
            f.seek(r.offset)
            data = f.read(max(0, min(r.length, os.fstat(f.fileno()).st_size - r.offset)))
        if r.gap_offset is not None and r.gap_length is not None:  # a packed item: its own bytes only
            data = b"".join(data[start:start + length] for start, length in own_pieces(r.length, r.gap_offset,
                                                                                        r.gap_length))
        records.append(dataclasses.replace(r, checksum=xxhash.xxh3_64_hexdigest(data)))
    index_bytes = encode_index(records)
    with open(index_file, "wb") as f:
        f.write(index_bytes)
    metadata_bytes = Path(os.path.join(path, METADATA_FILE)).read_bytes()
    manifest_file = os.path.join(path, MANIFEST_FILE)
    manifest = CheckpointManifest.from_json(Path(manifest_file).read_bytes())
    for component in manifest.components.values():
        for skey, copy in component.copies.items():
            rows = [r for r in records if r.storage_key == skey]
            copy.size_bytes = sum(r.stored_bytes for r in rows)
            copy.checksum = combine_checksums([r.checksum for r in rows])
            copy.writers = sorted({r.rank for r in rows})
        component.ranks = sorted({w for c in component.copies.values() for w in c.writers})
        component.size_bytes = sum(c.size_bytes for c in component.copies.values())
        component.checksum = combine_checksums([c.checksum for c in component.copies.values()])
    manifest.files = {METADATA_FILE: checksum_bytes(metadata_bytes), INDEX_FILE: checksum_bytes(index_bytes)}
    data = json.loads(manifest.to_json())
    if manifest_edit is not None:
        manifest_edit(data)
    manifest_bytes = json.dumps(data, indent=2, sort_keys=True).encode()
    with open(manifest_file, "wb") as f:
        f.write(manifest_bytes)
    marker_file = os.path.join(path, COMMIT_FILE)
    marker = json.loads(Path(marker_file).read_bytes())
    marker["manifest_checksum"] = checksum_bytes(manifest_bytes)
    with open(marker_file, "w") as f:
        json.dump(marker, f)
