"""S3 and S3-compatible object stores: Arrow's C++ client moves the data, s3fs does the rest.

Why two clients: ``pyarrow.fs.S3FileSystem`` uploads the parts of a multipart upload in parallel
from C++ threads and reads ranges straight into caller memory; s3fs uploads the parts of an open
file one after another and copies every read, so Arrow is the faster data client through dcp_forge
(``benchmarks/s3.py`` measures both; docs/PERFORMANCE.md). The Arrow data path lives in ``arrow_io.py``. s3fs
keeps the control path: conditional PUTs of the claim and commit markers (Arrow cannot send
``If-None-Match``), listing and batched deletes. Both clients get the same endpoint, credentials,
region and retry budget, derived from one set of fsspec ``storage_options`` (``S3Settings``).

Options of our own in ``storage_options`` (removed before s3fs sees them):

- ``data_client``: ``"auto"`` (default: Arrow when it can reproduce the s3fs settings, else s3fs),
  ``"arrow"`` or ``"s3fs"``.

Retries: both SDKs retry every request with exponential backoff on 5xx, SlowDown, throttling,
connection resets and timeouts, ``max_attempts`` in total per request (default 10), and without
the client-wide retry quota of their "standard" modes, which one long outage would empty for every
later save of the process (``s3_retries.py``). Only the commit markers are not blindly idempotent;
``put_if_absent`` guards them with the condition and resolves a lost reply by reading the marker back.

Server quirks handled here (checked against SeaweedFS 4.48 and moto 5 server mode):

- A refused conditional PUT reaches s3fs as ``FileExistsError`` from AWS and moto, but as
  ``OSError(EINVAL, 'At least one of the pre-conditions ...')`` from SeaweedFS.
- The region goes into botocore's config (``config_kwargs``), never ``client_kwargs``: s3fs copies
  the latter into CreateBucket's LocationConstraint, which AWS and moto refuse for us-east-1.
- SeaweedFS lists a deleted prefix as a directory for ~150 s. Nothing here infers "a checkpoint
  exists" from a prefix: lifecycle.py looks for the marker object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import random
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from ..errors import LocationNotFoundError
from .arrow_io import ArrowInput, ArrowOutput
from .backends import (
    InputFile,
    OutputStream,
    StorageBackend,
    _FsspecInput,
    _FsspecOutput,
    entry_names,
    file_sizes,
)

# Markers are tiny; a larger body would make s3fs switch to multipart, where the condition is only
# checked at CompleteMultipartUpload and two concurrent uploads are not race-safe.
MAX_MARKER_BYTES = 5 * 2**20
DEFAULT_MAX_ATTEMPTS = 10
DATA_CLIENTS = ("auto", "arrow", "s3fs")


# s3fs options Arrow has no equivalent for: with any of them set, data goes through s3fs too, so
# that both paths see the same identity, encryption and request settings.
_S3FS_ONLY_OPTIONS = frozenset({"profile", "anon", "session", "requester_pays", "s3_additional_kwargs",
                                "version_aware", "fixed_upload_size"})
_PORTABLE_CLIENT_KWARGS = frozenset({"endpoint_url", "region_name"})


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """Endpoint, credentials and retry policy shared by both clients.

    ``access_key``/``secret_key`` None means: let each SDK find credentials itself (environment,
    profile, instance role). Secrets are left out of ``repr`` so settings can be logged.
    """

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = dataclasses.field(default=None, repr=False)
    region: str = "us-east-1"
    # Total attempts per request, the first included. botocore's own ``max_attempts`` key counts
    # retries (total - 1), so s3fs gets ``total_max_attempts``.
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    session_token: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            u = urlsplit(self.endpoint_url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"S3 'endpoint_url' must be http(s)://host[:port] (got {self.endpoint_url!r})")
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("S3 'key' and 'secret' must be given together or not at all")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"S3 'max_attempts' must be an int >= 1 (got {self.max_attempts!r})")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> S3Settings:
        env = os.environ if env is None else env
        return cls(**{"endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
                      "access_key": env.get("AWS_ACCESS_KEY_ID"), "secret_key": env.get("AWS_SECRET_ACCESS_KEY"),
                      "session_token": env.get("AWS_SESSION_TOKEN"), "region": _env_region(env), **overrides})

    @classmethod
    def from_server(cls, info: Any, **overrides: Any) -> S3Settings:
        """From a ``tools.s3_server.ServerInfo``."""
        return cls(endpoint_url=info.endpoint_url, access_key=info.access_key,
                   secret_key=info.secret_key, region=info.region, **overrides)

    @classmethod
    def from_storage_options(cls, options: Mapping[str, Any], env: Mapping[str, str] | None = None
                             ) -> S3Settings:
        """What ``s3fs.S3FileSystem(**options)`` would use, with the environment filling the gaps."""
        client = options.get("client_kwargs") or {}
        config = options.get("config_kwargs") or {}
        retries = config.get("retries") or {}
        from_env = cls.from_env(env)
        key = options.get("key", client.get("aws_access_key_id"))
        secret = options.get("secret", client.get("aws_secret_access_key"))
        if key is None and secret is None:
            key, secret = from_env.access_key, from_env.secret_key
        return cls(endpoint_url=options.get("endpoint_url") or client.get("endpoint_url") or from_env.endpoint_url,
                   access_key=key, secret_key=secret,
                   session_token=options.get("token", client.get("aws_session_token", from_env.session_token)),
                   region=config.get("region_name") or client.get("region_name") or from_env.region,
                   max_attempts=attempts_per_request(retries),
                   connect_timeout=float(config.get("connect_timeout", cls.connect_timeout)),
                   read_timeout=float(config.get("read_timeout", cls.read_timeout)))


def _env_region(env: Mapping[str, str]) -> str:
    return env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1"


def attempts_per_request(retries: Mapping[str, Any]) -> int:
    """Total attempts per request that botocore's ``retries`` config means (first one included)."""
    if "total_max_attempts" in retries:
        return int(retries["total_max_attempts"])
    if "max_attempts" in retries:
        return int(retries["max_attempts"]) + 1
    return DEFAULT_MAX_ATTEMPTS


# ----------------------------------------------------------------------------------- clients

def s3fs_kwargs(settings: S3Settings, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for ``s3fs.S3FileSystem`` (also usable as fsspec ``storage_options``)."""
    kw: dict[str, Any] = {
        "config_kwargs": {
            # Region here signs requests without s3fs adding a LocationConstraint to CreateBucket.
            "region_name": settings.region,
            "retries": {"total_max_attempts": settings.max_attempts, "mode": "standard"},
            "connect_timeout": settings.connect_timeout,
            "read_timeout": settings.read_timeout,
        },
    }
    if settings.endpoint_url:
        kw["endpoint_url"] = settings.endpoint_url
    if settings.access_key is not None:
        kw["key"], kw["secret"] = settings.access_key, settings.secret_key
    if settings.session_token is not None:
        kw["token"] = settings.session_token
    kw.update(extra)
    return kw


def make_s3fs(settings: S3Settings, **extra: Any) -> Any:
    """An ``s3fs.S3FileSystem`` for the settings (``extra``: more constructor arguments), retrying
    each request on its own budget (``s3_retries.RetryingS3FileSystem``)."""
    from .s3_retries import RetryingS3FileSystem

    return RetryingS3FileSystem(**s3fs_kwargs(settings, **extra))


def make_arrow_fs(settings: S3Settings, **extra: Any) -> Any:
    """A ``pyarrow.fs.S3FileSystem`` with the same endpoint, keys, region and retry budget
    (``max_attempts`` up to ``s3_retries.ARROW_MAX_ATTEMPTS``).

    Arrow takes ``endpoint_override`` with the scheme included. Its ``request_timeout`` is only
    honoured on Windows and macOS, so on Linux a stalled server is bounded by the retries.
    """
    import pyarrow.fs as pafs

    from .s3_retries import arrow_retry_strategy

    kw: dict[str, Any] = dict(
        region=settings.region, connect_timeout=settings.connect_timeout, request_timeout=settings.read_timeout,
        retry_strategy=arrow_retry_strategy(settings.max_attempts),
        # Checkpoints never need Arrow's empty "directory" marker objects; skipping them saves a
        # request per file and leaves nothing behind that listing could mistake for data.
        check_directory_existence_before_creation=False)
    if settings.endpoint_url:
        kw["endpoint_override"] = settings.endpoint_url
        kw["scheme"] = urlsplit(settings.endpoint_url).scheme
    if settings.access_key is not None:
        kw["access_key"], kw["secret_key"] = settings.access_key, settings.secret_key
        if settings.session_token is not None:
            kw["session_token"] = settings.session_token
    kw.update(extra)
    return pafs.S3FileSystem(**kw)


@functools.lru_cache(maxsize=16)
def _shared_arrow_fs(settings: S3Settings) -> Any:
    # One client per settings for the process: it owns a connection pool, and Arrow clients are
    # thread-safe, so writer threads, reader threads and async saves share it.
    return make_arrow_fs(settings)


# ------------------------------------------------------------------------------------ errors

def _client_errors(exc: BaseException | None) -> Iterator[dict[str, Any]]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and "Error" in response:
            yield response
        exc = exc.__cause__ or exc.__context__


def is_precondition_failed(exc: BaseException) -> bool:
    """True for a refused conditional request, whatever shape s3fs gave it.

    EINVAL alone is not enough: s3fs also uses it for InvalidArgument, InvalidRange,
    InvalidBucketName... so the botocore error behind it decides, or SeaweedFS's message.
    """
    for response in _client_errors(exc):
        code = response["Error"].get("Code", "")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "412") or status == 412:
            return True
    return (isinstance(exc, OSError) and exc.errno == errno.EINVAL
            and "pre-condition" in str(exc.args[-1] if exc.args else ""))


def _is_conditional_conflict(exc: BaseException) -> bool:
    # AWS answers 409 ConditionalRequestConflict while another conditional write to the key is in
    # flight; nothing is decided yet, so asking again is safe (the loser then gets 412).
    return any(r["Error"].get("Code") == "ConditionalRequestConflict" for r in _client_errors(exc))


def transport_errors() -> tuple[type[BaseException], ...]:
    """What s3fs lets escape untranslated once retries are spent on a broken connection.

    Not OSError subclasses, so ``except OSError`` misses them: botocore's ``EndpointConnectionError``,
    ``ConnectionClosedError``, ``ResponseStreamingError`` and aiohttp's ``ClientPayloadError``.
    Exhausted 5xx answers, by contrast, come out as ``OSError(EREMOTEIO)`` / ``OSError(EBUSY)``.
    """
    import botocore.exceptions as be

    errors: list[type[BaseException]] = [be.HTTPClientError, be.ConnectionError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(errors)


@contextlib.contextmanager
def s3_errors(action: str, path: str) -> Iterator[None]:
    """Errors of one s3fs call as builtins that say what failed on which object.

    Transport errors (not OSError) become ``ConnectionError``; s3fs's translated answers
    (``OSError(EREMOTEIO, 'We encountered an internal error...')``) carry no key, so they get the
    ``s3://`` path as their filename. Errors that already name their object pass unchanged.
    """
    try:
        yield
    except transport_errors() as err:  # first: botocore's ReadTimeoutError is also an OSError
        raise ConnectionError(f"{action} of s3://{path} failed on the connection after all retries "
                              f"({type(err).__name__})") from err
    except OSError as err:
        if _no_such_bucket(err):
            bucket = path.split("/", 1)[0]
            raise LocationNotFoundError(
                errno.ENOENT, f"no such S3 bucket ({action} of s3://{path}); check the URL, or create the bucket: "
                "dcp_forge never creates one", f"s3://{bucket}") from err
        if err.errno is None or err.filename is not None:
            raise
        raise OSError(err.errno, f"{action} failed: {err.strerror or err}", f"s3://{path}") from err


def _no_such_bucket(exc: BaseException) -> bool:
    # s3fs gives every 404 as FileNotFoundError: a missing key, an empty prefix and a missing bucket
    # alike. Only the last means the URL is wrong, and only the S3 error code says which it is.
    return any(r["Error"].get("Code") == "NoSuchBucket" for r in _client_errors(exc))


def put_if_absent(fs: Any, path: str, data: bytes, *, verify_lost_reply: bool = True,
                  conflict_retries: int = 5) -> None:
    """Create ``path`` holding ``data`` with one conditional PUT; ``FileExistsError`` if it exists.

    ``fs`` is an ``s3fs.S3FileSystem``. botocore may resend the PUT (on 5xx, resets): the condition
    makes that safe, with one ambiguity. If the first attempt was applied but its reply lost, the
    retry sees 412 for our own object; with ``verify_lost_reply`` we read it back and take identical
    bytes as success, which is sound only because ``data`` is unique to this writer (markers carry
    a save id). When retries run out on the connection the outcome is unknown: that is the builtin
    ``ConnectionError``, never "created" or "exists".
    """
    if len(data) > MAX_MARKER_BYTES:
        raise ValueError(f"conditional create is for small markers (<= {MAX_MARKER_BYTES} bytes); got "
                         f"{len(data)} bytes for {path!r}: multipart conditional uploads are not race-safe")
    cause: BaseException | None = None
    for attempt in range(conflict_retries + 1):
        try:
            fs.pipe_file(path, data, mode="create")
            return
        except transport_errors() as err:  # first: botocore's ReadTimeoutError is also an OSError
            raise ConnectionError(f"conditional PUT of {path!r} failed on the connection after all "
                                  f"retries ({type(err).__name__}); the object may or may not exist now") from err
        except OSError as err:  # FileExistsError is an OSError too
            if isinstance(err, FileExistsError) or is_precondition_failed(err):
                cause = err
                break
            if _is_conditional_conflict(err) and attempt < conflict_retries:
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
                continue
            raise
    if verify_lost_reply:
        try:
            if fs.cat_file(path) == data:
                return
        except FileNotFoundError:
            pass  # deleted meanwhile: still not ours, and the refusal stands
        except transport_errors() as err:
            raise ConnectionError(f"conditional PUT of {path!r} was refused and reading the object back "
                                  f"failed ({type(err).__name__}); whose object it is is unknown") from err
    raise FileExistsError(errno.EEXIST, "object already exists (conditional PUT If-None-Match: * was "
                          "refused)", path) from cause


# --------------------------------------------------------------------------------- data path

class _S3fsOutput(_FsspecOutput):
    """s3fs's buffered upload, its errors naming the object (``s3_errors``)."""

    def write(self, data: Any) -> int:
        with s3_errors("upload", self.path):
            return super().write(data)

    def close(self) -> None:
        with s3_errors("upload", self.path):
            super().close()

    def abort(self) -> None:
        with s3_errors("abort of the upload", self.path):
            super().abort()


class _S3fsInput(_FsspecInput):
    """s3fs's ranged reads, their errors naming the object (``s3_errors``)."""

    def __init__(self, fs: Any, path: str, size: int | None = None) -> None:
        with s3_errors("open for reading", path):
            super().__init__(fs, path, size)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        with s3_errors("read", self.path):
            super().read_into(offset, buffer)


class S3Backend(StorageBackend):
    """An S3 bucket. ``fs`` (s3fs) is the control path; ``arrow_fs`` (or None: s3fs) moves data."""

    atomicity = ("commit marker created by one conditional PUT (If-None-Match: *) after every data "
                 "upload and record has completed")

    def __init__(self, fs: Any, arrow_fs: Any | None = None) -> None:
        super().__init__(fs)
        self.arrow_fs = arrow_fs

    @property
    def data_client(self) -> str:
        return "s3fs" if self.arrow_fs is None else "arrow"

    def read_bytes(self, path: str) -> bytes:
        with s3_errors("read", path):
            # One GET: s3fs asks for the size first (a HEAD) when it may split the read into parallel
            # ranges, which the small files read whole never need.
            return self.fs.cat_file(path, max_concurrency=1)

    def create_exclusive(self, path: str, data: bytes) -> None:
        with s3_errors("conditional PUT", path):
            put_if_absent(self.fs, path, data)

    def open_output(self, path: str) -> OutputStream:
        if self.arrow_fs is not None:
            return ArrowOutput(self.arrow_fs, path)
        with s3_errors("upload", path):
            return _S3fsOutput(self.fs, path)

    def open_input(self, path: str, size: int | None = None) -> InputFile:
        if self.arrow_fs is not None:  # pyarrow opens by path only, asking for the size itself (a HEAD)
            return ArrowInput(self.arrow_fs, path)
        return _S3fsInput(self.fs, path, size)

    def makedirs(self, path: str) -> None:
        pass  # prefixes exist by having objects under them

    def exists(self, path: str) -> bool:
        with s3_errors("existence check", path):
            return self.fs.exists(path)

    def list_dir(self, path: str, dirs_only: bool = False) -> list[str]:
        try:
            with s3_errors("listing", path):
                entries = self.fs.ls(path, detail=True, refresh=True)
        except LocationNotFoundError:
            raise  # no bucket: not an empty directory
        except (FileNotFoundError, NotADirectoryError):
            return []
        return entry_names(path, entries, dirs_only)

    def list_sizes(self, path: str) -> dict[str, int]:
        try:
            with s3_errors("listing", path):
                entries = self.fs.ls(path, detail=True, refresh=True)
        except LocationNotFoundError:
            raise
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return file_sizes(path, entries)

    def remove(self, path: str) -> None:
        try:
            with s3_errors("delete", path):
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        prefix = path.rstrip("/") + "/"
        with s3_errors("batched delete", prefix):
            objects = [p for p, info in self.fs.find(prefix, detail=True).items() if info.get("type") != "directory"]
            if objects:
                self.fs.rm(objects)  # batched DeleteObjects, 1000 keys a request
        self.fs.invalidate_cache(path)


def control_options(storage_options: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """s3fs constructor options with our defaults filled in, and the chosen ``data_client``."""
    options = dict(storage_options)
    data_client = options.pop("data_client", "auto")
    if data_client not in DATA_CLIENTS:
        raise ValueError(f"storage option 'data_client' must be one of {DATA_CLIENTS} (got {data_client!r})")
    # Ranks list what other processes wrote: a listing cached in this process would hide it.
    options.setdefault("use_listings_cache", False)
    config = dict(options.get("config_kwargs") or {})
    # Standard mode unless the user chose one: a retries dict without "mode" would otherwise get
    # botocore's legacy mode, whose backoff and error classes differ from Arrow's strategy.
    retries = {"mode": "standard", **(config.get("retries") or {})}
    if "total_max_attempts" not in retries and "max_attempts" not in retries:
        retries["total_max_attempts"] = DEFAULT_MAX_ATTEMPTS
    config["retries"] = retries
    config.setdefault("connect_timeout", S3Settings.connect_timeout)
    config.setdefault("read_timeout", S3Settings.read_timeout)
    options["config_kwargs"] = config
    return options, data_client


def arrow_obstacles(options: Mapping[str, Any]) -> list[str]:
    """What in these s3fs options Arrow's client cannot reproduce (empty: it can move the data)."""
    obstacles = sorted(_S3FS_ONLY_OPTIONS & set(options))
    client = options.get("client_kwargs") or {}
    extra_client = set(client) - _PORTABLE_CLIENT_KWARGS - {"aws_access_key_id", "aws_secret_access_key",
                                                             "aws_session_token"}
    if extra_client:
        obstacles.append(f"client_kwargs {sorted(extra_client)}")
    from .s3_retries import ARROW_MAX_ATTEMPTS

    attempts = attempts_per_request((options.get("config_kwargs") or {}).get("retries") or {})
    if attempts > ARROW_MAX_ATTEMPTS:
        obstacles.append(f"{attempts} attempts per request (Arrow's backoff is uncapped: at most "
                         f"{ARROW_MAX_ATTEMPTS})")
    return obstacles


def arrow_portable(options: Mapping[str, Any]) -> bool:
    """Can Arrow reproduce what s3fs would do with these options?"""
    return not arrow_obstacles(options)


def open_s3(url: str, storage_options: Mapping[str, Any]) -> tuple[S3Backend, str]:
    """The backend for an ``s3://bucket/prefix`` URL and its native ``bucket/prefix`` path."""
    import s3fs  # noqa: F401 - an ImportError here becomes the registry's install hint

    from .s3_retries import RetryingS3FileSystem

    options, data_client = control_options(storage_options)
    fs = RetryingS3FileSystem(**options)
    path = url.split("://", 1)[1].strip("/")
    if not path:
        raise ValueError(f"an S3 checkpoint URL needs a bucket: {url!r}")
    obstacles = arrow_obstacles(options)
    if data_client == "arrow" and obstacles:
        raise ValueError(f"storage option data_client='arrow' cannot be used with {', '.join(obstacles)}: "
                         "Arrow's client has no equivalent; use data_client='s3fs' or 'auto'")
    arrow_fs = None
    if data_client == "arrow" or (data_client == "auto" and not obstacles):
        arrow_fs = _shared_arrow_fs(S3Settings.from_storage_options(options))
    return S3Backend(fs, arrow_fs), path
