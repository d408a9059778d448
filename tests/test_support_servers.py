"""The object-storage test tools work: a real signed S3 server, the fault proxy, the client recipes.

Everything runs against real servers on 127.0.0.1 started here (SeaweedFS ``weed mini``, and moto
in server mode as a second backend); nothing is mocked in-process.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.support import fault_proxy, s3_clients, s3_server
from tests.support.fault_proxy import FaultConfig, FaultProxy
from tests.support.object_store import S3_BUCKET
from tests.support.paths import REPO

# s3fs (the 's3' extra) brings botocore along; without it there is nothing to test here.
pytest.importorskip("s3fs")
import botocore  # noqa: E402
import botocore.config  # noqa: E402
import botocore.exceptions  # noqa: E402
import botocore.session  # noqa: E402

# The session's servers (tests/conftest.py): one SeaweedFS and one moto for every test module.
BUCKET = S3_BUCKET
MiB = 2**20


@pytest.fixture
def weed(s3_server_info):
    return s3_server_info


@pytest.fixture
def moto(moto_server_info):
    return moto_server_info


@pytest.fixture(params=["seaweedfs", "moto"])
def server(request, s3_server_info, moto_server_info):
    return s3_server_info if request.param == "seaweedfs" else moto_server_info


def client(endpoint_url, key, secret, *, attempts=1, unsigned=False):
    cfg = botocore.config.Config(retries={"total_max_attempts": attempts, "mode": "standard"},
                                 connect_timeout=5, read_timeout=10,
                                 signature_version=botocore.UNSIGNED if unsigned else None)
    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint_url, aws_access_key_id=key, aws_secret_access_key=secret,
        region_name="us-east-1", config=cfg)


def fs_for(endpoint_url, info, **kw):
    settings = s3_clients.S3Settings(endpoint_url, info.access_key, info.secret_key, **kw)
    return s3_clients.make_s3fs(settings, skip_instance_cache=True, use_listings_cache=False)


def key() -> str:
    return f"t/{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------- the server

def test_signed_requests_pass_wrong_or_missing_signatures_are_refused(server):
    good = client(server.endpoint_url, server.access_key, server.secret_key)
    k = key()
    good.put_object(Bucket=BUCKET, Key=k, Body=b"payload")
    assert good.get_object(Bucket=BUCKET, Key=k)["Body"].read() == b"payload"

    wrong_secret = client(server.endpoint_url, server.access_key, server.secret_key + "x")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        wrong_secret.get_object(Bucket=BUCKET, Key=k)
    assert e.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        wrong_secret.put_object(Bucket=BUCKET, Key=k, Body=b"overwrite")
    assert e.value.response["Error"]["Code"] == "SignatureDoesNotMatch"

    wrong_key = client(server.endpoint_url, "AKNOTAKEY", server.secret_key)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        wrong_key.list_buckets()
    assert e.value.response["Error"]["Code"] == "InvalidAccessKeyId"

    # Unsigned: SeaweedFS answers 403 AccessDenied; moto fails the missing Authorization with 500.
    anon = client(server.endpoint_url, None, None, unsigned=True)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        anon.put_object(Bucket=BUCKET, Key=k, Body=b"anon")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] >= 400
    assert good.get_object(Bucket=BUCKET, Key=k)["Body"].read() == b"payload"


def test_server_info_keeps_the_secret_out_of_repr_and_state_file_is_private(weed):
    assert weed.secret_key not in repr(weed)
    assert weed.secret_key not in weed.to_json(redact=True)
    mode = stat.S_IMODE(os.stat(Path(weed.state_dir) / s3_server.STATE_FILE).st_mode)
    assert mode == 0o600
    assert s3_server.read_state(weed.state_dir) == weed


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket in LISTEN state owned by pid, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    ip_hex, port_hex = cols[1].split(":")
                    ip = socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1]) if len(ip_hex) == 8 else ip_hex
                    out.add((ip, int(port_hex, 16)))
    return out


def test_weed_listens_only_on_loopback_and_only_on_ports_we_chose(weed):
    listening = _listening_addresses(weed.pid)
    assert listening, "weed mini owns no listening sockets?"
    assert {ip for ip, _ in listening} == {"127.0.0.1"}
    assert {port for _, port in listening} <= set(weed.ports.values())
    assert len(set(weed.ports.values())) == len(weed.ports)


def test_cli_start_status_stop_beside_a_running_server(tmp_path, weed):
    state = tmp_path / "state"
    py = sys.executable
    script = ["-m", "tools.s3_server"]  # the command-line entry point, run from the repository root
    out = subprocess.run([py, *script, "start", "--state-dir", str(state), "--bucket", "cli-bkt"],
                         capture_output=True, text=True, timeout=90, check=True, cwd=REPO)
    printed = json.loads(out.stdout)
    info = s3_server.read_state(state)
    try:
        assert printed["secret_key"] == "***" and info.secret_key not in out.stdout + out.stderr
        assert printed["endpoint_url"] == info.endpoint_url != weed.endpoint_url
        assert not set(info.ports.values()) & set(weed.ports.values())
        env = (state / s3_server.ENV_FILE).read_text()
        assert "AWS_SECRET_ACCESS_KEY" in env and "AWS_DEFAULT_REGION" in env
        st = subprocess.run([py, *script, "status", "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
        assert st.returncode == 0 and json.loads(st.stdout)["ready"] is True
        c = client(info.endpoint_url, info.access_key, info.secret_key)
        assert "cli-bkt" in {b["Name"] for b in c.list_buckets()["Buckets"]}
    finally:
        subprocess.run([py, *script, "stop", "--state-dir", str(state)], timeout=60, check=True, cwd=REPO)
    # (a zombie not yet reaped by init counts as gone)
    assert not s3_server.pid_alive(info.pid)
    assert not (state / "data").exists() and not (state / s3_server.STATE_FILE).exists()
    st = subprocess.run([py, *script, "status", "--state-dir", str(state)],
                        capture_output=True, text=True, timeout=30, cwd=REPO)
    assert st.returncode == 1


def test_identities_file_instead_of_environment_also_enforces_signatures(s3_servers, tmp_path):
    with s3_servers.running_server("seaweedfs", state_dir=tmp_path, credentials="config",
                                  stop_timeout=5) as info:
        assert oct(os.stat(tmp_path / "s3_identities.json").st_mode & 0o777) == "0o600"
        good = client(info.endpoint_url, info.access_key, info.secret_key)
        good.create_bucket(Bucket="cfg-bkt")
        bad = client(info.endpoint_url, info.access_key, "not-the-secret")
        with pytest.raises(botocore.exceptions.ClientError) as e:
            bad.list_buckets()
        assert e.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert not (tmp_path / "s3_identities.json").exists()


def test_start_refuses_bad_arguments(s3_servers):
    with pytest.raises(ValueError, match="backend"):
        s3_servers.start_server("minio")
    with pytest.raises(ValueError, match="bucket names"):
        s3_servers.start_server("seaweedfs", buckets=["ab"])
    with pytest.raises(ValueError, match="credentials"):
        s3_servers.start_server("moto", credentials="config")


# ------------------------------------------------------------------------ conditional create

def test_conditional_create_once_then_file_exists_and_first_content_survives(server):
    fs = fs_for(server.endpoint_url, server)
    path = f"{BUCKET}/{key()}/COMMITTED"
    s3_clients.put_if_absent(fs, path, b"writer-A " + uuid.uuid4().bytes)
    first = fs.cat_file(path)
    with pytest.raises(FileExistsError) as e:
        s3_clients.put_if_absent(fs, path, b"writer-B " + uuid.uuid4().bytes)
    assert e.value.errno == errno.EEXIST and e.value.filename == path
    assert fs.cat_file(path) == first


def test_the_412_quirk_as_each_server_answers_it(server):
    """Documents what s3fs raises on its own; put_if_absent maps both to FileExistsError."""
    fs = fs_for(server.endpoint_url, server)
    path = f"{BUCKET}/{key()}"
    fs.pipe_file(path, b"one", mode="create")
    with pytest.raises(OSError) as e:
        fs.pipe_file(path, b"two", mode="create")
    if server.backend == "seaweedfs":  # no <Condition> in the 412 body
        assert type(e.value) is OSError and e.value.errno == errno.EINVAL
        assert "pre-conditions you specified did not hold" in str(e.value)
    else:  # AWS-style body: <Condition>If-None-Match</Condition>
        assert isinstance(e.value, FileExistsError)
    assert s3_clients.is_precondition_failed(e.value)
    assert fs.cat_file(path) == b"one"


def test_conditional_create_whose_reply_was_lost_is_recognised_as_ours(weed):
    # The PUT is applied, the reply is cut; botocore retries and gets 412 for our own object.
    with FaultProxy(weed.endpoint_url, fraction=1.0, kinds=("reset_after",), methods=("PUT",),
                    max_faults=1) as px:
        fs = fs_for(px.endpoint_url, weed)
        path = f"{BUCKET}/{key()}/COMMITTED"
        payload = b"marker " + uuid.uuid4().bytes
        s3_clients.put_if_absent(fs, path, payload)
        assert px.stats()["faults_by_kind"] == {"reset_after": 1}
        assert fs.cat_file(path) == payload
        with pytest.raises(FileExistsError):
            s3_clients.put_if_absent(fs, path, payload, verify_lost_reply=False)


def test_put_if_absent_refuses_large_bodies(weed):
    with pytest.raises(ValueError, match="small markers"):
        s3_clients.put_if_absent(fs_for(weed.endpoint_url, weed), f"{BUCKET}/x",
                                 bytes(s3_clients.MAX_MARKER_BYTES + 1))


# ----------------------------------------------------------------- ranged reads, list, delete

def test_both_clients_share_settings_ranged_reads_list_and_delete(server):
    settings = s3_clients.S3Settings.from_server(server)
    fs = s3_clients.make_s3fs(settings, skip_instance_cache=True, use_listings_cache=False)
    afs = s3_clients.make_arrow_fs(settings)
    wrapped = s3_clients.wrap_arrow_fs(afs)
    prefix = f"{BUCKET}/{key()}"
    blob = os.urandom(3 * MiB + 17)
    fs.pipe_file(f"{prefix}/a/0.bin", blob)
    with afs.open_output_stream(f"{prefix}/b/1.bin") as f:
        f.write(blob)

    for path in (f"{prefix}/a/0.bin", f"{prefix}/b/1.bin"):
        assert s3_clients.read_range_s3fs(fs, path, MiB, 2 * MiB + 5) == blob[MiB:2 * MiB + 5]
        assert s3_clients.read_range_arrow(afs, path, 7, 1000) == blob[7:1007]
        assert wrapped.cat_file(path, start=10, end=20) == blob[10:20]
        out = bytearray(4096)
        with afs.open_input_file(path) as f:
            assert s3_clients.readinto_arrow(f, len(blob) - 4096, memoryview(out)) == 4096
        assert out == blob[-4096:]

    expect = {f"{prefix}/a/0.bin": len(blob), f"{prefix}/b/1.bin": len(blob)}
    assert s3_clients.list_prefix_s3fs(fs, prefix) == expect
    assert s3_clients.list_prefix_arrow(afs, prefix) == expect
    assert s3_clients.delete_prefix_s3fs(fs, prefix) == 2
    assert s3_clients.list_prefix_s3fs(fs, prefix) == {}
    assert s3_clients.list_prefix_arrow(afs, prefix) == {}
    assert s3_clients.delete_prefix_s3fs(fs, prefix) == 0


def test_settings_validate_and_hide_the_secret():
    s = s3_clients.S3Settings("http://127.0.0.1:1", "AK", "sekrit")
    assert "sekrit" not in repr(s)
    with pytest.raises(ValueError, match="endpoint_url"):
        s3_clients.S3Settings("127.0.0.1:1")
    with pytest.raises(ValueError, match="together"):
        s3_clients.S3Settings("http://127.0.0.1:1", "AK", None)
    env = {"AWS_ENDPOINT_URL": "http://h:1", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
           "AWS_DEFAULT_REGION": "eu-west-1"}
    assert s3_clients.S3Settings.from_env(env).region == "eu-west-1"


# ------------------------------------------------------------------------------------ the proxy

def _raw_get(port: int, path: str, timeout: float = 10.0) -> int | str:
    """Status of one unsigned GET through the proxy, or the name of the connection error."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status
    except (ConnectionError, http.client.HTTPException) as e:
        return type(e).__name__
    finally:
        conn.close()


def test_proxy_injects_the_configured_fraction_deterministically(weed):
    n = 300
    runs = []
    for _ in range(2):
        with FaultProxy(weed.endpoint_url, fraction=0.2, seed=1234,
                        kinds=("internal_error", "slow_down", "reset")) as px:
            seen = [_raw_get(px.port, f"/{BUCKET}/k{i}") for i in range(n)]
            runs.append(([ev[3] for ev in px.events()], seen, px.stats()))
    (kinds1, seen1, st1), (kinds2, _, _) = runs
    assert kinds1 == kinds2, "same seed, same request sequence -> same faults"
    assert st1["requests"] == n and st1["faults"] == sum(k is not None for k in kinds1)
    assert 0.13 * n <= st1["faults"] <= 0.27 * n
    # What the client saw matches what the proxy says it injected; the rest reached SeaweedFS,
    # which refuses unsigned requests with 403.
    by = st1["faults_by_kind"]
    assert seen1.count(500) == by.get("internal_error", 0)
    assert seen1.count(503) == by.get("slow_down", 0)
    assert sum(isinstance(s, str) for s in seen1) == by.get("reset", 0)
    assert seen1.count(403) == n - st1["faults"] == st1["forwarded"]


def test_proxy_fault_kinds_look_like_s3(weed):
    c_key = key()
    with FaultProxy(weed.endpoint_url, fraction=1.0, kinds=("internal_error",)) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
        conn.request("GET", f"/{BUCKET}/x")
        r = conn.getresponse()
        body = r.read().decode()
        assert r.status == 500 and "<Code>InternalError</Code>" in body
        # keep-alive survives an injected error response
        px.configure(kinds=("slow_down",))
        conn.request("GET", f"/{BUCKET}/x")
        r = conn.getresponse()
        assert r.status == 503 and "<Code>SlowDown</Code>" in r.read().decode()
        conn.close()

        px.configure(kinds=("delay",), delay_s=0.3)
        t0 = time.monotonic()
        assert _raw_get(px.port, f"/{BUCKET}/x") == 403  # delayed, then forwarded
        assert time.monotonic() - t0 >= 0.3

        # reset_after: the request is applied upstream but the client gets no complete reply.
        px.configure(kinds=("reset_after",))
        c = client(px.endpoint_url, weed.access_key, weed.secret_key, attempts=1)
        with pytest.raises((botocore.exceptions.ConnectionClosedError,
                            botocore.exceptions.EndpointConnectionError)):
            c.put_object(Bucket=BUCKET, Key=c_key, Body=b"applied")
    direct = client(weed.endpoint_url, weed.access_key, weed.secret_key)
    assert direct.get_object(Bucket=BUCKET, Key=c_key)["Body"].read() == b"applied"


def test_proxy_runtime_control_and_fault_budget(weed):
    with FaultProxy(weed.endpoint_url) as px:
        assert [_raw_get(px.port, "/x") for _ in range(3)] == [403] * 3
        px.configure(fraction=1.0, kinds=("internal_error",), max_faults=2)
        assert [_raw_get(px.port, "/x") for _ in range(4)] == [500, 500, 403, 403]
        # the same through the HTTP control plane (for a proxy run from the CLI)
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
        body = json.dumps({"max_faults": 3, "kinds": ["slow_down"]})
        conn.request("POST", fault_proxy.CONTROL_PREFIX + "config", body=body,
                     headers={"Content-Type": "application/json"})
        assert json.loads(conn.getresponse().read())["max_faults"] == 3
        assert _raw_get(px.port, "/x") == 503
        conn.request("GET", fault_proxy.CONTROL_PREFIX + "stats")
        stats = json.loads(conn.getresponse().read())
        assert stats == px.stats() and stats["faults"] == 3 and stats["requests"] == 8
        conn.request("POST", fault_proxy.CONTROL_PREFIX + "config", body=json.dumps({"fraction": 2}))
        assert conn.getresponse().status == 400
        conn.close()
    with pytest.raises(ValueError, match="kinds"):
        FaultConfig(kinds=("explode",))
    with pytest.raises(ValueError, match="fraction"):
        FaultConfig(fraction=-0.1)


def test_proxy_streams_a_large_object_both_ways_with_signatures_intact(weed):
    blob = os.urandom(64 * MiB)
    digest = hashlib.sha256(blob).digest()
    with FaultProxy(weed.endpoint_url) as px:
        settings = s3_clients.S3Settings(px.endpoint_url, weed.access_key, weed.secret_key)
        fs = s3_clients.make_s3fs(settings, skip_instance_cache=True)
        afs = s3_clients.make_arrow_fs(settings)
        path = f"{BUCKET}/{key()}"
        fs.pipe_file(path, blob, chunksize=16 * MiB)  # multipart, 4 parts in parallel
        with afs.open_input_file(path) as f:
            assert hashlib.sha256(f.read()).digest() == digest
        with afs.open_output_stream(path + ".arrow") as f:
            f.write(blob)
        assert hashlib.sha256(fs.cat_file(path + ".arrow")).digest() == digest
        st = px.stats()
    assert st["faults"] == 0 and st["bytes_up"] >= 2 * len(blob) and st["bytes_down"] >= 2 * len(blob)


class _ChunkedEcho(http.server.BaseHTTPRequestHandler):
    """Reads a chunked request body, answers with it reversed, chunked (S3 servers rarely do)."""

    protocol_version = "HTTP/1.1"

    def do_PUT(self):
        assert self.headers["Transfer-Encoding"] == "chunked"
        body = b""
        while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
            body += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        out = body[::-1]
        for i in range(0, len(out), 100_000):
            piece = out[i:i + 100_000]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")

    def log_message(self, *args):
        pass


def test_proxy_relays_chunked_bodies_both_ways_on_one_connection():
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChunkedEcho)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as px:
            conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
            for n in (1, 250_000, 3 * MiB):
                payload = os.urandom(n)
                pieces = (payload[i:i + 65536] for i in range(0, n, 65536))
                conn.request("PUT", "/echo", body=pieces, encode_chunked=True)
                r = conn.getresponse()
                assert r.status == 200 and r.read() == payload[::-1]
            conn.close()
            assert px.stats()["requests"] == 3
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_clients_with_retries_succeed_through_faults(weed):
    with FaultProxy(weed.endpoint_url, fraction=0.2, seed=7, delay_s=0.05,
                    kinds=fault_proxy.KINDS) as px:
        settings = s3_clients.S3Settings(px.endpoint_url, weed.access_key, weed.secret_key,
                                         max_attempts=10, read_timeout=10)
        fs = s3_clients.make_s3fs(settings, skip_instance_cache=True, use_listings_cache=False)
        prefix = f"{BUCKET}/{key()}"
        for i in range(20):
            fs.pipe_file(f"{prefix}/{i}", b"v%d" % i)
            assert fs.cat_file(f"{prefix}/{i}") == b"v%d" % i
        blob = os.urandom(16 * MiB)
        fs.pipe_file(f"{prefix}/big", blob, chunksize=5 * MiB, max_concurrency=4)
        assert fs.cat_file(f"{prefix}/big", start=0, end=len(blob)) == blob
        afs = s3_clients.make_arrow_fs(settings)
        with afs.open_output_stream(f"{prefix}/big.arrow") as f:
            f.write(blob)
        with afs.open_input_file(f"{prefix}/big.arrow") as f:
            assert f.read_at(len(blob), 0) == blob
        # botocore retries whole calls; a body cut mid-stream is the caller's to retry (below).
        c = client(px.endpoint_url, weed.access_key, weed.secret_key, attempts=10)
        for i in range(15):
            c.put_object(Bucket=BUCKET, Key=f"{prefix[len(BUCKET) + 1:]}/b{i}", Body=b"b%d" % i)
        st = px.stats()
    assert st["faults"] >= 0.1 * st["requests"], st
    assert set(st["faults_by_kind"]) >= {"internal_error", "slow_down", "reset", "reset_after"}


def test_botocore_does_not_retry_a_body_cut_mid_stream(weed):
    """Why readers must retry the whole ranged GET themselves (s3fs's cat_file with a range
    does; a raw botocore get_object does not)."""
    k = key()
    client(weed.endpoint_url, weed.access_key, weed.secret_key).put_object(
        Bucket=BUCKET, Key=k, Body=os.urandom(MiB))
    with FaultProxy(weed.endpoint_url, fraction=1.0, kinds=("reset_after",), methods=("GET",)) as px:
        c = client(px.endpoint_url, weed.access_key, weed.secret_key, attempts=10)
        resp = c.get_object(Bucket=BUCKET, Key=k)
        with pytest.raises(botocore.exceptions.ResponseStreamingError):
            resp["Body"].read()


def test_exhausted_retry_budget_fails_with_a_clear_error(weed):
    with FaultProxy(weed.endpoint_url, fraction=1.0, kinds=("internal_error",)) as px:
        c = client(px.endpoint_url, weed.access_key, weed.secret_key, attempts=3)
        with pytest.raises(botocore.exceptions.ClientError) as e:
            c.put_object(Bucket=BUCKET, Key=key(), Body=b"x")
        assert e.value.response["Error"]["Code"] == "InternalError"
        assert px.stats()["requests"] == 3
        # s3fs: spent 5xx budgets become OSError; spent connection budgets do not (see
        # s3_clients.transport_errors), which put_if_absent turns into the builtin ConnectionError.
        fs = fs_for(px.endpoint_url, weed, max_attempts=2)
        with pytest.raises(OSError) as e:
            fs.pipe_file(f"{BUCKET}/{key()}", b"x")
        assert e.value.errno == errno.EREMOTEIO
        px.configure(kinds=("reset",))
        with pytest.raises(s3_clients.transport_errors()):
            fs.pipe_file(f"{BUCKET}/{key()}", b"x")
        with pytest.raises(ConnectionError, match="may or may not exist"):
            s3_clients.put_if_absent(fs, f"{BUCKET}/{key()}", b"x")
