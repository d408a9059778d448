"""Storage tiers: a fast node-local first tier with peer copies, drained to the remote ``output_dir``.

docs/TIERS.md describes the design and its guarantees. ``LocalTier`` configures it; the
``CheckpointCoordinator`` drives it (``TieredStorage``). Listing a node's local tier imports no torch.
"""

from .policy import LocalTier

__all__ = ["LocalTier"]
