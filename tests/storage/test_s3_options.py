"""How s3:// URLs and storage_options become clients: one S3Settings for both data and control
paths, our own options checked, an install hint when s3fs is missing, and secrets that never reach
a manifest, an index, a log line or an error message."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from dcp_forge import CheckpointCoordinator, StateComponent
from dcp_forge.storage import BACKENDS, open_backend
from dcp_forge.storage.s3 import DEFAULT_MAX_ATTEMPTS, S3Settings, arrow_portable, control_options
from dcp_forge.storage.s3_retries import ARROW_MAX_ATTEMPTS, arrow_retry_strategy
from tests.support.object_store import storage_options_for
from tests.support.statefuls import Box

ENV = {"AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": "envsecret", "AWS_DEFAULT_REGION": "eu-west-3",
       "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}


def test_settings_follow_the_options_first_then_the_environment():
    explicit = S3Settings.from_storage_options(
        {"key": "K", "secret": "S", "endpoint_url": "http://127.0.0.1:1",
         "config_kwargs": {"region_name": "ap-south-1", "retries": {"total_max_attempts": 4}, "read_timeout": 7}},
        env=ENV)
    assert (explicit.access_key, explicit.secret_key, explicit.endpoint_url) == ("K", "S", "http://127.0.0.1:1")
    assert (explicit.region, explicit.max_attempts, explicit.read_timeout) == ("ap-south-1", 4, 7.0)
    from_env = S3Settings.from_storage_options({}, env=ENV)
    assert (from_env.access_key, from_env.secret_key, from_env.region) == ("ENVKEY", "envsecret", "eu-west-3")
    assert from_env.endpoint_url == "http://127.0.0.1:9" and from_env.max_attempts == DEFAULT_MAX_ATTEMPTS
    # botocore's legacy "max_attempts" counts retries, not attempts.
    assert S3Settings.from_storage_options({"config_kwargs": {"retries": {"max_attempts": 2}}}, env={}).max_attempts == 3
    via_client = S3Settings.from_storage_options({"client_kwargs": {"endpoint_url": "https://s3.example:443",
                                                                    "region_name": "us-west-2"}}, env={})
    assert via_client.endpoint_url == "https://s3.example:443" and via_client.region == "us-west-2"
    assert "envsecret" not in repr(from_env)


def test_control_options_fill_defaults_without_overriding_the_user():
    options, client = control_options({"key": "K", "secret": "S", "data_client": "s3fs",
                                       "config_kwargs": {"connect_timeout": 1}})
    assert client == "s3fs" and "data_client" not in options
    assert options["use_listings_cache"] is False
    assert options["config_kwargs"]["connect_timeout"] == 1
    assert options["config_kwargs"]["retries"] == {"total_max_attempts": DEFAULT_MAX_ATTEMPTS, "mode": "standard"}
    with pytest.raises(ValueError, match="data_client"):
        control_options({"data_client": "curl"})


def test_options_arrow_cannot_reproduce_keep_data_on_s3fs():
    assert arrow_portable({"key": "K", "secret": "S", "client_kwargs": {"endpoint_url": "http://x:1"}})
    assert not arrow_portable({"s3_additional_kwargs": {"ServerSideEncryption": "aws:kms"}})
    assert not arrow_portable({"profile": "prod"})
    assert not arrow_portable({"client_kwargs": {"verify": False}})
    backend, path = open_backend("s3://bucket/run/", {"s3_additional_kwargs": {"ACL": "private"}})
    assert backend.data_client == "s3fs" and path == "bucket/run"
    with pytest.raises(ValueError, match="data_client='arrow' cannot be used"):
        open_backend("s3://bucket/run", {"profile": "prod", "data_client": "arrow"})
    with pytest.raises(ValueError, match="needs a bucket"):
        open_backend("s3://", {})


def test_budgets_arrow_would_stretch_into_minutes_keep_data_on_s3fs():
    # Arrow's stateless retry strategy doubles its wait without a cap: past ARROW_MAX_ATTEMPTS
    # attempts the data goes through s3fs (botocore caps each wait), or data_client='arrow' says why.
    many = {"config_kwargs": {"retries": {"total_max_attempts": ARROW_MAX_ATTEMPTS + 1}}}
    assert arrow_portable({"config_kwargs": {"retries": {"total_max_attempts": ARROW_MAX_ATTEMPTS}}})
    assert not arrow_portable(many)
    assert open_backend("s3://bucket/run", many)[0].data_client == "s3fs"
    with pytest.raises(ValueError, match=f"{ARROW_MAX_ATTEMPTS + 1} attempts per request"):
        open_backend("s3://bucket/run", {**many, "data_client": "arrow"})
    with pytest.raises(ValueError, match="attempts per request"):
        arrow_retry_strategy(ARROW_MAX_ATTEMPTS + 1)


def test_the_registry_is_read_only_and_routes_s3_schemes():
    assert BACKENDS["s3"] is BACKENDS["s3a"]
    with pytest.raises(TypeError):
        BACKENDS["s3"] = None  # type: ignore[index]


def test_a_missing_s3fs_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # what "not installed" looks like to an import
    with pytest.raises(ImportError, match=r"pip install 'dcp-forge\[s3\]'"):
        open_backend("s3://bucket/run", {})


def test_secrets_never_reach_manifest_index_logs_or_errors(s3_server_info, s3_url, caplog):
    options = storage_options_for(s3_server_info)
    secret = s3_server_info.secret_key
    caplog.set_level(logging.DEBUG)
    box = Box({"w": torch.randn(64, 64)})
    coordinator = CheckpointCoordinator([StateComponent("box", box, "replicated")], output_dir=s3_url,
                                        storage_options=options)
    path = coordinator.save_checkpoint(checkpoint_id="checkpoint-1")
    backend, native = open_backend(path, options)
    for name in backend.list_dir(native):
        assert secret.encode() not in backend.read_bytes(backend.join(native, name)), name
    coordinator.load_checkpoint()
    wrong = {**options, "secret": secret[::-1]}  # a bad signature: the error must not echo either key
    with pytest.raises(Exception) as failure:
        CheckpointCoordinator([StateComponent("box", box, "replicated")], output_dir=s3_url,
                              storage_options=wrong).save_checkpoint(checkpoint_id="checkpoint-2")
    assert secret not in str(failure.value) and secret[::-1] not in str(failure.value)
    assert not any(secret in record.getMessage() or secret[::-1] in record.getMessage() for record in caplog.records)
