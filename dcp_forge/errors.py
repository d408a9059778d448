"""Exceptions of dcp_forge.

Each subclasses the builtin it means, so callers can catch ``ValueError`` / ``FileNotFoundError`` /
``FileExistsError`` without knowing this package, and each message names the component, the rank and
what was expected versus what was found.
"""

from __future__ import annotations


class ForgeError(Exception):
    """Base of every dcp_forge error (mixed into builtin-derived classes below)."""


class ComponentDeclarationError(ForgeError, ValueError):
    """A StateComponent, Topology or planner argument is malformed or inconsistent."""


class CheckpointNotFoundError(ForgeError, FileNotFoundError):
    """No committed checkpoint at the given location."""


class MissingComponentError(ForgeError, KeyError):
    """A required component (or key) is absent from the checkpoint being loaded."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class UnexpectedComponentError(ForgeError, KeyError):
    """In strict mode, the checkpoint holds a component nobody declared."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StateMismatchError(ForgeError, ValueError):
    """Saved and current state disagree on shape, dtype or structure."""


class CheckpointExistsError(ForgeError, FileExistsError):
    """The checkpoint id is already taken by a committed (or in-progress) checkpoint."""


class ReplicationError(ForgeError, ValueError):
    """State declared REPLICATED / PER_GROUP / PER_NODE differs across the ranks that share it."""


class IntegrityError(ForgeError, ValueError):
    """Stored bytes do not match their recorded checksum, or a file is truncated or missing."""


class TopologyChangeError(ForgeError, ValueError):
    """A component cannot be mapped from the saved topology to the current one under its policy."""


def describe_type(value: object) -> str:
    """Render a value and its type the way attrs does: ``'a' that is a <str>``."""
    return f"{value!r} that is a <{type(value).__name__}>"
