"""Does a checkpoint hold what its own records say? The checks shared by loading and ``verify``.

A committed checkpoint carries a chain of checksums, each file vouching for the next:

    _COMMITTED --manifest_checksum--> checkpoint_manifest.json --files--> .metadata, index.parquet
    index.parquet --one xxh3 per stored item--> the bytes in the data files

Loading walks the first links (cheap: small files it reads anyway) and checks each item as it reads
it; ``dcp_forge.ops.verify.verify_checkpoint`` walks all of them. Checks here *collect* ``Problem``s
instead of raising, so ``verify`` can report everything that is wrong at once; loading raises the
first one as an ``IntegrityError``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, TypeGuard

import pyarrow as pa
import pyarrow.compute as pc

from ..core.keys import parse_storage_key, top_level_key
from ..core.patterns import SharingPattern
from ..errors import CheckpointNotFoundError, IntegrityError, UnsafeCheckpointError, UnsupportedFormatError
from ..format.index import ItemRecord, read_index_table, records_from_table
from ..format.manifest import CheckpointManifest, checksum_bytes
from ..format.names import COMMIT_FILE, INDEX_FILE, MANIFEST_FILE, METADATA_FILE
from .backends import StorageBackend
from .files import unsafe_file_name
from .lifecycle import CommitRecord

if TYPE_CHECKING:  # torch stays unimported: inspection tools check the record chain without it
    from torch.distributed.checkpoint.metadata import Metadata


class ProblemKind(Enum):
    MISSING_CHECKPOINT = "missing_checkpoint"  # nothing at the URL
    NOT_COMMITTED = "not_committed"  # claimed or partly written, no commit marker
    MISSING_FILE = "missing_file"
    TRUNCATED = "truncated"  # a data file ends before an item it should hold
    TRAILING_BYTES = "trailing_bytes"  # a data file is longer than the items recorded in it
    CHECKSUM_MISMATCH = "checksum_mismatch"  # stored bytes differ from their recorded checksum
    STALE_MANIFEST = "stale_manifest"  # the manifest is not the one the commit marker vouches for
    MALFORMED = "malformed"  # a record file cannot be parsed
    UNSUPPORTED_VERSION = "unsupported_version"  # written by a newer dcp_forge
    UNSAFE = "unsafe"  # a record needs code execution to read, or points outside the checkpoint
    INCOMPLETE = "incomplete"  # metadata, index and manifest disagree on what is stored
    WRONG_LAYOUT = "wrong_layout"  # the index places a tensor elsewhere in its blob than the blob's zip does


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint: what, in which file, for which component."""

    kind: ProblemKind
    message: str  # full sentence, names the checkpoint, file, component and expected vs found
    file: str | None = None  # file name inside the checkpoint directory
    component: str | None = None

    def __str__(self) -> str:
        return self.message


_ERROR_OF_KIND: dict[ProblemKind, type[Exception]] = {
    ProblemKind.MISSING_CHECKPOINT: CheckpointNotFoundError,
    ProblemKind.NOT_COMMITTED: CheckpointNotFoundError,
    ProblemKind.UNSUPPORTED_VERSION: UnsupportedFormatError,
    ProblemKind.UNSAFE: UnsafeCheckpointError,
}


def raise_if_problems(problems: list[Problem]) -> None:
    """Raise the first problem as the error its kind means (IntegrityError unless listed above)."""
    if not problems:
        return
    more = f" (and {len(problems) - 1} more problem(s); run dcp-forge verify for all)" if len(problems) > 1 else ""
    raise _ERROR_OF_KIND.get(problems[0].kind, IntegrityError)(problems[0].message + more)


@dataclass(frozen=True)
class RecordFiles:
    """The small files of a checkpoint as stored (``None``: the file does not exist)."""

    commit: bytes | None
    manifest: bytes | None
    metadata: bytes | None
    index: bytes | None

    @classmethod
    def read(cls, backend: StorageBackend, path: str) -> RecordFiles:
        def read(name: str) -> bytes | None:
            try:
                return backend.read_bytes(backend.join(path, name))
            except FileNotFoundError:
                return None

        # In parallel: on object storage each read is a round trip, and a load waits for all four.
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="forge-records") as pool:
            return cls(*pool.map(read, (COMMIT_FILE, MANIFEST_FILE, METADATA_FILE, INDEX_FILE)))


def record_problems(files: RecordFiles, where: str, vouched: tuple[str, ...] = (METADATA_FILE, INDEX_FILE)
                    ) -> tuple[CheckpointManifest | None, list[Problem]]:
    """Check the chain marker → manifest → .metadata / index of a *committed* checkpoint.

    ``where`` is the checkpoint's URL without credentials, for messages; ``vouched``: which of the
    files the manifest vouches for to check (tools that never read ``.metadata`` leave it out).
    Returns the parsed manifest (None if it is unusable) and the problems found.
    """
    problems: list[Problem] = []
    record: CommitRecord | None = None
    if files.commit is None:
        problems.append(Problem(ProblemKind.NOT_COMMITTED, f"{where} has no {COMMIT_FILE} marker", COMMIT_FILE))
    else:
        try:
            record = CommitRecord.from_bytes(files.commit, f"{where}/{COMMIT_FILE}")
        except IntegrityError as err:
            problems.append(Problem(ProblemKind.MALFORMED, str(err), COMMIT_FILE))

    manifest: CheckpointManifest | None = None
    if files.manifest is None:
        problems.append(Problem(ProblemKind.MISSING_FILE, f"{where} is missing {MANIFEST_FILE}", MANIFEST_FILE))
    else:
        found = checksum_bytes(files.manifest)
        if record is not None and record.manifest_checksum is not None and found != record.manifest_checksum:
            problems.append(Problem(
                ProblemKind.STALE_MANIFEST,
                f"{where}/{MANIFEST_FILE} is not the manifest this checkpoint was committed with (checksum "
                f"{found}, {COMMIT_FILE} says {record.manifest_checksum}): it was replaced or edited after "
                "the commit", MANIFEST_FILE))
        try:
            manifest = CheckpointManifest.from_json(files.manifest)
        except UnsupportedFormatError as err:
            problems.append(Problem(ProblemKind.UNSUPPORTED_VERSION, f"{where}/{MANIFEST_FILE}: {err}", MANIFEST_FILE))
        except IntegrityError as err:
            problems.append(Problem(ProblemKind.MALFORMED, f"{where}/{MANIFEST_FILE}: {err}", MANIFEST_FILE))

    for name, data in ((METADATA_FILE, files.metadata), (INDEX_FILE, files.index)):
        if name not in vouched:
            continue
        if data is None:
            problems.append(Problem(ProblemKind.MISSING_FILE, f"{where} is missing {name}", name))
            continue
        expected = manifest.files.get(name) if manifest is not None else None
        if manifest is not None and expected is None:
            problems.append(Problem(ProblemKind.INCOMPLETE, f"{where}/{MANIFEST_FILE} records no checksum "
                                    f"for {name}", MANIFEST_FILE))
        elif expected is not None and checksum_bytes(data) != expected:
            problems.append(Problem(
                ProblemKind.CHECKSUM_MISMATCH,
                f"{where}/{name} does not match the manifest (checksum {checksum_bytes(data)}, manifest "
                f"says {expected}): the file was changed or replaced after the commit", name))
    return manifest, problems


def parse_index(data: bytes | None, where: str) -> tuple[list[ItemRecord], list[Problem]]:
    """The rows of ``index.parquet``, or the problem that keeps them from being read."""
    if data is None:
        return [], [Problem(ProblemKind.MISSING_FILE, f"{where} is missing {INDEX_FILE}", INDEX_FILE)]
    try:
        table = read_index_table(data)
        records = records_from_table(table)
    except (pa.ArrowException, OSError, ValueError, TypeError, KeyError) as err:
        return [], [Problem(ProblemKind.MALFORMED, f"{where}/{INDEX_FILE} is not a readable index: {err}",
                            INDEX_FILE)]
    bad = sorted(name for name in {r.file for r in records} if unsafe_file_name(name))
    if bad:
        return [], [Problem(ProblemKind.UNSAFE, f"{where}/{INDEX_FILE} names data files outside the checkpoint "
                            f"directory: {bad[:3]}", INDEX_FILE)]
    malformed = [] if _rows_well_formed(table, records) else _malformed_rows(records)
    if malformed:
        return [], [Problem(ProblemKind.MALFORMED, f"{where}/{INDEX_FILE} is not a consistent index: "
                            f"{'; '.join(malformed[:3])}" + (f" (and {len(malformed) - 3} more)" if len(malformed) > 3
                                                              else ""), INDEX_FILE)]
    return records, []


def _is_count(value: object) -> TypeGuard[int]:
    """A non-negative int (not a bool): what a row's offsets, lengths and ranks must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rows_well_formed(table: pa.Table, records: list[ItemRecord]) -> bool:
    """Whether ``_malformed_rows`` finds nothing, proven column by column in one vectorised pass; False
    when it cannot be proven that way (then ``_malformed_rows`` looks row by row and says what is wrong).

    The same conditions as ``_row_problem``'s, over whole columns: extents and ranks present and
    non-negative, gaps inside their items (sums checked for overflow), packed tensors with a data
    offset, known kinds with a shape exactly for tensors, each distinct (storage key, component,
    pattern) consistent and every fqn under its storage key; then no two rows for one location or chunk.
    """
    if not table.num_rows:
        return True
    col = table.column
    try:
        for name in ("offset", "length", "rank"):
            if col(name).null_count or pc.min(col(name)).as_py() < 0:
                return False
        for name in ("data_offset", "gap_offset", "gap_length"):
            low = pc.min(col(name)).as_py()
            if low is not None and low < 0:
                return False
        gap_offset, gap_length = col("gap_offset"), col("gap_length")
        if not pc.all(pc.equal(pc.is_null(gap_offset), pc.is_null(gap_length))).as_py():
            return False
        if pc.any(pc.greater(pc.add_checked(gap_offset, gap_length), col("length"))).as_py():
            return False
        kind = col("kind")
        if kind.null_count or not pc.all(pc.is_in(kind, pa.array(["tensor", "bytes"]))).as_py():
            return False
        tensor = pc.equal(kind, "tensor")
        if not pc.all(pc.equal(tensor, pc.is_valid(col("shape")))).as_py():
            return False
        if pc.any(pc.and_(pc.and_(pc.is_valid(gap_offset), tensor), pc.is_null(col("data_offset")))).as_py():
            return False
        keys = table.select(["storage_key", "component", "pattern", "fqn"])
        if any(keys.column(name).null_count for name in keys.column_names):
            return False
        top = pc.list_element(pc.split_pattern(keys.column("fqn"), ".", max_splits=1), 0)
        if not pc.all(pc.equal(top, keys.column("storage_key"))).as_py():
            return False
    except pa.ArrowInvalid:  # an overflowing gap: the row-by-row pass says which row
        return False
    distinct = keys.select(["storage_key", "component", "pattern"]).group_by(
        ["storage_key", "component", "pattern"]).aggregate([])
    for key, component, pattern in zip(*(distinct.column(n).to_pylist() for n in ("storage_key", "component",
                                                                                    "pattern")), strict=True):
        if _component_of_key(key) != component or not _pattern_fits_key(pattern, key):
            return False
    rows = table.num_rows
    if table.select(["file", "offset"]).group_by(["file", "offset"]).aggregate([]).num_rows != rows:
        return False  # two rows for one location
    # each fqn on one row (tensors stored whole) has one row per chunk; else compare the chunks
    return (pc.count_distinct(keys.column("fqn")).as_py() == rows
            or len({(r.fqn, r.chunk_offsets or ()) for r in records}) == rows)


def _malformed_rows(records: list[ItemRecord]) -> list[str]:
    """Rows no writer produces: negative extents, a key that does not match its fqn, two rows for one
    location or one chunk (a reader finds rows by either, and must find the same one)."""
    found = []
    locations: set[tuple[str, int]] = set()
    chunks: set[tuple[str, tuple[int, ...]]] = set()
    keys: dict[tuple[str, str, str], bool] = {}  # (storage key, component, pattern) -> consistent; few distinct
    for r in records:
        consistent = keys.get((r.storage_key, r.component, r.pattern))
        if consistent is None:
            consistent = keys[(r.storage_key, r.component, r.pattern)] = (
                _component_of_key(r.storage_key) == r.component and _pattern_fits_key(r.pattern, r.storage_key))
        why = _row_problem(r, consistent)  # the row's description is only formatted for a problem
        if why is None and r.location in locations:
            why = ": two rows for one stored location"
        elif why is None and (r.fqn, tuple(r.chunk_offsets or ())) in chunks:
            why = f": two rows for chunk {list(r.chunk_offsets or ())} of {r.fqn!r}"
        if why is not None:
            found.append(f"row of {r.fqn!r} in {r.file} at byte {r.offset}{why}")
        locations.add(r.location)
        chunks.add((r.fqn, tuple(r.chunk_offsets or ())))
    return found


def _row_problem(r: ItemRecord, consistent: bool) -> str | None:
    """What makes one row impossible on its own, to follow its description (``consistent``: its key,
    component and pattern fit)."""
    if not (_is_count(r.offset) and _is_count(r.length) and _is_count(r.rank)
            and (r.data_offset is None or _is_count(r.data_offset))):
        return " has a negative or missing offset, length, data offset or rank"
    if (r.gap_offset is None) != (r.gap_length is None) or (r.gap_offset is not None and not (
            _is_count(r.gap_offset) and _is_count(r.gap_length) and r.gap_offset + r.gap_length <= r.length)):
        return f" has a gap ({r.gap_offset}, {r.gap_length}) that is not inside its {r.length} bytes"
    if r.gap_offset is not None and r.kind == "tensor" and r.data_offset is None:
        return " is a packed tensor without a data offset"
    if r.kind not in ("tensor", "bytes") or (r.kind == "tensor") != (r.shape is not None):
        return f" is of unknown kind {r.kind!r}"
    if not consistent or r.storage_key != top_level_key(r.fqn):
        return (f" names storage key {r.storage_key!r}, component {r.component!r} and pattern {r.pattern!r}, "
                "which do not fit its fqn and each other")
    return None


def _component_of_key(key: str) -> str | None:
    try:
        return parse_storage_key(key).component
    except ValueError:
        return None


def _pattern_fits_key(pattern: object, key: str) -> bool:
    """Namespaced keys name their pattern; plain keys are GLOBAL or REPLICATED (keys.py)."""
    try:
        namespaced = parse_storage_key(key).pattern
    except ValueError:
        return False
    if namespaced is not None:
        return pattern == namespaced.value
    return pattern in (SharingPattern.GLOBAL.value, SharingPattern.REPLICATED.value)


def component_of(fqn: str) -> str:
    """The component an fqn belongs to (its storage key's component; the key itself if unparseable)."""
    key = top_level_key(fqn)
    return _component_of_key(key) or key


def storage_location_problems(metadata: Metadata, where: str) -> list[Problem]:
    """Every location in DCP's metadata must be a file directly inside the checkpoint directory, with a
    non-negative offset and length."""
    infos = list(metadata.storage_data.values())
    verdicts: dict[str, bool] = {}  # str name -> unsafe: thousands of items name a few files

    def unsafe(name: object) -> bool:
        if type(name) is not str:
            return unsafe_file_name(name)
        verdict = verdicts.get(name)
        if verdict is None:
            verdict = verdicts[name] = unsafe_file_name(name)
        return verdict

    bad = sorted({repr(getattr(info, "relative_path", info)) for info in infos
                  if unsafe(getattr(info, "relative_path", None))})
    if bad:
        return [Problem(ProblemKind.UNSAFE, f"{where}/{METADATA_FILE} points at data files outside the checkpoint "
                        f"directory (refusing to read them): {', '.join(bad[:3])}", METADATA_FILE)]
    malformed = sorted((index.fqn, info.relative_path, repr(getattr(info, "offset", None)),
                        repr(getattr(info, "length", None)))
                       for index, info in metadata.storage_data.items()
                       if not (_is_count(getattr(info, "offset", None)) and _is_count(getattr(info, "length", None))))
    if malformed:
        fqn, file, offset, length = malformed[0]
        return [Problem(ProblemKind.MALFORMED, f"{where}/{METADATA_FILE} records {len(malformed)} malformed "
                        f"location(s), e.g. {fqn!r} in {file} at offset {offset} with length {length} (both must "
                        "be non-negative ints)", METADATA_FILE, component_of(fqn))]
    return []
