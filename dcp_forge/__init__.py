"""dcp_forge: declare how each piece of training state is shared; get deduplicated, balanced,
atomically committed DCP checkpoints that every rank loads its own state back from.
"""

from ._version import __version__

# The public API is imported on first use (PEP 562), not with the package: ``dcp-forge ls`` and
# ``inspect`` then start without torch (0.3 s instead of seconds). A name added here must also be
# added to ``__all__``; tests/ops/test_cli.py checks that the inspection commands stay torch-free.
_EXPORTS = {
    "AsyncOptions": "async_save",
    "AsyncSaveHandle": "async_save",
    "CheckpointCoordinator": "coordinator",
    "read_manifest": "coordinator",
    "AsyncSaveError": "errors",
    "DrainError": "errors",
    "CheckpointExistsError": "errors",
    "CheckpointNotFoundError": "errors",
    "CollectiveTimeoutError": "errors",
    "ComponentDeclarationError": "errors",
    "ForgeError": "errors",
    "IncompleteSaveError": "errors",
    "IntegrityError": "errors",
    "LocationNotFoundError": "errors",
    "MissingComponentError": "errors",
    "ReplicationError": "errors",
    "StateMismatchError": "errors",
    "TopologyChangeError": "errors",
    "TopologyChangeWarning": "errors",
    "UndeclaredMutationError": "errors",
    "UnexpectedComponentError": "errors",
    "UnsafeCheckpointError": "errors",
    "UnsupportedFormatError": "errors",
    "UnsupportedValueError": "errors",
    "LoadResult": "loading",
    "LocalTier": "tiers.policy",
    "CheckpointManifest": "format.manifest",
    "ComponentManifest": "format.manifest",
    "TopologyPolicy": "core.topology_policy",
    "RNGState": "rng",
    "SharingPattern": "core.patterns",
    "StateComponent": "core.components",
    "ValidationLevel": "core.patterns",
    "ModelState": "statefuls",
    "OptimizerState": "statefuls",
    "TrainingProgress": "statefuls",
    "delete_checkpoint": "storage",
    "discard_partial_checkpoints": "storage",
    "latest_checkpoint": "storage",
    "list_checkpoints": "storage",
    "Topology": "core.topology",
    "gather_topology": "core.topology",
    "Problem": "ops.verify",
    "ProblemKind": "ops.verify",
    "verify_checkpoint": "ops.verify",
    "export_hf": "ops.export_hf",
    "load_hf_into": "ops.import_hf",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dcp_forge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "AsyncOptions", "AsyncSaveError", "AsyncSaveHandle", "CheckpointCoordinator", "CheckpointExistsError",
    "CheckpointManifest", "CheckpointNotFoundError", "CollectiveTimeoutError", "ComponentDeclarationError", "ComponentManifest", "DrainError",
    "ForgeError", "IncompleteSaveError", "IntegrityError", "LoadResult", "LocalTier", "LocationNotFoundError",
    "MissingComponentError", "ModelState", "OptimizerState",
    "Problem", "ProblemKind", "RNGState", "ReplicationError", "SharingPattern", "StateComponent", "StateMismatchError",
    "Topology", "TopologyChangeError", "TopologyChangeWarning", "TopologyPolicy", "TrainingProgress",
    "UndeclaredMutationError", "UnexpectedComponentError", "UnsafeCheckpointError",
    "UnsupportedFormatError", "UnsupportedValueError",
    "ValidationLevel", "delete_checkpoint", "discard_partial_checkpoints", "export_hf", "gather_topology",
    "latest_checkpoint", "list_checkpoints", "load_hf_into", "read_manifest", "verify_checkpoint", "__version__",
]
