"""File names inside a checkpoint directory (the on-storage contract, see docs/FORMAT.md)."""

from __future__ import annotations

import re

from ..errors import ComponentDeclarationError, expect_type

METADATA_FILE = ".metadata"  # DCP's own metadata (plain dcp.load reads it)
MANIFEST_FILE = "checkpoint_manifest.json"
INDEX_FILE = "index.parquet"  # one row per stored item: where it is and its checksum
CLAIM_FILE = "_CLAIMED"  # created exclusively when a save starts: one saver per checkpoint id
COMMIT_FILE = "_COMMITTED"  # created exclusively last: the checkpoint exists from this moment
DATA_SUFFIX = ".distcp"

_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-=+]{0,254}$")


def data_file_name(rank: int, index: int) -> str:
    """Same naming as DCP's FileSystemWriter: ``__<rank>_<n>.distcp``."""
    return f"__{rank}_{index}{DATA_SUFFIX}"


def validate_checkpoint_id(checkpoint_id: object) -> str:
    """A checkpoint id is one path segment: it cannot escape output_dir or hide among our files."""
    expect_type("checkpoint_id", checkpoint_id, str)
    if not _ID_RE.match(checkpoint_id) or ".." in checkpoint_id:
        raise ComponentDeclarationError(
            "'checkpoint_id' must be one path segment of letters, digits and '_.-=+', not starting "
            f"with '.' or containing '..' (got {checkpoint_id!r})"
        )
    return checkpoint_id
