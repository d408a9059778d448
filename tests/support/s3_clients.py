"""Client recipes for S3, checked against real servers, for the tools (benchmarks, harnesses).

The settings, clients and conditional create the storage layer uses live in
``dcp_forge/storage/s3.py`` and are re-exported here; this module adds the raw ranged reads, listing
and deletion helpers the benchmarks compare dcp_forge against.

Every function here was checked against SeaweedFS 4.48 (``weed mini``, SigV4 enforced) and moto
5.2 server mode, both started by ``tests/support/s3_server.py``; tests: ``tests/test_support_servers.py``.

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

# The client settings and the conditional create live in the package (the S3 backend uses them);
# they are re-exported here so the tools and their tests keep one import.
from dcp_forge.storage.s3 import (  # noqa: F401
    MAX_MARKER_BYTES,
    S3Settings,
    is_precondition_failed,
    make_arrow_fs,
    make_s3fs,
    put_if_absent,
    s3fs_kwargs,
    transport_errors,
)


def wrap_arrow_fs(arrow_fs):
    """fsspec view of an Arrow filesystem: ``open``, ``cat_file(start=, end=)``, ``find``, ``pipe_file``
    all work; paths are ``bucket/key`` without ``s3://``."""
    from fsspec.implementations.arrow import ArrowFSWrapper

    return ArrowFSWrapper(arrow_fs)


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
