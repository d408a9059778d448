"""dcp_forge: declare how each piece of training state is shared; get deduplicated, balanced,
atomically committed DCP checkpoints that every rank loads its own state back from.
"""

__version__ = "0.1.0"

from .async_save import AsyncSaveHandle  # noqa: E402
from .coordinator import CheckpointCoordinator, read_manifest  # noqa: E402
from .errors import (  # noqa: E402
    AsyncSaveError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ComponentDeclarationError,
    ForgeError,
    IntegrityError,
    MissingComponentError,
    ReplicationError,
    StateMismatchError,
    TopologyChangeError,
    UnexpectedComponentError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from .loading import LoadResult  # noqa: E402
from .manifest import CheckpointManifest, ComponentManifest  # noqa: E402
from .policies import TopologyPolicy  # noqa: E402
from .rng import RNGState  # noqa: E402
from .sharing import SharingPattern, StateComponent, ValidationLevel  # noqa: E402
from .statefuls import ModelState, OptimizerState  # noqa: E402
from .storage import delete_checkpoint, discard_partial_checkpoints, latest_checkpoint, list_checkpoints  # noqa: E402
from .topology import Topology, gather_topology  # noqa: E402
from .verify import Problem, ProblemKind, verify_checkpoint  # noqa: E402

__all__ = [
    "AsyncSaveError", "AsyncSaveHandle", "CheckpointCoordinator", "CheckpointExistsError", "CheckpointManifest",
    "CheckpointNotFoundError", "ComponentDeclarationError", "ComponentManifest", "ForgeError", "IntegrityError",
    "LoadResult", "MissingComponentError", "ModelState", "OptimizerState", "Problem", "ProblemKind", "RNGState",
    "ReplicationError", "SharingPattern", "StateComponent", "StateMismatchError", "Topology",
    "TopologyChangeError", "TopologyPolicy", "UnexpectedComponentError", "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "ValidationLevel", "delete_checkpoint", "discard_partial_checkpoints", "gather_topology", "latest_checkpoint",
    "list_checkpoints", "read_manifest", "verify_checkpoint", "__version__",
]
