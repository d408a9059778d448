"""Where one rank stands in the local tier: its node, its node's directory, whether it acts for the node."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..core.topology import Topology
from ..format.names import validate_checkpoint_id
from ..storage import StorageBackend, open_backend
from .policy import LocalTier


@dataclass(frozen=True)
class TierSite:
    """This rank's view of the local tier: ``tier.root`` is its node's directory. The node's first
    rank (its *leader*) acts for the node: it claims, commits, deletes and lists the node's copies."""

    tier: LocalTier
    topology: Topology

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def node(self) -> int:
        return self.topology.node

    @property
    def leader(self) -> bool:
        return self.topology.ranks_on_node(self.node)[0] == self.rank

    def leader_of(self, node: int) -> int:
        return self.topology.ranks_on_node(node)[0]

    @property
    def root(self) -> str:
        return self.tier.root

    def copy_path(self, checkpoint_id: str) -> str:
        """This node's copy of checkpoint ``checkpoint_id``."""
        return os.path.join(self.root, validate_checkpoint_id(checkpoint_id))

    def backend(self) -> StorageBackend:
        return open_backend(self.root)[0]
