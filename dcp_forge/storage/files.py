"""Opening the data files a checkpoint's records name: inside the checkpoint, or not at all.

Every reader of stored items (loading, read-once loading, ``verify``, ``inspect``, ``diff``,
``convert``) opens data files through ``open_data_file`` and bounds each item with ``extent_problem``
before it allocates or seeks, so a crafted ``.metadata`` or index can make none of them:

- open a file outside the checkpoint directory: a name must be one plain path segment
  (``../x``, ``/etc/passwd``, ``a/../../b`` are refused before the storage is asked);
- follow a symbolic link (to a file outside, or anywhere): local files are opened with
  ``O_NOFOLLOW``, so a link is refused by the kernel itself, without a window between a check and
  the open;
- allocate or seek by a recorded length or offset the file cannot hold (negative, or past its end).

Torch-free: inspection tools use it without importing torch.
"""

from __future__ import annotations

import errno
import re
from typing import TypeGuard

from ..errors import IntegrityError, UnsafeCheckpointError
from .backends import InputFile, StorageBackend

# Data file names are one path segment: a crafted .metadata or index cannot make a reader open a file
# outside the checkpoint directory ('../x', '/etc/passwd', 'a/../../b').
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}$")


def safe_file_name(name: object) -> TypeGuard[str]:
    """Whether ``name`` is one plain file name inside the checkpoint directory."""
    return isinstance(name, str) and _SAFE_NAME_RE.match(name) is not None and ".." not in name


def unsafe_file_name(name: object) -> bool:
    """Whether ``name`` is anything but one plain file name inside the checkpoint directory."""
    return not safe_file_name(name)


def open_data_file(backend: StorageBackend, path: str, name: object, where: str, holds: str,
                   size: int | None = None) -> InputFile:
    """Open the data file ``name`` of the checkpoint directory ``path`` (``where``: its URL for messages;
    ``holds``: what the file holds, for messages; ``size``: its length from a listing, if known).

    Raises UnsafeCheckpointError for a name that is not one plain path segment or a file that is a
    symbolic link, and IntegrityError for a missing file.
    """
    if not safe_file_name(name):
        raise UnsafeCheckpointError(
            f"{where}: refusing to open data file {name!r} (holds {holds}): it is outside the checkpoint "
            "directory (data file names must be one plain path segment)")
    try:
        return backend.open_input(backend.join(path, name), size=size)
    except FileNotFoundError as err:
        raise IntegrityError(f"{where}: data file {name} is missing (holds {holds})") from err
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise UnsafeCheckpointError(
                f"{where}: refusing to read data file {name} (holds {holds}): it is a symbolic link, which "
                "could lead outside the checkpoint directory") from err
        raise


def extent_fits(file_size: int, offset: object, length: object) -> bool:
    """Whether ``length`` bytes at ``offset`` (non-negative ints) lie inside a file of ``file_size``
    bytes: the common case of ``extent_problem``, with no message to build."""
    return _is_count(offset) and _is_count(length) and offset + length <= file_size


def extent_problem(where: str, name: str, file_size: int, offset: object, length: object, holds: str) -> str | None:
    """Why ``length`` bytes at ``offset`` of data file ``name`` (``file_size`` bytes long) cannot be an
    item's bytes; None when they can. ``holds``: the item, for the message."""
    if extent_fits(file_size, offset, length):
        return None
    if not _is_count(offset) or not _is_count(length):
        return (f"{where}: the location of {holds} in data file {name} is malformed (offset {offset!r}, length "
                f"{length!r}; both must be non-negative ints)")
    return f"{where}: data file {name} is truncated: it has {file_size} bytes, {holds} ends at byte {offset + length}"


def check_extent(where: str, name: str, file_size: int, offset: object, length: object, holds: str) -> None:
    """``extent_problem`` as an IntegrityError, for readers that stop at the first problem."""
    problem = extent_problem(where, name, file_size, offset, length, holds)
    if problem is not None:
        raise IntegrityError(problem)


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
