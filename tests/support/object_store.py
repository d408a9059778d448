"""How tests reach the session's S3 servers: the bucket, storage options, fresh key prefixes."""

from __future__ import annotations

import re
import uuid

import pytest

S3_BUCKET = "forge-test"


def storage_options_for(info) -> dict:
    """fsspec/s3fs ``storage_options`` reaching a server started by ``tests/support/s3_server.py``.

    The region goes into botocore's config (``config_kwargs``): in ``client_kwargs`` s3fs would also
    send it as CreateBucket's LocationConstraint, which moto and AWS refuse for us-east-1.
    """
    return {"key": info.access_key, "secret": info.secret_key, "endpoint_url": info.endpoint_url,
            "config_kwargs": {"region_name": info.region}}


def fresh_prefix(request: pytest.FixtureRequest) -> str:
    """A new key prefix named after the test (readable in server listings, unique per call)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60].strip("-")
    return f"{name}-{uuid.uuid4().hex[:8]}"
