"""The vocabulary of a declaration: sharing patterns, validation levels, valid key names (pure).

The bottom of the core: the topology, storage keys and component declarations all build on these
names, so this module depends on nothing of dcp_forge but its errors.
"""

from __future__ import annotations

import re
from enum import Enum

from ..errors import ComponentDeclarationError, describe_type, expect_type


class SharingPattern(Enum):
    """How a component's value relates across ranks (see docs/FORMAT.md for the exact semantics)."""

    GLOBAL = "global"  # one logical value (rank 0's, or DTensor shards owned by their ranks)
    PER_RANK = "per_rank"  # different on every rank
    REPLICATED = "replicated"  # identical on every rank
    PER_GROUP = "per_group"  # identical within each group of a named process group
    PER_NODE = "per_node"  # identical within a node, different across nodes

    @classmethod
    def coerce(cls, value: SharingPattern | str, *, field_name: str = "sharing_pattern") -> SharingPattern:
        """Accept a member or its string value; anything else is a ValueError naming the field."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ComponentDeclarationError(
            f"{field_name!r} must be a SharingPattern or one of {allowed} (got {describe_type(value)})"
        )


class ValidationLevel(Enum):
    """How thoroughly replicated state is compared across the ranks that share it."""

    NONE = "none"  # no check
    QUICK = "quick"  # one hash of the whole state
    TENSOR = "tensor"  # one checksum per tensor, so a mismatch names the tensor
    FULL = "full"  # element-wise comparison (debugging)

    @classmethod
    def coerce(cls, value: ValidationLevel | str, *, field_name: str = "validation_level") -> ValidationLevel:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ComponentDeclarationError(
            f"{field_name!r} must be a ValidationLevel or one of {allowed} (got {describe_type(value)})"
        )


# What a replication mismatch does: "raise" a ReplicationError (default), or "warn" (log a warning and
# save anyway), for state known to differ harmlessly across ranks.
MISMATCH_ACTIONS = ("raise", "warn")

# A component key becomes the first segment of DCP's dotted FQNs and of the namespaced storage key
# (keys.py), so it may not contain '.', '@', '/' or anything that could escape a directory.
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,127}$")
_GROUP_NAME_RE = _KEY_RE


def validate_component_key(key: object, *, field_name: str = "key") -> str:
    key = expect_type(field_name, key, str)
    if not _KEY_RE.match(key):
        raise ComponentDeclarationError(
            f"{field_name!r} must be a non-empty identifier of letters, digits, '_' or '-', starting "
            f"with a letter or '_', at most 128 characters (got {key!r})"
        )
    return key
