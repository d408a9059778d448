"""What the running test may start: rank processes, S3 servers, processes it kills.

The test tiers (``unit``, ``dist``, ``s3``, ``kill``, ``proc``) are applied by tests/conftest.py from the
fixtures a test uses, and conftest sets ``allowed`` to the running test's tiers. The support code
that starts ranks or servers calls ``require`` first, so a test cannot land in the fast ``unit`` tier
while spawning ranks or servers behind its fixtures' back. Outside pytest (tools, benchmarks)
``allowed`` is None and everything is allowed.
"""

from __future__ import annotations

# The fixture that puts a test into each tier (tests/conftest.py defines them).
FIXTURE_OF_TIER = {"dist": "ranks / rank_processes", "s3": "s3_server_info / moto_server_info / s3_servers",
                   "kill": "kills", "proc": "interpreters"}

allowed: frozenset[str] | None = None


def require(tier: str, what: str) -> None:
    if allowed is not None and tier not in allowed:
        raise RuntimeError(f"this test {what} but is not in the {tier!r} tier (its tiers: {sorted(allowed)}); "
                           f"request the fixture {FIXTURE_OF_TIER[tier]} so it is marked and run with that tier")
