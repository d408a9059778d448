"""Dictionary keys that are not strings, recorded so that a load puts each value back under its key.

DCP names every value of a state dict by joining its path with ``str(key)``
(``"optimizer.state.0.exp_avg"``) and keeps that path, as strings, in its metadata. A dictionary keyed
by integers (an optimizer's ``state``, keyed by parameter position) would therefore come back keyed
by ``"0"``, ``"1"``: a fresh optimizer gets no moments, and nothing says so. dcp_forge records the
path with the keys' real types (``key_path`` in ``index.parquet``) wherever a key is not a ``str``,
and its load planner places values by that path.

A recorded key must be rebuilt without running code from the checkpoint, so only ``str``, ``int``,
``bool``, ``float``, ``None``, ``bytes`` and tuples of these are stored; any other key (an enum, an
object) is refused at save time. A path here is a tuple of ``Step``: a mapping key, or a list
position (DCP walks lists holding tensors position by position).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Step:
    """One step into a nested state dict: the mapping key ``key``, or (``index``) list position ``key``."""

    key: Any
    index: bool = False

    def __str__(self) -> str:
        return str(self.key) if self.index or type(self.key) is str else repr(self.key)


KeyPath = tuple[Step, ...]

_SCALAR_KEY_TYPES = (str, int, bool, float, type(None), bytes)


def storable_key(key: Any) -> bool:
    """Whether ``key`` can be written down and rebuilt exactly (see the module docstring)."""
    if type(key) in _SCALAR_KEY_TYPES:
        return True
    return type(key) is tuple and all(storable_key(k) for k in key)


def describe_path(path: KeyPath) -> str:
    """``state[0]['exp_avg']``-like rendering for messages: str keys joined by dots, others in brackets."""
    out = ""
    for step in path:
        if not step.index and type(step.key) is str:
            out += ("." if out else "") + step.key
        else:
            out += f"[{step.key!r}]"
    return out


_UNSEEN: Any = object()  # a mapping typed_paths has not looked at yet


def typed_paths(root: Mapping[str, Any], flat_paths: Mapping[str, tuple]) -> dict[str, KeyPath]:
    """For each flattened name whose DCP path (``flat_paths``: mapping keys as ``str(key)``, list
    positions as ints) passes through a key that is not a ``str``, the path with the real keys.

    Names whose keys are all strings are left out: DCP's own path is exact for them. (A state whose
    every mapping is keyed by strings, the usual case, has none: found without following each name.)
    """
    if _only_string_keys(root):
        return {}
    lookups: dict[int, dict[str, Any] | None] = {}  # per mapping: str(key) -> key, None if all keys are str
    out: dict[str, KeyPath] = {}
    for name, path in flat_paths.items():
        node: Any = root
        keys: list[tuple[Any, bool]] = []  # (key, is a list position): Steps are made for typed paths only
        typed = False
        for part in path:
            if type(node) is dict or isinstance(node, Mapping):
                if (lookup := lookups.get(id(node), _UNSEEN)) is _UNSEEN:
                    lookup = lookups[id(node)] = (None if all(type(k) is str for k in node)
                                                  else {str(k): k for k in node})
                key = part if lookup is None else lookup[part]
                typed = typed or type(key) is not str
                keys.append((key, False))
                node = node[key]
            else:
                keys.append((part, True))
                node = node[part]
        if typed:
            out[name] = tuple(Step(key, index=index) for key, index in keys)
    return out


def _only_string_keys(root: Mapping[str, Any]) -> bool:
    """Whether every mapping a DCP path can pass through (``root`` included) is keyed by strings only:
    the mappings reached through mappings and through the lists DCP walks item by item."""
    may_hold = _may_hold_mappings()
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            if not set(map(type, node)) <= _STR:
                return False
            values: Any = node.values()
        elif isinstance(node, list) and _walked_by_dcp(node):
            values = node
        else:
            continue
        stack += filter(may_hold, values)
    return True


_STR = frozenset({str})


def _may_hold_mappings() -> Callable[[Any], bool]:
    """A test whether a value may hold a mapping DCP walks into: a mapping or a list. Asked once per
    type, so the leaves (tensors, numbers) of a large state are passed over quickly."""
    holds_by_type: dict[type, bool] = {dict: True, list: True}

    def may_hold(value: Any) -> bool:
        kind = type(value)
        if (holds := holds_by_type.get(kind)) is None:
            holds = holds_by_type[kind] = isinstance(value, (Mapping, list))
        return holds

    return may_hold


def empty_mappings(state_dict: Mapping[Any, Any]) -> list[tuple[tuple, KeyPath, Mapping]]:
    """Every empty dictionary in ``state_dict`` (a component's whole state included), with its DCP
    path and its path of real keys: DCP's flattening keeps leaves only, so an empty dictionary
    (a fresh optimizer's ``state``) would not come back at all."""
    found: list[tuple[tuple, KeyPath, Mapping]] = []
    # A leaf (a tensor, a number) is not walked into, so its path is never built.
    walked = _may_hold_mappings()

    def walk(value: Any, path: tuple, steps: KeyPath) -> None:
        if isinstance(value, Mapping):
            if not value:
                found.append((path, steps, value))
            for key, item in value.items():
                if walked(item):
                    walk(item, (*path, str(key)), (*steps, Step(key)))
        elif isinstance(value, list) and _walked_by_dcp(value):
            for i, item in enumerate(value):
                if walked(item):
                    walk(item, (*path, i), (*steps, Step(i, index=True)))

    for key, value in state_dict.items():
        walk(value, (str(key),), (Step(key),))
    return found


def _walked_by_dcp(items: list) -> bool:
    """Whether DCP's ``traverse_state_dict`` walks a list item by item (rather than storing it whole):
    when it holds a tensor, a dictionary, or such a list."""
    import torch

    return any(isinstance(item, (Mapping, torch.Tensor)) or (isinstance(item, list) and _walked_by_dcp(item))
               for item in items)


def place(root: Any, path: KeyPath, value: Any) -> None:
    """Put ``value`` at ``path`` inside ``root``, creating the dicts and lists missing on the way
    (DCP's ``set_element``, with real keys: it would take an int key for a list position)."""
    node = root
    for step, following in zip(path, path[1:], strict=False):
        empty: Any = [] if following.index else {}
        if step.index:
            _grow(node, step.key)
            if node[step.key] is None:
                node[step.key] = empty
        elif step.key not in node:
            node[step.key] = empty
        node = node[step.key]
    last = path[-1]
    if last.index:
        _grow(node, last.key)
    node[last.key] = value


def _grow(items: list, index: int) -> None:
    items.extend([None] * (index + 1 - len(items)))


# --- the stored form: JSON, one tagged pair per step -------------------------------------------------
# A key that is a str keeps its own JSON string; every other step is ["tag", payload].

def encode_path(path: KeyPath) -> str:
    return json.dumps([_encode_step(step) for step in path], separators=(",", ":"))


def _encode_step(step: Step) -> Any:
    return ["list", step.key] if step.index else _encode_key(step.key)


def _encode_key(key: Any) -> Any:
    if type(key) is str:
        return key
    if type(key) is bool:
        return ["bool", key]
    if type(key) is int:
        return ["int", str(key)]  # as text: JSON readers may not keep integers past 2**53 exact
    if type(key) is float:
        return ["float", key.hex()]
    if key is None:
        return ["none", None]
    if type(key) is bytes:
        return ["bytes", key.hex()]
    if type(key) is tuple:
        return ["tuple", [_encode_key(k) for k in key]]
    raise TypeError(f"key {key!r} of type <{type(key).__name__}> cannot be stored")


def decode_path(text: str) -> KeyPath:
    """The path ``encode_path`` wrote; ValueError for anything else (the text comes from a file)."""
    try:
        steps = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"key path {text[:80]!r} is not JSON: {err}") from err
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"key path {text[:80]!r} is not a non-empty list")
    return tuple(_decode_step(s) for s in steps)


def _decode_step(item: Any) -> Step:
    if isinstance(item, list) and len(item) == 2 and item[0] == "list":
        if type(item[1]) is not int or item[1] < 0:
            raise ValueError(f"list position {item[1]!r} is not a non-negative int")
        return Step(item[1], index=True)
    return Step(_decode_key(item))


def _decode_key(item: Any) -> Any:
    if isinstance(item, str):
        return item
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
        raise ValueError(f"malformed key {item!r}")
    tag, payload = item
    try:
        if tag == "bool" and type(payload) is bool:
            return payload
        if tag == "int" and isinstance(payload, str):
            return int(payload)
        if tag == "float" and isinstance(payload, str):
            return float.fromhex(payload)
        if tag == "none" and payload is None:
            return None
        if tag == "bytes" and isinstance(payload, str):
            return bytes.fromhex(payload)
        if tag == "tuple" and isinstance(payload, list):
            return tuple(_decode_key(k) for k in payload)
    except ValueError as err:
        raise ValueError(f"malformed {tag} key {payload!r}: {err}") from err
    raise ValueError(f"malformed key {item!r}")
