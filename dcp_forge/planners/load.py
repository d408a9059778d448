"""ForgeLoadPlanner: DCP's default load planner reading each rank's own copy of its state.

Call protocol (DCP's): on every rank ``set_up_planner`` then ``create_local_plan``; on the
coordinator ``create_global_plan``; on every rank ``finish_plan``, then the storage reader calls
``load_bytes`` / ``resolve_tensor`` / ``commit_tensor`` per read item.

What it adds over ``DefaultLoadPlanner``:

- top-level keys are mapped to the storage keys of this rank's copy (or to an explicit ``key_map``
  the coordinator computed, e.g. for a changed topology);
- missing keys, shape and dtype mismatches raise errors that name the component and key, before any
  byte is read (DCP itself would cast dtypes silently);
- it never takes DCP's pre-2.4 compatibility branch, which re-flattens the state dict and flips a
  module-level flag whenever a checkpoint holds keys this rank does not request — always the case
  here, since every rank skips the other ranks' copies;
- non-tensor values are unpickled with ``weights_only=True`` (safe_load.py);
- ``select_keys`` loads only some keys of a component (partial load); the others keep their value;
- values go back under their real keys (an optimizer's int parameter ids stay ints, key_paths.py),
  a tensor the load creates gets the saved conjugate / negative flags, and quantized, sparse or nested
  tensors (stored whole) replace the destination's value; ``saved_forms`` (from ``index.parquet``,
  values.saved_forms) says what DCP's metadata cannot. Destinations that cannot take a value (a meta
  tensor, an expanded view whose elements share memory) raise before anything is read.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_local_load_plan
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from .._torch_compat import set_element
from ..core.components import ComponentLayout, LayoutSpec, layouts_from
from ..core.key_paths import KeyPath, Step, place, typed_paths
from ..core.keys import match_keys, top_level_key
from ..core.tensors import is_plain_tensor, with_math_bits
from ..core.topology import Topology
from ..errors import MissingComponentError, StateMismatchError
from ..format.safe_load import load_object
from ..format.values import QUANTIZED_DTYPES, SavedForm, is_opaque_tensor, overlapping_destination
from .keymap import default_topology, storage_keys_for


class ForgeLoadPlanner(DefaultLoadPlanner):
    """Load planner applying dcp_forge keys.

    ``components`` / ``topology`` as for ForgeSavePlanner. ``key_map`` overrides the computed
    ``{state-dict key: storage key}``. ``allow_partial_load``: keys absent from the checkpoint are
    left untouched instead of raising. ``select_keys``: ``{state-dict key: glob patterns}``; only
    matching keys of that component (relative to it, e.g. ``"layers.0.*"``) are loaded, and a pattern
    matching nothing raises. ``keys_not_loaded()`` reports what stayed untouched. ``saved_forms``:
    ``{stored fqn: SavedForm}`` from the checkpoint's index (``values.saved_forms(records)``; the
    coordinator passes it): without it, values the current state lacks come back under string keys
    and without view flags, as with DCP.
    """

    # Non-tensor values are unpickled weights-only (load_bytes below); storage readers that vet the
    # bytes themselves for other planners skip that for this one.
    unpickles_safely = True

    def __init__(self, components: LayoutSpec | None = None, topology: Topology | None = None, *,
                 key_map: Mapping[str, str] | None = None, allow_partial_load: bool = False,
                 select_keys: Mapping[str, Sequence[str]] | None = None,
                 saved_forms: Mapping[str, SavedForm] | None = None) -> None:
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True,
                         allow_partial_load=allow_partial_load)
        self._saved_forms = dict(saved_forms or {})
        # fqn -> path with the real keys, where one is not a str (DCP's mappings hold str(key))
        self._typed_paths: dict[str, KeyPath] = {}
        self.layouts: dict[str, ComponentLayout] = layouts_from(components)
        self._topology = topology
        self._explicit_key_map = dict(key_map or {})
        self.key_map: dict[str, str] = {}
        self._user_key: dict[str, str] = {}
        self._user_state_dict: dict[str, Any] = {}
        self.skipped_keys: list[str] = []
        self._select_keys = {k: tuple(v) for k, v in (select_keys or {}).items()}
        self.unselected_keys: list[str] = []

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            self._topology = default_topology(self.layouts)
        return self._topology

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        computed = storage_keys_for(
            [k for k in state_dict if k not in self._explicit_key_map], self.layouts, self.topology)
        self.key_map = {**computed, **{k: v for k, v in self._explicit_key_map.items() if k in state_dict}}
        self._user_key = {sk: k for k, sk in self.key_map.items()}
        self._user_state_dict = state_dict
        renamed = {self.key_map[k]: v for k, v in state_dict.items()}
        self._refuse_meta_destinations(renamed)  # DCP would replace them (or fail without a process group)
        super().set_up_planner(renamed, metadata, is_coordinator)
        self._typed_paths = typed_paths(self.original_state_dict, self.mappings)
        if self._select_keys:
            self._apply_key_selection(metadata)
        if metadata is not None:
            self._add_saved_extras(metadata)

    def _apply_key_selection(self, metadata: Metadata | None) -> None:
        """Partial load: forget keys no pattern selects, so they are never read and keep their value.

        Candidates are the current state's keys and the checkpoint's keys of the same component, so a
        pattern can select saved state the current object does not list yet (a fresh optimizer's).
        """
        candidates = set(self.state_dict)
        if metadata is not None:
            ours = set(self.key_map.values())
            candidates.update(f for f in metadata.state_dict_metadata if top_level_key(f) in ours)
        by_component: dict[str, list[str]] = defaultdict(list)
        for fqn in sorted(candidates):
            if self._component(fqn) in self._select_keys and fqn != top_level_key(fqn):
                by_component[self._component(fqn)].append(fqn)
        unselected: list[str] = []
        for component, patterns in self._select_keys.items():
            fqns = by_component.get(component, [])
            prefix = len(self.key_map.get(component, component)) + 1
            chosen, unmatched = match_keys(patterns, [f[prefix:] for f in fqns])
            if unmatched:
                raise MissingComponentError(
                    f"component {component!r} on rank {self.topology.rank}: key pattern(s) {list(unmatched)} "
                    f"match no key of its state or checkpoint (keys are e.g. {[f[prefix:] for f in fqns[:5]]})")
            unselected.extend(f for f in fqns if f[prefix:] not in chosen)
        for fqn in unselected:
            self.state_dict.pop(fqn, None)
        self.unselected_keys = unselected

    def _refuse_meta_destinations(self, state_dict: dict[str, Any]) -> None:
        """A meta tensor cannot receive values: loading into a stateful's meta parameters would
        change nothing (DCP swaps in a new tensor that e.g. ``Module.load_state_dict`` copies into
        the meta one), so it is refused with its key."""
        for fqn, value in _tensors_named(state_dict):
            if value.device.type == "meta":
                raise StateMismatchError(
                    f"component {self._component(fqn)!r} on rank {self.topology.rank}: the destination of {fqn!r} is "
                    "a tensor on the meta device, which cannot hold loaded values; materialise it first (e.g. "
                    "module.to_empty(device='cpu'))")

    def keys_not_loaded(self) -> dict[str, tuple[str, ...]]:
        """Component → its keys (relative to it) this load left at their current value."""
        out: dict[str, list[str]] = defaultdict(list)
        for fqn in [*self.unselected_keys, *self.skipped_keys]:
            skey = top_level_key(fqn)
            out[self._user_key.get(skey, skey)].append(fqn[len(skey) + 1:] if fqn != skey else fqn)
        return {k: tuple(sorted(v)) for k, v in out.items()}

    def _add_saved_extras(self, metadata: Metadata) -> None:
        """Load saved keys the current state lacks *by value*, under the same component.

        A fresh optimizer has no per-parameter state yet, and a dataloader's state shape can depend
        on where it stopped: asking only for the keys the current object lists would silently drop
        the rest. Such keys are added to the destination (a new tensor, or a value to unpickle) at
        their saved nested path, so ``load_state_dict`` receives everything that was saved.
        """
        ours = set(self.key_map.values())
        unselected = set(self.unselected_keys)
        paths = metadata.planner_data or {}
        for fqn, md in metadata.state_dict_metadata.items():
            if fqn in self.state_dict or top_level_key(fqn) not in ours or fqn in unselected:
                continue
            path = tuple(paths.get(fqn) or fqn.split("."))
            form = self._saved_forms.get(fqn) or SavedForm()
            if form.key_path is not None:
                self._typed_paths[fqn] = (Step(path[0]), *form.key_path)
            if isinstance(md, TensorStorageMetadata):
                if md.properties.dtype in QUANTIZED_DTYPES:
                    raise StateMismatchError(
                        f"component {self._component(fqn)!r} on rank {self.topology.rank}: {fqn!r} is a quantized "
                        f"tensor stored without its scales and zero points (by plain DCP or an older dcp_forge); "
                        "it can only load into a quantized destination of the same quantization")
                value: Any = with_math_bits(torch.empty(md.size, dtype=md.properties.dtype), form.math_bits)
                self._set(fqn, path, value)
            else:
                value = None  # placeholder: load_bytes sets the real value at ``path``
            self.state_dict[fqn] = value
            self.mappings[fqn] = path

    def _set(self, fqn: str, path: tuple, value: Any) -> None:
        """Put ``value`` where ``fqn`` lives in the caller's state: under its real keys when known."""
        typed = self._typed_paths.get(fqn)
        if typed is not None:
            place(self.original_state_dict, typed, value)
        else:
            set_element(self.original_state_dict, path, value)

    def _component(self, fqn: str) -> str:
        storage = top_level_key(fqn)
        return self._user_key.get(storage, storage)

    def _check_against_metadata(self) -> Metadata:
        """The checkpoint's metadata, once the state is checked against it."""
        metadata = self.metadata
        if metadata is None:
            raise RuntimeError("DCP called create_local_plan before set_up_planner gave it metadata")
        saved = metadata.state_dict_metadata
        self.skipped_keys = []
        for fqn, obj in self.state_dict.items():
            md = saved.get(fqn)
            if md is None:
                if self.allow_partial_load:
                    self.skipped_keys.append(fqn)
                    continue
                raise MissingComponentError(
                    f"component {self._component(fqn)!r} on rank {self.topology.rank}: key {fqn!r} is not in the "
                    f"checkpoint (expected because the current state has it; the checkpoint has "
                    f"{_nearby_keys(saved, top_level_key(fqn))})"
                )
            if isinstance(md, TensorStorageMetadata):
                shape = getattr(obj, "shape", None)
                dtype = getattr(obj, "dtype", None)
                if shape is None:
                    raise StateMismatchError(
                        f"component {self._component(fqn)!r} on rank {self.topology.rank}: {fqn!r} was saved as a "
                        f"tensor {tuple(md.size)} but the current state holds {type(obj).__name__}")
                if is_plain_tensor(obj) and overlapping_destination(obj):
                    raise StateMismatchError(
                        f"component {self._component(fqn)!r} on rank {self.topology.rank}: the destination of {fqn!r} is an "
                        f"expanded view (shape {tuple(obj.shape)}, strides {obj.stride()}) whose elements share "
                        "memory, so it cannot hold the saved values; give it a tensor of its own (e.g. .clone())")
                if tuple(shape) != tuple(md.size):
                    raise StateMismatchError(
                        f"component {self._component(fqn)!r} on rank {self.topology.rank}: shape mismatch for "
                        f"{fqn!r}: checkpoint has {tuple(md.size)}, current state expects {tuple(shape)}")
                if dtype != md.properties.dtype:
                    raise StateMismatchError(
                        f"component {self._component(fqn)!r} on rank {self.topology.rank}: dtype mismatch for "
                        f"{fqn!r}: checkpoint has {md.properties.dtype}, current state expects {dtype}")
            elif (isinstance(md, BytesStorageMetadata) and hasattr(obj, "shape") and hasattr(obj, "dtype")
                  and not is_opaque_tensor(obj)):  # an opaque tensor was stored whole: it is replaced
                raise StateMismatchError(
                    f"component {self._component(fqn)!r} on rank {self.topology.rank}: {fqn!r} was saved as a "
                    f"non-tensor value but the current state holds a tensor {tuple(obj.shape)}")
        return metadata

    def create_local_plan(self) -> LoadPlan:
        metadata = self._check_against_metadata()
        return whole_tensor_load_plan(self.state_dict, metadata, not self.allow_partial_load)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        # A read item that fills a whole plain tensor (what ``whole_tensor_load_plan`` plans) resolves to
        # the tensor itself, as DCP's lookup and narrowing would, without their per-item work.
        tensor = self.state_dict.get(read_item.dest_index.fqn)
        if (isinstance(tensor, torch.Tensor) and type(tensor) in _PLAIN_TENSOR_TYPES and read_item.lengths == tensor.size()
                and not any(read_item.dest_offsets) and not any(read_item.dest_index.offset or ())):
            return tensor
        return super().resolve_tensor(read_item)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = load_object(value, name=f"{self._component(fqn)}: {fqn}")
        path = self.mappings[fqn]
        self._set(fqn, path, obj)
        if len(path) == 1:  # a top-level value was replaced: hand it back under the caller's key
            top = path[0]
            assert isinstance(top, str), "the planned state's top-level keys are storage keys"
            self._user_state_dict[self._user_key.get(top, top)] = obj


def whole_tensor_load_plan(state_dict: Mapping[str, Any], metadata: Metadata, strict: bool = True) -> LoadPlan:
    """``create_default_local_load_plan``'s plan, item for item, with its per-item resharding sweep
    skipped where there is nothing to reshard.

    A plain tensor stored as one chunk that covers it whole (every non-resharded load of a tensor
    that is not sharded) gets the one read item DCP's sweep would compute for it: the whole chunk into
    the whole destination. Every other value (DTensors, sharded tensors, chunked or empty tensors,
    non-tensor values) is planned by DCP itself, in the same order.
    """
    saved = metadata.state_dict_metadata
    requests: list[ReadItem] = []
    others: dict[str, Any] = {}

    def plan_others() -> None:
        if others:
            requests.extend(create_default_local_load_plan(others, metadata, strict).items)
            others.clear()

    for fqn, obj in state_dict.items():
        md = saved.get(fqn)
        chunk = _whole_chunk(md, obj)
        if chunk is None:
            others[fqn] = obj
            continue
        plan_others()  # keeps DCP's order of read items
        zeros = chunk.offsets
        index = MetadataIndex(fqn, zeros, 0)  # destination and stored chunk alike (immutable: one object)
        requests.append(ReadItem(type=LoadItemType.TENSOR, dest_index=index, dest_offsets=zeros,
                                 storage_index=index, storage_offsets=zeros, lengths=chunk.sizes))
    plan_others()
    return LoadPlan(requests)


def _whole_chunk(md: Any, obj: Any) -> ChunkStorageMetadata | None:
    """The one stored chunk of ``md`` when it holds all of the plain tensor ``obj`` (same size, offsets
    zero, no empty dimension: DCP's sweep reads nothing for an empty one); None otherwise."""
    if type(obj) not in _PLAIN_TENSOR_TYPES or not isinstance(md, TensorStorageMetadata) or len(md.chunks) != 1:
        return None
    chunk = md.chunks[0]
    size = obj.size()
    if md.size != size or chunk.sizes != size or len(chunk.offsets) != len(size) or any(chunk.offsets) or not all(size):
        return None
    if type(chunk.offsets) is not torch.Size or type(chunk.sizes) is not torch.Size:
        return ChunkStorageMetadata(torch.Size(chunk.offsets), torch.Size(chunk.sizes))
    return chunk


# Tensors DCP plans as one local chunk of their own shape (``_create_chunk_from_tensor``): no
# ``__create_chunk_list__`` of their own, not sharded.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _tensors_named(value: Any, name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested state, with its dotted name as DCP flattens it."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors_named(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors_named(item, f"{name}.{i}")


def _nearby_keys(saved: Mapping[str, Any], storage_key: str, limit: int = 5) -> str:
    component = storage_key.split("@", 1)[0]
    near = sorted(k for k in saved if k.split(".", 1)[0].split("@", 1)[0] == component)
    if not near:
        return "no keys for this component"
    shown = ", ".join(repr(k) for k in near[:limit])
    return f"{len(near)} key(s) for this component, e.g. {shown}"
