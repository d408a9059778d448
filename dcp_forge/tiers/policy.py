"""``LocalTier``: where and how a coordinator keeps a fast first copy of every checkpoint.

Frozen and validated when built (a ``ValueError`` naming the field), like ``CheckpointPolicy``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import describe_type
from ..storage import scheme_of


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LocalTier:
    """A node-local first tier: every save commits here first, then drains to ``output_dir``.

    ``path``: a directory on node-local storage (a local disk, or ``/dev/shm`` for memory); every node
    has its own, holding the files its ranks wrote (and the peer copies it keeps). The same path on
    every node is the usual choice; it must not be storage the nodes share.
    ``keep``: committed checkpoints kept in the local tier (the newest; older ones are deleted there,
    never in ``output_dir``, where ``CheckpointPolicy.save_total_limit`` rules).
    ``peer_copies``: each node's files are also copied to this many other nodes' local tiers, so the
    job recovers from the local tier after losing that many nodes' local storage (needs more nodes
    than that).
    ``drain_every``: every this-many-th save is drained to ``output_dir`` (1: every save); the others
    stay local only.
    """

    path: str
    keep: int = 2
    peer_copies: int = 0
    drain_every: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if not isinstance(self.path, str) or not self.path:
            raise self._error("path", "a non-empty local directory path")
        if scheme_of(self.path) not in ("", "file"):
            raise ValueError(f"LocalTier.path must be a node-local directory (local disk or /dev/shm), not a "
                             f"{scheme_of(self.path)}:// URL (got {self.path!r}); remote storage is output_dir")
        for name, low in (("keep", 1), ("peer_copies", 0), ("drain_every", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise self._error(name, f"an int >= {low}")

    def _error(self, name: str, expected: str) -> ValueError:
        return ValueError(f"LocalTier.{name} must be {expected} (got {describe_type(getattr(self, name))})")

    @property
    def root(self) -> str:
        """The local directory as a plain absolute path."""
        path = self.path[len("file://"):] if self.path.startswith("file://") else self.path
        return os.path.abspath(os.path.expanduser(path))

    def settings(self) -> tuple[int, int, int]:
        """What every rank must agree on (each node may name its own directory)."""
        return (self.keep, self.peer_copies, self.drain_every)
