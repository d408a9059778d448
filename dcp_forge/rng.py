"""RNGState: the random number generators of one process, as a checkpointable Stateful.

Covers python's ``random``, numpy's global generator, torch's CPU generator and, when present,
every CUDA device's generator. The state holds only tensors and plain numbers, so it loads with
``weights_only=True``. Declare it PER_RANK: each rank's streams differ.

Resuming on another world size, ``on_topology_change="reseed"`` loads the copy saved rank 0 held
and calls ``reseed(rank)``: every generator is seeded from ``derive_seed(state, rank, generator)``,
a 64-bit xxh3 of the loaded state, the new rank and the generator's name. Two restarts from one
checkpoint at one world size get the same streams; two ranks get different ones (docs/RESHARDING.md).
"""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch
import xxhash

from .errors import StateMismatchError


def derive_seed(state: dict[str, Any], rank: int, generator: str) -> int:
    """A 64-bit seed for one generator (``"python"``, ``"numpy"``, ``"torch"``) from an
    ``RNGState.state_dict()`` and a rank: xxh3_64 over the torch CPU state, the python
    Mersenne-Twister words, the numpy key words (each as raw bytes), the rank as 8 little-endian
    bytes and the generator's name. Distinct names keep python's and numpy's Mersenne Twisters from
    producing the same stream."""
    digest = xxhash.xxh3_64()
    digest.update(state["torch"].numpy().tobytes())
    digest.update(state["python"]["state"].numpy().tobytes())
    digest.update(state["numpy"]["keys"].numpy().tobytes())
    digest.update(int(rank).to_bytes(8, "little"))
    digest.update(generator.encode())
    return digest.intdigest()


class RNGState:
    """Snapshot and restore this process's RNGs (``state_dict`` / ``load_state_dict``)."""

    def reseed(self, rank: int) -> None:
        """Seed every generator from the current state and ``rank`` (see ``derive_seed``).

        Python's ``random`` and torch (CPU and every CUDA device) take their 64-bit seed; numpy takes
        its seed as two 32-bit words.
        """
        state = self.state_dict()
        random.seed(derive_seed(state, rank, "python"))
        numpy_seed = derive_seed(state, rank, "numpy")
        np.random.seed([numpy_seed & 0xFFFFFFFF, numpy_seed >> 32])
        torch.manual_seed(derive_seed(state, rank, "torch"))

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss_next = random.getstate()
        # numpy's stubs type the default call as the dict form, but the default is legacy=True: the tuple
        # for the global generator, which is always a Mersenne Twister (MT19937).
        np_kind, np_keys, np_pos, np_has_gauss, np_cached = cast(
            "tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True))
        state: dict[str, Any] = {
            "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                      "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = {str(i): s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"python", "numpy", "torch"} - set(state)
        if missing:
            raise StateMismatchError(f"RNG state is missing {sorted(missing)}")
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
        npst = state["numpy"]
        np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), int(npst["pos"]),
                             int(npst["has_gauss"]), float(npst["cached_gaussian"])))
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available():
            saved = [cuda[k] for k in sorted(cuda, key=int)]
            if len(saved) != torch.cuda.device_count():
                raise StateMismatchError(
                    f"RNG state holds {len(saved)} CUDA generators, this process sees "
                    f"{torch.cuda.device_count()} devices")
            torch.cuda.set_rng_state_all(saved)
