"""Whether the members of every replica set hold the same thing, from one fixed-size sum over ranks.

Ranks that plan a save on their own must prove that the ranks sharing state agree on it (same
items, same shapes) before anyone writes: a REPLICATED component's items are shared by every rank,
a PER_GROUP component's by its group, a DTensor shard's by the ranks of its mesh that hold the
same coordinates. Gathering every rank's description on one rank would cost bytes growing with the
world size; instead each rank adds a few numbers, and one all-reduce (sum) of them decides.

For a set of ``n`` members, the member at position ``i`` holding value ``a_i`` (a digest of what it
holds) adds ``a_i * (w_i - w_{i+1 mod n})`` modulo a prime, where the weights ``w`` are hashes of
the set and the position. Summed over the members this telescopes to 0 when every ``a_i`` is the
same; otherwise the sum is a non-zero linear form in pseudo-random weights, which vanishes modulo a
31-bit prime by accident with probability about 2^-31 per lane: four independent lanes make a false
agreement about 2^-124 likely. A member that is missing, counted twice, or that puts itself in a
differently composed set breaks the telescoping too, so "everyone agrees" also proves that every
rank sees the same sets. A set of one member adds nothing: it agrees with itself.

Pure functions; ``rank_exchange`` does the summing across processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

# Four primes below 2**31: a term stays below 2**31, so an int64 sum over up to 2**32 ranks never
# overflows before it is reduced.
PRIMES = (2_147_483_647, 2_147_483_629, 2_147_483_587, 2_147_483_579)
LANES = len(PRIMES)


def _lane_numbers(data: bytes) -> list[int]:
    raw = hashlib.blake2b(data, digest_size=8 * LANES).digest()
    return [int.from_bytes(raw[8 * k:8 * k + 8], "little") for k in range(LANES)]


def _weights(set_key: bytes, position: int) -> list[int]:
    return [n % p for n, p in zip(_lane_numbers(b"w" + set_key + b"#" + str(position).encode()), PRIMES,
                                   strict=True)]


def member_terms(set_key: bytes, position: int, size: int, digest: bytes) -> list[int]:
    """What the member at ``position`` of a set of ``size`` members, holding ``digest``, adds per lane.

    ``set_key`` must name the set the same way on every member (e.g. its sorted member ranks).
    """
    if not 0 <= position < size:
        raise ValueError(f"position {position} is outside a set of {size} member(s)")
    if size == 1:
        return [0] * LANES
    here = _weights(set_key, position)
    after = _weights(set_key, (position + 1) % size)
    values = [1 + n % (p - 1) for n, p in zip(_lane_numbers(b"v" + digest), PRIMES, strict=True)]  # never 0
    return [v * (w - x) % p for v, w, x, p in zip(values, here, after, PRIMES, strict=True)]


def rank_terms(memberships: Iterable[tuple[bytes, int, int, bytes]]) -> list[int]:
    """One rank's addition for all its ``(set_key, position, size, digest)`` memberships."""
    total = [0] * LANES
    for set_key, position, size, digest in memberships:
        total = [(t + m) % p for t, m, p in zip(total, member_terms(set_key, position, size, digest), PRIMES,
                                                strict=True)]
    return total


def all_agree(summed: Sequence[int]) -> bool:
    """Whether the terms of every rank, summed (in any integer width that did not overflow), show that
    every set's members agree."""
    if len(summed) != LANES:
        raise ValueError(f"expected {LANES} summed lanes (got {len(summed)})")
    return all(int(s) % p == 0 for s, p in zip(summed, PRIMES, strict=True))
