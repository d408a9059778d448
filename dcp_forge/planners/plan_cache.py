"""Plans kept from one save to the next of the same coordinator, reused while nothing they depend on changed.

A training job saves the same structure again and again: same keys, shapes, dtypes, DTensor layouts,
topology. Re-planning each time costs every rank its local plan (and, on DCP's path, an exchange of
plans); DCP's own ``enable_plan_caching`` still gathers a flag from every rank on the coordinator
and keeps its plans at class level, where a plan can outlive what it was made for.

Here each rank keeps its last committed save's plans on its coordinator (``PlanCache``, never
shared between coordinators), under a *signature* of everything its plan depends on
(``state_signature``): every flattened key and its path, each value's kind, shape, dtype and tensor
properties, a DTensor's mesh (its ranks and this rank's coordinate) and placements, and the rank,
topology, declarations and chunk policy. Values never enter it: they are read at write time. A rank
whose signature is unchanged reuses its plans; the ranks agree whether all of them did (and were
cached by the same save) in the all-reduce that starts every save, and only then does the
coordinator reuse its metadata skeleton too. A plan is stored only once its save committed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import marshal
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.tensor import DTensor

from ..core.tensors import dtype_text, is_plain_tensor, math_bits, raw_view
from ..core.topology import Topology
from ..format.values import has_opaque_layout
from .derived import PlanSummary

# Bump when planning changes how a plan follows from what the signature covers.
_SIGNATURE_VERSION = b"dcp_forge plan signature 2"


def _tensor_description(tensor: torch.Tensor, opaque: bool | None = None) -> tuple:
    """What DCP's ``TensorProperties.create_from_tensor`` and a write item's shape read, and whether
    the tensor is stored whole as a pickle (quantized, sparse, nested: ``values.is_opaque_tensor``;
    ``opaque``: ``has_opaque_layout(tensor)``, where the caller knows it)."""
    if opaque is None:
        opaque = has_opaque_layout(tensor)
    if opaque:
        return (tuple(tensor.shape) if not tensor.is_nested else None, dtype_text(tensor.dtype),
                _layout_text(tensor.layout), tensor.requires_grad, None, True)
    # A lazy view's flags are not the plan's business: its storage's pinning is. (Not opaque: not nested.)
    pinned = (tensor if math_bits(tensor) is None else raw_view(tensor)).is_pinned()
    return (tuple(tensor.shape), dtype_text(tensor.dtype), _layout_text(tensor.layout), tensor.requires_grad, pinned,
            False)


@functools.cache
def _layout_text(layout: torch.layout) -> str:
    """``str(layout)``, built once per layout (as ``dtype_text`` is per dtype)."""
    return str(layout)


def state_signature(flat_state: Mapping[str, Any], paths: Mapping[str, Any], context: bytes,
                    opaque: Collection[str] | None = None) -> bytes | None:
    """A digest of everything a rank's save plan is made from (never values); None if some value is
    of a kind whose plan the signature cannot vouch for (a ShardedTensor, a custom
    ``__create_write_items__``): such a state is planned afresh every time.

    ``flat_state``: the flattened state dict, keyed by storage keys; ``paths``: DCP's flattening
    paths; ``context``: the rank, topology, declarations and chunk policy, encoded by the caller;
    ``opaque``: the keys of the plain tensors with an opaque layout (``has_opaque_layout``) where the
    caller found them already (None: each tensor is asked).
    """
    meshes: dict[int, tuple] = {}
    described: list[tuple[object, ...]] = []  # one description per key, its form by kind
    for key, value in flat_state.items():
        if isinstance(value, DTensor):
            mesh = value.device_mesh
            if id(mesh) not in meshes:
                meshes[id(mesh)] = (mesh.device_type, tuple(mesh.mesh.shape),
                                    hashlib.blake2b(mesh.mesh.numpy().tobytes(), digest_size=16).digest(),
                                    mesh.get_coordinate())
            described.append((key, "dtensor", tuple(value.shape), repr(tuple(value.placements)), meshes[id(mesh)],
                              _tensor_description(value.to_local())))
        elif type(value) is torch.Tensor or is_plain_tensor(value):
            described.append((key, "tensor", _tensor_description(value, None if opaque is None else key in opaque)))
        elif isinstance(value, torch.Tensor) or hasattr(value, "__create_write_items__"):
            return None
        else:  # pickled as bytes: the plan only knows its key
            described.append((key, "bytes"))
    # In the state's order, as ``described`` is: a state of the same structure lists them alike.
    signed = (described, [(k, tuple(p)) for k, p in paths.items()])
    try:  # values only, no references (derived.items_digest): quicker than the repr
        encoded = b"marshal " + marshal.dumps(signed, 0)
    except ValueError:
        encoded = b"repr " + repr(signed).encode()
    return hashlib.blake2b(_SIGNATURE_VERSION + context + encoded, digest_size=32).digest()


@dataclasses.dataclass(frozen=True)
class CachedPlan:
    """One rank's plans of a committed save, and which save it was (``generation``: the committing
    coordinator's save id, which every rank learns from the commit)."""

    signature: bytes
    local_plan: SavePlan
    summary: PlanSummary
    final_plan: SavePlan
    coordinator_bytes: int  # the coordinator's GLOBAL values the final plan was balanced against
    generation: str


@dataclasses.dataclass(frozen=True)
class CachedCommit:
    """The coordinator's part: every rank's final plan and the metadata without locations."""

    generation: str
    global_plan: list[SavePlan]
    metadata: Metadata


class PlanCache:
    """One rank's memory of its coordinator's last committed save plan.

    Owned by one ``CheckpointCoordinator`` (pass it to ``ForgeSavePlanner(plan_cache=...)``); its
    saves run one at a time, so it needs no lock.
    """

    def __init__(self) -> None:
        self.plan: CachedPlan | None = None
        self.commit: CachedCommit | None = None
        self.hits = 0  # saves whose every rank reused its plan (for tests and logs)
        self._topology: tuple[Topology, bytes] | None = None

    def topology_digest(self, topology: Topology) -> bytes:
        """A digest of the job's layout (computed once per topology: it grows with the world size)."""
        if self._topology is None or self._topology[0] is not topology:
            text = json.dumps(topology.to_json(), sort_keys=True).encode()
            self._topology = (topology, hashlib.blake2b(text, digest_size=16).digest())
        return self._topology[1]

    @property
    def generation(self) -> str | None:
        return self.plan.generation if self.plan is not None else None

    def lookup(self, signature: bytes | None) -> CachedPlan | None:
        if signature is None or self.plan is None or self.plan.signature != signature:
            return None
        return self.plan

    def commit_for(self, generation: str | None) -> CachedCommit | None:
        if self.commit is None or generation is None or self.commit.generation != generation:
            return None
        return self.commit

    def remember(self, plan: CachedPlan | None, commit: CachedCommit | None) -> None:
        self.plan = plan
        self.commit = commit

    def clear(self) -> None:
        self.plan = None
        self.commit = None
