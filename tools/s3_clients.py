"""The right way to reach S3 from dcp_forge, as small functions the storage layer can import or copy.

Every function here was checked against SeaweedFS 4.48 (``weed mini``, SigV4 enforced) and moto
5.2 server mode, both started by ``tools/s3_server.py``; tests: ``tests/test_s3_tools.py``.

Findings this module encodes (details in the docstrings):

* One ``S3Settings`` value feeds both clients: s3fs (aiobotocore) and ``pyarrow.fs.S3FileSystem``
  (Arrow's C++ client). The region goes into botocore's ``Config`` (s3fs ``config_kwargs``), never
  into ``client_kwargs``: s3fs copies ``client_kwargs["region_name"]`` into CreateBucket's
  LocationConstraint, and AWS/moto refuse ``us-east-1`` there (``OSError(EINVAL, 'The specified
  location-constraint is not valid')``). Setting ``AWS_DEFAULT_REGION`` also works but mutates the
  process environment.
* Conditional create (``If-None-Match: *``) works on both servers through
  ``fs.pipe_file(path, data, mode="create")``, but the refusal differs: moto (like AWS) sends
  ``<Condition>If-None-Match</Condition>`` and s3fs raises ``FileExistsError``; SeaweedFS omits it
  and s3fs raises ``OSError(22, 'At least one of the pre-conditions you specified did not hold')``.
  ``put_if_absent`` maps both (and a raw 412) to ``FileExistsError``.
* Deleting a prefix: use s3fs (batched DeleteObjects). Arrow's ``delete_dir_contents`` leaves an
  empty ``prefix/`` marker object behind, ``delete_dir`` an empty ``parent/`` one.
* SeaweedFS keeps a deleted prefix visible as a CommonPrefix (``fs.ls`` lists it, ``fs.exists``
  says True) for ~150 s until its empty-folder sweep runs. Never infer "a checkpoint exists" from
  a directory listing; look for its commit marker object.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

# A commit marker is tiny; larger bodies would make s3fs switch to multipart, where the condition
# only applies at CompleteMultipartUpload and concurrent uploads are not race-safe.
MAX_MARKER_BYTES = 5 * 2**20


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """Endpoint, credentials and retry policy shared by both clients.

    ``access_key``/``secret_key`` None means: let each SDK find credentials itself (env, profile).
    The secret is left out of ``repr`` so settings can be logged.
    """

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = dataclasses.field(default=None, repr=False)
    region: str = "us-east-1"
    # Total attempts per request, first one included (botocore "standard" mode and Arrow's
    # AwsStandardS3RetryStrategy both back off exponentially with jitter, capped, on 5xx, SlowDown,
    # throttling and resets). botocore's own ``max_attempts`` key counts *retries* (total - 1), so
    # s3fs gets ``total_max_attempts``. s3fs adds up to 5 more tries of its own on top for
    # SlowDown, timeouts and broken bodies (``S3FileSystem.retries``).
    max_attempts: int = 10
    connect_timeout: float = 5.0
    read_timeout: float = 60.0

    def __post_init__(self):
        if self.endpoint_url is not None:
            u = urlsplit(self.endpoint_url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"'endpoint_url' must be http(s)://host[:port] (got {self.endpoint_url!r})")
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("'access_key' and 'secret_key' must be given together or not at all")
        if self.max_attempts < 1:
            raise ValueError(f"'max_attempts' must be >= 1 (got {self.max_attempts!r})")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> S3Settings:
        env = os.environ if env is None else env
        return cls(endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
                   access_key=env.get("AWS_ACCESS_KEY_ID"), secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
                   region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
                   **overrides)

    @classmethod
    def from_server(cls, info, **overrides) -> S3Settings:
        """From a ``tools.s3_server.ServerInfo``."""
        return cls(endpoint_url=info.endpoint_url, access_key=info.access_key,
                   secret_key=info.secret_key, region=info.region, **overrides)


# ----------------------------------------------------------------------------------- clients

def s3fs_kwargs(settings: S3Settings, **extra) -> dict:
    """Keyword arguments for ``s3fs.S3FileSystem`` (also usable as fsspec ``storage_options``)."""
    kw = {
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
    kw.update(extra)
    return kw


def make_s3fs(settings: S3Settings, **extra):
    """An ``s3fs.S3FileSystem``. Use it for the control path: markers, listing, deletion.

    ``extra`` goes to the constructor, e.g. ``max_concurrency``, ``default_block_size``,
    ``use_listings_cache=False`` (a listing cached in one process hides what another rank wrote).
    """
    import s3fs

    return s3fs.S3FileSystem(**s3fs_kwargs(settings, **extra))


def make_arrow_fs(settings: S3Settings, **extra):
    """A ``pyarrow.fs.S3FileSystem`` with the same endpoint, keys, region and retry budget.

    Arrow takes ``endpoint_override`` with the scheme included (``http://127.0.0.1:8333``).
    ``request_timeout`` is only honoured by the AWS SDK on Windows/macOS, so a stalled server is
    bounded by the retry strategy, not by a read timeout, on Linux.
    """
    import pyarrow.fs as pafs

    kw = dict(region=settings.region, connect_timeout=settings.connect_timeout,
              request_timeout=settings.read_timeout,
              retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts))
    if settings.endpoint_url:
        kw["endpoint_override"] = settings.endpoint_url
        kw["scheme"] = urlsplit(settings.endpoint_url).scheme
    if settings.access_key is not None:
        kw["access_key"], kw["secret_key"] = settings.access_key, settings.secret_key
    kw.update(extra)
    return pafs.S3FileSystem(**kw)


def wrap_arrow_fs(arrow_fs):
    """fsspec view of an Arrow filesystem: ``open``, ``cat_file(start=, end=)``, ``find``, ``pipe_file``
    all work; paths are ``bucket/key`` without ``s3://``."""
    from fsspec.implementations.arrow import ArrowFSWrapper

    return ArrowFSWrapper(arrow_fs)


# ------------------------------------------------------------------------ conditional create

def _client_errors(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        resp = getattr(exc, "response", None)
        if isinstance(resp, dict) and "Error" in resp:
            yield resp
        exc = exc.__cause__ or exc.__context__


def is_precondition_failed(exc: BaseException) -> bool:
    """True for a refused conditional request, whatever shape s3fs gave it.

    s3fs turns 412 into ``FileExistsError`` only when the body carries ``Condition: If-None-Match``
    (AWS, moto); otherwise (SeaweedFS) into ``OSError(EINVAL, 'At least one of the pre-conditions
    you specified did not hold')``. EINVAL alone is not enough: s3fs uses it for InvalidArgument,
    InvalidRange, InvalidBucketName... so we look at the botocore error behind it.
    """
    for resp in _client_errors(exc):
        code = resp["Error"].get("Code", "")
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "PreconditionFailed" or status == 412 or code == "412":
            return True
    return (isinstance(exc, OSError) and exc.errno == errno.EINVAL
            and "pre-condition" in str(exc.args[-1] if exc.args else ""))


def _is_conditional_conflict(exc: BaseException) -> bool:
    # AWS answers 409 ConditionalRequestConflict while another conditional write to the key is in
    # flight; the outcome is not decided yet, so asking again is safe (the loser then gets 412).
    return any(r["Error"].get("Code") == "ConditionalRequestConflict" for r in _client_errors(exc))


def transport_errors() -> tuple[type[BaseException], ...]:
    """What s3fs lets escape *untranslated* once retries are spent on a broken connection.

    Not OSError subclasses, so ``except OSError`` misses them: botocore's
    ``EndpointConnectionError`` (also raised for a reset after connecting: "Could not connect to
    the endpoint URL"), ``ConnectionClosedError``, ``ResponseStreamingError``, and aiohttp's
    ``ClientPayloadError`` (a body cut mid-stream in s3fs's concurrent ``cat_file``). Exhausted
    5xx answers, by contrast, come out as ``OSError(EREMOTEIO)`` (500) / ``OSError(EBUSY)`` (503).
    """
    import botocore.exceptions as be

    errs: list[type[BaseException]] = [be.HTTPClientError, be.ConnectionError]
    try:
        import aiohttp

        errs.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(errs)


def put_if_absent(fs, path: str, data: bytes, *, verify_lost_reply: bool = True,
                  conflict_retries: int = 5) -> None:
    """Create ``path`` holding ``data`` with one conditional PUT; ``FileExistsError`` if it exists.

    ``fs`` is an ``s3fs.S3FileSystem``. The PUT is safe to retry at the HTTP level (botocore does so
    on 5xx and resets) because the condition guards it, with one ambiguity: if the first attempt was
    applied but its reply lost, the retry sees 412 for our *own* object. With
    ``verify_lost_reply`` we then read the object back and treat identical bytes as success, which
    is sound only if ``data`` is unique to this writer (put a UUID / writer id / timestamp in it).

    When retries run out on transport errors the outcome is unknown; that surfaces as the builtin
    ``ConnectionError`` (never as "created" or "exists"), so the caller can look before retrying.
    """
    if len(data) > MAX_MARKER_BYTES:
        raise ValueError(f"conditional create is for small markers (<= {MAX_MARKER_BYTES} bytes); got "
                         f"{len(data)} bytes for {path!r}: multipart conditional uploads are not race-safe")
    for attempt in range(conflict_retries + 1):
        try:
            fs.pipe_file(path, data, mode="create")
            return
        except transport_errors() as e:  # first: botocore's ReadTimeoutError is also an OSError
            raise ConnectionError(f"conditional PUT of {path!r} failed on the connection after all "
                                  f"retries ({type(e).__name__}); the object may or may not exist now") from e
        except OSError as e:  # FileExistsError is an OSError too
            if isinstance(e, FileExistsError) or is_precondition_failed(e):
                cause = e
                break
            if _is_conditional_conflict(e) and attempt < conflict_retries:
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
                continue
            raise
    if verify_lost_reply:
        try:
            if fs.cat_file(path) == data:
                return
        except FileNotFoundError:
            pass  # deleted meanwhile: still not ours, and someone else's 412 stands
        except transport_errors() as e:
            raise ConnectionError(f"conditional PUT of {path!r} was refused and reading the object back "
                                  f"failed ({type(e).__name__}); whose object it is is unknown") from e
    raise FileExistsError(errno.EEXIST, "object already exists (conditional PUT If-None-Match: * was "
                          "refused)", path) from cause


# --------------------------------------------------------------------------------- ranged reads

def read_range_s3fs(fs, path: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` with one ranged GET (s3fs retries the whole call, body included)."""
    return fs.cat_file(path, start=start, end=end)


def read_range_arrow(arrow_fs, path: str, start: int, length: int) -> bytes:
    """One ranged GET. For many ranges of one object, open once and call ``read_at`` on the file
    (``open_input_file`` costs a HEAD; ``read_at`` is safe to call from several threads)."""
    with arrow_fs.open_input_file(path) as f:
        return f.read_at(length, start)


def readinto_arrow(arrow_file, offset: int, out) -> int:
    """Fill ``out`` (any writable buffer: ``memoryview(tensor.numpy()).cast('B')``) from ``offset``
    of an open Arrow input file, straight into the destination without an intermediate bytes."""
    arrow_file.seek(offset)
    return arrow_file.readinto(out)


# -------------------------------------------------------------------------------- list / delete

def list_prefix_s3fs(fs, prefix: str) -> dict[str, int]:
    """``{path: size}`` of every object under ``prefix`` (recursive; fresh, not from the cache).

    The type filter matters on SeaweedFS: for a prefix whose objects were deleted, the empty
    folder survives for a while and s3fs ``find`` returns ``{prefix: {'type': 'directory'}}``.
    """
    fs.invalidate_cache(prefix)
    return {p: d["size"] for p, d in fs.find(prefix, detail=True).items() if d.get("type") == "file"}


def list_prefix_arrow(arrow_fs, prefix: str) -> dict[str, int]:
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(prefix.rstrip("/"), recursive=True, allow_not_found=True)
    # Arrow also reports implied directories; keep objects only.
    return {i.path: i.size for i in arrow_fs.get_file_info(sel) if i.type == pafs.FileType.File}


def delete_prefix_s3fs(fs, prefix: str) -> int:
    """Delete every object under ``prefix``; returns how many. Missing prefix: 0, no error."""
    paths = list(list_prefix_s3fs(fs, prefix))
    if paths:
        fs.rm(paths)  # batched DeleteObjects, 1000 keys a request
        fs.invalidate_cache(prefix)
    return len(paths)


def delete_prefix_arrow(arrow_fs, prefix: str) -> int:
    """Arrow's way, for completeness. It leaves an empty ``prefix/`` marker object behind
    (``delete_dir`` leaves ``parent/`` instead): prefer ``delete_prefix_s3fs``."""
    n = len(list_prefix_arrow(arrow_fs, prefix))
    arrow_fs.delete_dir_contents(prefix.rstrip("/"), missing_dir_ok=True)
    return n
