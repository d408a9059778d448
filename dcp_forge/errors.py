"""Exceptions of dcp_forge.

Each subclasses the builtin it means, so callers can catch ``ValueError`` / ``FileNotFoundError`` /
``FileExistsError`` without knowing this package, and each message names the component, the rank and
what was expected versus what was found.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterator
from typing import Literal, TypeVar, overload

_T = TypeVar("_T")
_U = TypeVar("_U")


class ForgeError(Exception):
    """Base of every dcp_forge error (mixed into builtin-derived classes below)."""


class ComponentDeclarationError(ForgeError, ValueError):
    """A StateComponent, Topology or planner argument is malformed or inconsistent."""


class DeclarationTypeError(ComponentDeclarationError, TypeError):
    """A declaration field or an argument has the wrong type (so it is a TypeError too)."""


class CheckpointNotFoundError(ForgeError, FileNotFoundError):
    """No committed checkpoint at the given location."""


class LocationNotFoundError(ForgeError, FileNotFoundError):
    """The place checkpoints live in does not exist: an S3 bucket, or a local output_dir together
    with its parent. Unlike CheckpointNotFoundError it never means "nothing saved yet" (an empty
    or new run directory): a mistyped location must not pass for a run that starts from scratch."""


class MissingComponentError(ForgeError, KeyError):
    """A required component (or key) is absent from the checkpoint being loaded."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class UnexpectedComponentError(ForgeError, KeyError):
    """In strict mode, the checkpoint holds a component nobody declared."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StateMismatchError(ForgeError, ValueError):
    """Saved and current state disagree on shape, dtype or structure."""


class UnsupportedValueError(ForgeError, TypeError):
    """A value (or dictionary key) in a component's state that dcp_forge cannot store exactly: refused
    at save time, before anything is written."""


class CheckpointExistsError(ForgeError, FileExistsError):
    """The checkpoint id is already taken by a committed (or in-progress) checkpoint."""


class ReplicationError(ForgeError, ValueError):
    """State declared REPLICATED / PER_GROUP / PER_NODE differs across the ranks that share it."""


class IntegrityError(ForgeError, ValueError):
    """Stored bytes do not match their recorded checksum, or a file is truncated or missing."""


class UnsupportedFormatError(ForgeError, ValueError):
    """The checkpoint was written in a newer on-storage format than this dcp_forge understands."""


class UnsafeCheckpointError(IntegrityError, pickle.UnpicklingError):
    """A stored value or the metadata needs code execution to unpickle, or points outside the checkpoint."""


class TopologyChangeError(ForgeError, ValueError):
    """A component cannot be mapped from the saved topology to the current one under its policy."""


class IncompleteSaveError(ForgeError, RuntimeError):
    """A save's pieces do not make up the whole (a rank's write results missing, a tensor's chunks not
    covering it, fewer ranks planning than the topology has): nothing was committed."""


class TopologyChangeWarning(UserWarning):
    """A load maps state saved on another topology onto this one (what it did, one per component).

    Shown on rank 0 when no log handler would show the same line (``logging.INFO`` on
    ``dcp_forge.coordinator``); ``warnings.simplefilter("ignore", TopologyChangeWarning)`` hides it.
    """


class AsyncSaveError(ForgeError, RuntimeError):
    """An async save failed: staging failed on another rank, or a background save failed earlier.

    A background failure is raised by its handle's ``result()`` as the original typed error. If the
    caller never looked at it on the handle, the next save or ``close()`` raises it as this error
    (chained to the original).
    """


class DrainError(ForgeError, RuntimeError):
    """A checkpoint committed in the local tier could not be drained to the remote tier (``output_dir``).

    The checkpoint stays committed (and loadable) in the local tier; nothing of the failed drain is
    committed remotely. Raised by the next save, ``wait()`` or ``close()`` on every rank, once.
    """


class CollectiveTimeoutError(ForgeError, TimeoutError):
    """A collective over dcp_forge's own process group waited the job's collective timeout
    (``init_process_group(timeout=)``) for a peer rank that never reached it: stuck, or not calling the
    same collective operation (a save, a load) as the others."""


class UndeclaredMutationError(AsyncSaveError):
    """An overlapped async save saw its state change in place before its staging copy was done.

    With ``AsyncOptions(staging="overlapped")`` the call returns before the large tensors are copied,
    and only declared mutation points (an optimizer step with ``install_step_hook``,
    ``wait_for_staging()``, ``with mutating():``) wait for the copy. A tensor of the save that changed
    in place before the first of them makes the copy possibly torn: the save is refused, nothing is
    committed.
    """


def describe_type(value: object) -> str:
    """Render a value and its type the way attrs does: ``'a' that is a <str>``."""
    return f"{value!r} that is a <{type(value).__name__}>"


# expect_type returns the value it checked, typed as what it was checked to be, so a caller binds the
# checked value (``key = expect_type("key", key, str)``) and type checkers see the narrowed type.
@overload
def expect_type(name: str, value: object, expected: type[_T], *, optional: Literal[False] = False,
                owner: str = "") -> _T: ...
@overload
def expect_type(name: str, value: object, expected: type[_T], *, optional: bool, owner: str = "") -> _T | None: ...
@overload
def expect_type(name: str, value: object, expected: tuple[type[_T], type[_U]], *, optional: Literal[False] = False,
                owner: str = "") -> _T | _U: ...
@overload
def expect_type(name: str, value: object, expected: tuple[type[_T], type[_U]], *, optional: bool,
                owner: str = "") -> _T | _U | None: ...
# Three or more kinds: checked alike, but typed only as object (bind the value to an annotated name).
@overload
def expect_type(name: str, value: object, expected: tuple[type, ...], *, optional: bool = False,
                owner: str = "") -> object: ...
def expect_type(name: str, value: object, expected: type | tuple[type, ...], *, optional: bool = False,
                owner: str = "") -> object:
    """``value``, unchanged; a DeclarationTypeError unless it is an ``expected`` (bools are not ints
    here) or, with ``optional``, None."""
    if value is None and optional:
        return value
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds and int in kinds):
        return value
    wanted = " or ".join(f"<{k.__name__}>" for k in kinds) + (" or None" if optional else "")
    raise DeclarationTypeError(f"{name!r}{owner} must be {wanted} (got {describe_type(value)})")


def first_rank_failure(exc: BaseException) -> BaseException | None:
    """The original error of the lowest failing rank inside DCP's ``CheckpointException``.

    DCP gathers every rank's exception into one ``CheckpointException`` (a ``BaseException``, so
    ``except Exception`` misses it). Re-raising the original keeps its type (ValueError,
    FileExistsError, ...) and message for callers; every rank raises the same one.
    """
    failures = getattr(exc, "failures", None)
    if not failures:
        return None
    rank = min(failures)
    original = failures[rank][0]
    if isinstance(original, BaseException):
        if len(failures) > 1 and hasattr(original, "add_note"):
            original.add_note(f"(failed on ranks {sorted(failures)}; showing rank {rank}'s error)")
        return original
    return None


def os_error_with_context(err: OSError, context: str, path: str | None = None) -> OSError:
    """``err`` saying where it happened: a new error of the same class (errno picks the builtin
    subclass: EACCES -> PermissionError, ENOSPC -> OSError...) when it has an errno; without one, a
    builtin class (ConnectionError from S3 retries running out, Arrow's plain OSError) is rebuilt
    with the context in its message, which is what logs and ``str(error)`` show; any other class
    is ``err`` itself with the context as a note. A rebuilt error keeps ``err``'s notes (what
    cleanup after it found). Raise the result ``from err``."""
    if err.errno is None:
        if type(err).__module__ != "builtins":
            err.add_note(context)
            return err
        rebuilt = type(err)(f"{err} ({context})")
    else:
        rebuilt = OSError(err.errno, f"{err.strerror or err}: {context}", path)
    for note in getattr(err, "__notes__", ()):
        rebuilt.add_note(note)
    return rebuilt


@contextlib.contextmanager
def collective_timeout_context(context: Callable[[], str]) -> Iterator[None]:
    """A collective inside that times out raises CollectiveTimeoutError saying ``context()`` (which
    rank waited, in what, for how long). The backends report a timeout as a RuntimeError whose text
    says it timed out; every other error passes unchanged."""
    try:
        yield
    except ForgeError:
        raise
    except RuntimeError as err:
        if "timed out" not in str(err).lower():
            raise
        raise CollectiveTimeoutError(f"{context()}: a peer rank never reached it ({err})") from err


@contextlib.contextmanager
def os_error_context(context: str | Callable[[], str], path: str | None = None) -> Iterator[None]:
    """OSErrors raised inside say where they happened (``os_error_with_context``); our own errors
    (CheckpointExistsError...) already do and pass unchanged. ``context`` may be a function, for a
    description only worth building once something failed."""
    try:
        yield
    except ForgeError:
        raise
    except OSError as err:
        raise os_error_with_context(err, context() if callable(context) else context, path) from err
