"""Where checkpoints are looked for on s3://: a bucket that does not exist, a store that cannot be
reached and an empty prefix are three different answers, and only the last means "start fresh".

Against both servers: SeaweedFS creates a bucket on the first PUT into it, moto (like AWS) refuses
the PUT; dcp_forge must behave the same on both (it never creates a bucket).
"""

from __future__ import annotations

import socket
import uuid
import warnings

import pytest
import torch

from dcp_forge import (
    CheckpointCoordinator,
    CheckpointNotFoundError,
    LocationNotFoundError,
    StateComponent,
    discard_partial_checkpoints,
    latest_checkpoint,
    list_checkpoints,
)
from dcp_forge.cli import EXIT_ERROR, EXIT_OK, main
from dcp_forge.manager import CheckpointManager, CheckpointPolicy
from dcp_forge.storage import check_output_dir, location_exists
from dcp_forge.storage.s3 import S3Settings, make_s3fs
from tests.support.object_store import S3_BUCKET, fresh_prefix, storage_options_for
from tests.support.statefuls import Box

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(params=["seaweedfs", "moto"])
def server(request, s3_server_info, moto_server_info):
    return s3_server_info if request.param == "seaweedfs" else moto_server_info


def coordinator(output_dir: str, options: dict) -> CheckpointCoordinator:
    return CheckpointCoordinator([StateComponent("model", Box({"w": torch.arange(8.0)}), "global")],
                                 output_dir=output_dir, storage_options=options)


def bucket_exists(info, bucket: str) -> bool:
    return make_s3fs(S3Settings.from_server(info), skip_instance_cache=True, use_listings_cache=False).exists(bucket)


def test_a_bucket_that_does_not_exist_is_an_error_naming_it_never_an_empty_run(server, request):
    options = storage_options_for(server)
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    typo = f"s3://{bucket}/{fresh_prefix(request)}"
    for look in (lambda: latest_checkpoint(typo, options), lambda: list_checkpoints(typo, options),
                 lambda: discard_partial_checkpoints(typo, options), lambda: check_output_dir(typo, options),
                 lambda: coordinator(typo, options).load_checkpoint(),
                 lambda: coordinator(typo, options).load_checkpoint(f"{typo}/checkpoint-1")):
        with pytest.raises(LocationNotFoundError, match=f"no such S3 bucket.*s3://{bucket}") as err:
            look()
        assert isinstance(err.value, FileNotFoundError) and not isinstance(err.value, CheckpointNotFoundError)
    # Saving fails the same way on both servers, and creates no bucket (SeaweedFS would on a PUT).
    with pytest.raises(LocationNotFoundError, match=f"s3://{bucket}"):
        coordinator(typo, options).save_checkpoint(checkpoint_id="checkpoint-1")
    assert not bucket_exists(server, bucket)


def test_resume_from_a_mistyped_bucket_refuses_to_start_from_scratch(server, request):
    options = storage_options_for(server)
    typo = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/{fresh_prefix(request)}"
    manager = CheckpointManager(CheckpointPolicy(output_dir=typo, storage_options=options),
                                [StateComponent("model", Box({"w": torch.zeros(8)}), "global")])
    with pytest.raises(LocationNotFoundError, match="no such S3 bucket"):
        manager.prepare_output_dir(resuming=True)
    with pytest.raises(LocationNotFoundError, match="no such S3 bucket"):
        manager.resume(True)


def test_an_empty_prefix_is_a_new_run(server, request):
    options = storage_options_for(server)
    fresh = f"s3://{S3_BUCKET}/{fresh_prefix(request)}"
    assert latest_checkpoint(fresh, options) is None and list_checkpoints(fresh, options) == []
    check_output_dir(fresh, options)
    assert not location_exists(fresh, options)
    manager = CheckpointManager(CheckpointPolicy(output_dir=fresh, storage_options=options),
                                [StateComponent("model", Box({"w": torch.zeros(8)}), "global")])
    assert manager.prepare_output_dir(resuming=True) == [] and manager.resume(True) is None
    saved = coordinator(fresh, options).save_checkpoint(checkpoint_id="checkpoint-1")
    assert location_exists(fresh, options) and latest_checkpoint(fresh, options) == saved


def test_a_store_that_cannot_be_reached_is_a_connection_error(s3_server_info, request):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    options = {**storage_options_for(s3_server_info), "endpoint_url": f"http://127.0.0.1:{port}",
               "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    url = f"s3://{S3_BUCKET}/{fresh_prefix(request)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for look in (lambda: latest_checkpoint(url, options), lambda: check_output_dir(url, options)):
            with pytest.raises(ConnectionError, match="listing"):
                look()


def test_ls_of_a_mistyped_bucket_or_an_empty_prefix_says_nothing_is_there(s3_server_info, request, capsys):
    options = f'{{"key": "{s3_server_info.access_key}", "secret": "{s3_server_info.secret_key}", ' \
              f'"endpoint_url": "{s3_server_info.endpoint_url}"}}'
    fresh = f"s3://{S3_BUCKET}/{fresh_prefix(request)}"
    for url, expected in ((f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run", "no such S3 bucket"),
                          (fresh, "no such output_dir")):
        assert main(["ls", url, "--storage-options", options]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert expected in err and s3_server_info.secret_key not in err, err
    coordinator(fresh, storage_options_for(s3_server_info)).save_checkpoint(checkpoint_id="checkpoint-1")
    assert main(["ls", fresh, "--storage-options", options]) == EXIT_OK
    assert "checkpoint-1" in capsys.readouterr().out
