"""File names inside a checkpoint directory (the on-storage contract, see docs/FORMAT.md)."""

from __future__ import annotations

import re
import uuid
from typing import Any

from ..errors import ComponentDeclarationError, expect_type

METADATA_FILE = ".metadata"  # DCP's own metadata (plain dcp.load reads it)
MANIFEST_FILE = "checkpoint_manifest.json"
INDEX_FILE = "index.parquet"  # one row per stored item: where it is and its checksum
CLAIM_FILE = "_CLAIMED"  # created exclusively when a save starts: one saver per checkpoint id
COMMIT_FILE = "_COMMITTED"  # created exclusively last: the checkpoint exists from this moment
TIER_FILE = "_TIER"  # which tier this copy belongs to (a local node's part, a drained remote copy): tier_record.py
DATA_SUFFIX = ".distcp"
# Every file a dcp_forge save writes besides DCP's own: a directory holding any of them is never
# taken for a plain DCP checkpoint (whose .metadata and data files nobody vouches for).
FORGE_RECORDS = (CLAIM_FILE, COMMIT_FILE, MANIFEST_FILE, INDEX_FILE, TIER_FILE)
# dcp_forge's save ids (in the claim, the commit marker and .metadata's storage_meta) start with this,
# so a .metadata says that it was written by dcp_forge even when the other records are gone.
SAVE_ID_PREFIX = "dcp_forge-"

_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-=+]{0,254}$")


def data_file_name(rank: int, index: int) -> str:
    """Same naming as DCP's FileSystemWriter: ``__<rank>_<n>.distcp``."""
    return f"__{rank}_{index}{DATA_SUFFIX}"


def validate_checkpoint_id(checkpoint_id: object) -> str:
    """A checkpoint id is one path segment: it cannot escape output_dir or hide among our files."""
    checkpoint_id = expect_type("checkpoint_id", checkpoint_id, str)
    if not _ID_RE.match(checkpoint_id) or ".." in checkpoint_id:
        raise ComponentDeclarationError(
            "'checkpoint_id' must be one path segment of letters, digits and '_.-=+', not starting "
            f"with '.' or containing '..' (got {checkpoint_id!r})"
        )
    return checkpoint_id


def new_save_id() -> str:
    """A unique id for one save, recognisably dcp_forge's (``SAVE_ID_PREFIX``)."""
    return f"{SAVE_ID_PREFIX}{uuid.uuid4().hex}"


def written_by_dcp_forge(storage_meta: Any) -> bool:
    """Whether DCP ``StorageMeta`` from a ``.metadata`` carries a dcp_forge save id."""
    save_id = getattr(storage_meta, "save_id", None)
    return isinstance(save_id, str) and save_id.startswith(SAVE_ID_PREFIX)


def stripped_checkpoint_message(where: str) -> str:
    """Why a dcp_forge checkpoint whose own records are all gone is refused (rather than read as plain DCP)."""
    return (f"{where} was written by dcp_forge ({METADATA_FILE} carries its save id) but holds none of its "
            f"records ({', '.join(FORGE_RECORDS)}): they were removed, and nothing vouches for its data any more. "
            "Refusing to load it as a plain DCP checkpoint")
