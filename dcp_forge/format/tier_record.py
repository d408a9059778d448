"""``_TIER``: which storage tier one copy of a checkpoint belongs to (docs/TIERS.md).

A tiered save commits first to a node-local tier and is then drained to the remote ``output_dir``.
Each copy of the checkpoint (each node's part of the local tier, the drained remote copy) carries a
small ``_TIER`` record of its own, next to the records every copy shares byte for byte (index,
``.metadata``, manifest, ``_COMMITTED``). It stays outside the checksum chain: the manifest is written
before the drain and must not change, so tier membership is recorded per copy instead, and the copies
are tied together by the save id that ``_CLAIMED``, ``_COMMITTED`` and ``.metadata`` all carry.

A ``_TIER`` record is written before its copy's ``_COMMITTED``; it says what the copy should hold,
never that the copy is complete (loads check the files themselves, and every byte against the index).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import IntegrityError

LOCAL = "local"
REMOTE = "remote"
TIERS = (LOCAL, REMOTE)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class TierRecord:
    """One copy's tier. ``data_files``: every data file of the checkpoint with its size in bytes (the
    same in every copy). Local copies: ``node`` (this part's node of ``num_nodes``), ``holds`` (the
    data files written here: the node's own ranks' files and the peer copies it keeps for other
    nodes), ``copies_of`` (the nodes whose files it keeps as peer copies) and ``drain`` (whether the
    save is to be drained to the remote tier). A remote copy is a drained copy of the local save with
    the same save id."""

    tier: str
    checkpoint_id: str
    save_id: str
    data_files: Mapping[str, int]
    node: int | None = None
    num_nodes: int | None = None
    holds: tuple[str, ...] = ()
    copies_of: tuple[int, ...] = ()
    drain: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.tier not in TIERS:
            problems.append(f"'tier' must be one of {TIERS} (got {self.tier!r})")
        for name in ("checkpoint_id", "save_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                problems.append(f"{name!r} must be a non-empty string (got {getattr(self, name)!r})")
        if not isinstance(self.data_files, Mapping) or not all(
                isinstance(k, str) and _is_count(v) for k, v in self.data_files.items()):
            problems.append(f"'data_files' must map file names to sizes (got {self.data_files!r})")
        for name in ("node", "num_nodes"):
            value = getattr(self, name)
            if value is not None and not _is_count(value):
                problems.append(f"{name!r} must be a non-negative int or None (got {value!r})")
        if not all(isinstance(h, str) for h in self.holds):
            problems.append(f"'holds' must list file names (got {self.holds!r})")
        if not all(_is_count(n) for n in self.copies_of):
            problems.append(f"'copies_of' must list node indices (got {self.copies_of!r})")
        if not isinstance(self.drain, bool):
            problems.append(f"'drain' must be a bool (got {self.drain!r})")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "data_files", dict(sorted(self.data_files.items())))
        object.__setattr__(self, "holds", tuple(sorted(self.holds)))
        object.__setattr__(self, "copies_of", tuple(sorted(self.copies_of)))

    def to_bytes(self) -> bytes:
        data = {"tier": self.tier, "checkpoint_id": self.checkpoint_id, "save_id": self.save_id,
                "data_files": dict(self.data_files), "node": self.node, "num_nodes": self.num_nodes,
                "holds": list(self.holds), "copies_of": list(self.copies_of), "drain": self.drain}
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> TierRecord:
        try:
            fields = json.loads(data)
            if not isinstance(fields, dict):
                raise TypeError(f"expected a JSON object, found {type(fields).__name__}")
            fields["holds"] = tuple(fields.get("holds") or ())
            fields["copies_of"] = tuple(fields.get("copies_of") or ())
            return cls(**fields)
        except (ValueError, TypeError) as err:
            raise IntegrityError(f"tier record {where} is malformed: {err}") from err

    def describe(self) -> str:
        """``local: node 1 of 2 (copies of node 0)`` / ``remote (drained copy)``, for listings."""
        if self.tier == REMOTE:
            return "remote (drained copy)"
        copies = f", copies of node{'s' if len(self.copies_of) > 1 else ''} " \
                 f"{', '.join(map(str, self.copies_of))}" if self.copies_of else ""
        return f"local: node {self.node} of {self.num_nodes}{copies}"
