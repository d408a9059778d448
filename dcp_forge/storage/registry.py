"""Backends by URL scheme. Read-only to users: a ``MappingProxyType`` over the built-in table.

Schemes not in the table reach fsspec's own registry (gs://, az://, ...), with fsspec's install
hint when the package behind them is missing.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Callable, Mapping
from typing import Any

import fsspec

from .backends import FsspecBackend, LocalBackend, StorageBackend

_INSTALL_HINTS = {
    "s3": "pip install 'dcp-forge[s3]' to use s3:// URLs",
    "s3a": "pip install 'dcp-forge[s3]' to use s3:// URLs",
    "gs": "pip install gcsfs to use gs:// URLs",
    "gcs": "pip install gcsfs to use gs:// URLs",
    "az": "pip install adlfs to use az:// URLs",
    "abfs": "pip install adlfs to use abfs:// URLs",
}


def _local(url: str, storage_options: Mapping[str, Any]) -> tuple[StorageBackend, str]:
    path = url[len("file://"):] if url.startswith("file://") else url
    return LocalBackend(fsspec.filesystem("file")), os.path.abspath(os.path.expanduser(path))


def _fsspec(url: str, storage_options: Mapping[str, Any]) -> tuple[StorageBackend, str]:
    scheme = scheme_of(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options))
    except ImportError as err:
        hint = _INSTALL_HINTS.get(scheme) or f"install the fsspec implementation for {scheme}://"
        raise ImportError(f"{hint} ({err.__class__.__name__}: {err})") from err
    return FsspecBackend(fs), path.rstrip("/") or path


def _s3(url: str, storage_options: Mapping[str, Any]) -> tuple[StorageBackend, str]:
    try:
        from .s3 import open_s3

        return open_s3(url, storage_options)
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINTS['s3']} ({err.__class__.__name__}: {err})") from err


BACKENDS: Mapping[str, Callable[[str, Mapping[str, Any]], tuple[StorageBackend, str]]] = types.MappingProxyType({
    "": _local,
    "file": _local,
    "memory": _fsspec,
    "s3": _s3,
    "s3a": _s3,
})


def scheme_of(url: str) -> str:
    if "://" not in url:
        return ""
    return url.split("://", 1)[0].lower()


def open_backend(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
                 ) -> tuple[StorageBackend, str]:
    """The backend for ``url`` and the native path it names."""
    url = os.fspath(url)
    factory = BACKENDS.get(scheme_of(url), _fsspec)
    return factory(url, storage_options or {})


# The user-info of a URL: "user@" or "user:password@". Not urlsplit: secrets often hold '/' or '+'
# (AWS secret keys do), which ends urlsplit's netloc early and would leave the password in the path.
_USERINFO_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)(?:[^/@]*@|[^/@:]*:[^@]*@)")


def redact_url(url: str | os.PathLike) -> str:
    """The URL without any user:password part, for messages, logs and manifests."""
    url = os.fspath(url)
    match = _USERINFO_RE.match(url)
    return url if match is None else match.group(1) + "***@" + url[match.end():]


def join_url(url: str | os.PathLike, *parts: str) -> str:
    """Join path segments onto a URL or local path."""
    url = os.fspath(url)
    if "://" in url:
        return "/".join([url.rstrip("/"), *parts])
    return os.path.join(url, *parts)
