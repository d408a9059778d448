"""The bad-input catalogue: every way a user (or a disk) can hand dcp_forge something wrong, each a row
of one table. Every case must raise an error that subclasses the builtin it means, say what was
expected and what was found, and leave nothing half-written that looks complete: after it, the
output_dir lists exactly the checkpoint committed before it, which still verifies clean.

Cases that need several ranks (declarations that disagree, a world-size change) run on real gloo
ranks in one spawn at the end of the module."""

from __future__ import annotations

import enum
import os
import re
import shutil
import subprocess
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dcp_forge import (
    CheckpointCoordinator,
    ForgeError,
    RNGState,
    StateComponent,
    list_checkpoints,
    verify_checkpoint,
)
from dcp_forge.core.placement import ChunkPolicy
from dcp_forge.format.manifest import FORMAT_VERSION
from dcp_forge.format.names import COMMIT_FILE, MANIFEST_FILE
from tests.support.statefuls import Box
from tests.support.tamper import reseal

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")




class Kind(enum.Enum):
    A = 1


class Broken(Box):
    def state_dict(self):
        raise RuntimeError("state_dict() of a broken stateful")


def model(out: int = 3, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, out).to(dtype)


def declared(**over) -> list[StateComponent]:
    components = {"model": StateComponent("model", model(), "replicated"),
                  "box": StateComponent("box", Box({"step": 3, "t": torch.arange(5)}), "global"),
                  "rng": StateComponent("rng", RNGState(), "per_rank")}
    components.update(over)
    return [c for c in components.values() if c is not None]


def coordinator(root, components=None, **kwargs) -> CheckpointCoordinator:
    return CheckpointCoordinator(components if components is not None else declared(), output_dir=root, **kwargs)


@dataclass(frozen=True)
class Case:
    name: str
    builtin: type[BaseException]  # the builtin the error must subclass
    match: str  # regex the message must match (what was expected, what was found)
    run: Callable  # run(root, good): does the bad thing
    forge: bool = True  # the error is a dcp_forge error (False: the user's own or the OS's, passed through)
    tier: str | None = None  # "dist" for a case that starts a process of its own (tests/conftest.py tiers)


def _sc(*args, **kwargs) -> Callable:
    return lambda root, good: StateComponent(*args, **kwargs)


def _coord(**kwargs) -> Callable:
    return lambda root, good: coordinator(kwargs.pop("output_dir", root), **kwargs)


def _save(checkpoint_id="checkpoint-bad", components=None, output_dir=None, **kwargs) -> Callable:
    return lambda root, good: coordinator(output_dir or root, components).save_checkpoint(
        checkpoint_id=checkpoint_id, **kwargs)


def _load(components=None, path=None, **kwargs) -> Callable:
    return lambda root, good: coordinator(root, components, verify_checksums=kwargs.pop("verify", True)
                                          ).load_checkpoint(path(root, good) if path else good, **kwargs)


def _edit_manifest(edit, seal: bool) -> Callable[[str], None]:
    def change(good: str) -> None:
        if seal:
            reseal(good, manifest_edit=edit)
        else:
            file = os.path.join(good, MANIFEST_FILE)
            text = Path(file).read_text()
            with open(file, "w") as f:
                f.write(edit(text))
    return change


def _tampered(change: Callable[[str], None], **load_kwargs) -> Callable:
    def run(root, good):
        copy = os.path.join(root, "tampered")
        shutil.copytree(good, copy)
        try:
            change(copy)
            coordinator(root, verify_checksums=load_kwargs.pop("verify", True)).load_checkpoint(copy, **load_kwargs)
        finally:
            shutil.rmtree(copy)
    return run


def _junk_dir(root, good):
    os.makedirs(os.path.join(root, "junk"))
    open(os.path.join(root, "junk", "notes.txt"), "w").close()
    try:
        coordinator(root).save_checkpoint(checkpoint_id="junk")
    finally:
        shutil.rmtree(os.path.join(root, "junk"))


def _file_as_output_dir(root, good):
    file = os.path.join(root, "a-file")
    open(file, "w").close()
    try:
        coordinator(file).save_checkpoint(checkpoint_id="c")
    finally:
        os.remove(file)


def _uncommitted(root, good):
    partial = os.path.join(root, "partial")
    shutil.copytree(good, partial)
    os.remove(os.path.join(partial, COMMIT_FILE))
    try:
        coordinator(root).load_checkpoint(partial)
    finally:
        shutil.rmtree(partial)


def _newer_format(text_or_data):
    text_or_data["format_version"] = 99
    return text_or_data


def _save_under_file_size_limit(output_dir: str, conn) -> None:
    """In a child: no file may grow past 1 MiB; save 2 MiB; send back the error."""
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    try:
        coordinator(output_dir, [StateComponent("weights", Box({"w": torch.zeros(1 << 19)}), "global")]
                    ).save_checkpoint(checkpoint_id="too-big")
        conn.send(None)
    except OSError as err:
        conn.send((err.errno, err.strerror, err.filename))


def _full_disk(root, good):
    """A real kernel refusal: writes past RLIMIT_FSIZE fail with EFBIG (Python ignores SIGXFSZ)."""
    from tests.support.dist import rank_context

    ctx = rank_context()
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_save_under_file_size_limit, args=(str(root), sender))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0, f"the child died (exit code {child.exitcode}) instead of raising"
    outcome = receiver.recv()
    assert outcome is not None, "a 2 MiB save under a 1 MiB file size limit succeeded"
    raise OSError(*outcome)  # re-raised here so the table checks it like every other case


def _on_tmpfs(size: str, *, read_only: bool = False) -> Callable:
    """Save 2 MiB onto a tmpfs of ``size`` (needs mount rights; skipped without them), ``read_only``:
    remounted read-only first, which refuses root too (unlike a chmod)."""
    def run(root, good):
        target = os.path.join(root, "tiny-disk")
        os.makedirs(target)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", target],
                          capture_output=True).returncode:
            os.rmdir(target)
            pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
        try:
            if read_only:
                subprocess.run(["mount", "-o", "remount,ro", target], check=True)
            coordinator(target, [StateComponent("weights", Box({"w": torch.zeros(1 << 19)}), "global")]
                        ).save_checkpoint(checkpoint_id="too-big")
        finally:
            assert os.listdir(target) == []  # the failed save removed what it wrote
            subprocess.run(["umount", target], check=True)
            os.rmdir(target)
    return run


CASES = [
    # --- declarations ---------------------------------------------------------------------------
    Case("key of the wrong type", TypeError, r"'key' must be <str> \(got 3 that is a <int>\)", _sc(3, Box({}), "global")),
    Case("key that is a path", ValueError, r"'key' must be a non-empty identifier.*got '\.\./x'",
         _sc("../x", Box({}), "global")),
    Case("unknown pattern", ValueError, r"'sharing_pattern' must be a SharingPattern or one of .* \(got 'sharded'",
         _sc("m", Box({}), "sharded")),
    Case("stateful that is not Stateful", TypeError, r"'stateful' of component 'm' must have state_dict\(\) and "
         r"load_state_dict\(\) \(got <object", _sc("m", object(), "global")),
    Case("required not a bool", TypeError, r"'required' of component 'm' must be <bool> \(got 'yes'",
         _sc("m", Box({}), "global", required="yes")),
    Case("metadata not a dict", TypeError, r"'metadata' of component 'm' must be <dict>",
         _sc("m", Box({}), "global", metadata=[("a", 1)])),
    Case("unknown validation level", ValueError, r"'validation_level' must be a ValidationLevel",
         _sc("m", Box({}), "replicated", validation_level="thorough")),
    Case("unknown mismatch action", ValueError, r"'on_replication_mismatch' of component 'm' must be one of",
         _sc("m", Box({}), "replicated", on_replication_mismatch="ignore")),
    Case("validation without copies", ValueError, r"needs copies to compare.*not PER_RANK",
         _sc("m", Box({}), "per_rank", validate_replication=True)),
    Case("PER_GROUP without a group", ValueError, r"'process_group_name' is required for PER_GROUP component 'm'",
         _sc("m", Box({}), "per_group")),
    Case("group on a REPLICATED component", ValueError, r"only meaningful for PER_GROUP; component 'm' is REPLICATED",
         _sc("m", Box({}), "replicated", process_group_name="dp")),
    # --- coordinator arguments --------------------------------------------------------------------
    Case("one component instead of a list", TypeError, r"'state_components' must be a list of StateComponent",
         lambda root, good: CheckpointCoordinator(StateComponent("m", Box({}), "global"), output_dir=root)),
    Case("a model among the components", TypeError, r"state_components\[3\] must be a StateComponent \(got Linear",
         lambda root, good: CheckpointCoordinator([*declared(), model()], output_dir=root)),
    Case("duplicate keys", ValueError, r"'key' must be unique across state_components: 'box' is declared twice",
         lambda root, good: coordinator(root, [*declared(), StateComponent("box", Box({}), "global")])),
    Case("PER_GROUP group missing from process_groups", ValueError,
         r"components \['stage'\] are PER_GROUP over \['pp'\], which process_groups does not name",
         _coord(components=declared(stage=StateComponent("stage", Box({}), "per_group", process_group_name="pp")))),
    Case("process groups without torch.distributed", ValueError, r"process_groups were given but torch.distributed "
         r"is not initialised", _coord(components=declared(stage=StateComponent(
             "stage", Box({}), "per_group", process_group_name="pp")), process_groups={"pp": object()})),
    Case("process_groups not a mapping", TypeError, r"'process_groups' must be <Mapping> or None",
         _coord(process_groups=["pp"])),
    Case("output_dir of the wrong type", TypeError, r"'output_dir' must be <str> or <PathLike> \(got 5",
         _coord(output_dir=5)),
    Case("storage_options not a mapping", TypeError, r"'storage_options' must be <Mapping>",
         _coord(storage_options=[("key", "x")])),
    Case("node of the wrong type", TypeError, r"'node' must be <int> or <str> or None \(got 1.5", _coord(node=1.5)),
    Case("thread_count a string", TypeError, r"'thread_count' must be <int> \(got '2'", _coord(thread_count="2")),
    Case("thread_count a bool", TypeError, r"'thread_count' must be <int> \(got True", _coord(thread_count=True)),
    Case("thread_count zero", ValueError, r"'thread_count' must be >= 1 \(got 0\)", _coord(thread_count=0)),
    Case("chunk_policy a dict", TypeError, r"'chunk_policy' must be <ChunkPolicy>",
         _coord(chunk_policy={"min_chunk_bytes": 1})),
    Case("chunk policy out of range", ValueError, r"'min_chunk_bytes' must be a positive int \(got 0\)",
         lambda root, good: ChunkPolicy(min_chunk_bytes=0)),
    Case("verify_checksums a string", TypeError, r"'verify_checksums' must be <bool>", _coord(verify_checksums="no")),
    Case("training_args_hash a number", TypeError, r"'training_args_hash' must be <str> or None",
         _coord(training_args_hash=123)),
    # --- save ---------------------------------------------------------------------------------------
    Case("checkpoint_id of the wrong type", TypeError, r"'checkpoint_id' must be <str> \(got 5", _save(5)),
    Case("checkpoint_id escaping output_dir", ValueError, r"'checkpoint_id' must be one path segment.*'\.\./up'",
         _save("../up")),
    Case("both checkpoint_path and checkpoint_id", ValueError, r"pass exactly one of checkpoint_path or checkpoint_id",
         lambda root, good: coordinator(root).save_checkpoint(os.path.join(root, "x"), checkpoint_id="x")),
    Case("validate not a bool", TypeError, r"'validate' must be <bool>", _save(validate="yes")),
    Case("extra that JSON cannot hold", TypeError, r"'extra' must hold JSON values only",
         _save(extra={"when": object()})),
    Case("numpy array in a component's state", TypeError, r"component 'box' on rank 0, key 'noise' holds a "
         r"<ndarray> that cannot be saved exactly: its stored form needs numpy\._core\.multiarray\._reconstruct",
         _save(components=declared(box=StateComponent("box", Box({"noise": np.zeros(3)}), "global")))),
    Case("enum as a dictionary key", TypeError, r"component 'box' on rank 0, key 'by_kind.Kind.A': the key <Kind.A: "
         r"1> on its path 'by_kind\[<Kind.A: 1>\]' is a <Kind>",
         _save(components=declared(box=StateComponent("box", Box({"by_kind": {Kind.A: torch.ones(1)}}), "global")))),
    Case("meta tensor in a component's state", TypeError, r"component 'box' on rank 0, key 't' is a tensor on the "
         r"meta device: it holds no data to save",
         _save(components=declared(box=StateComponent("box", Box({"t": torch.empty(2, device="meta")}), "global")))),
    Case("committed checkpoint_id reused", FileExistsError, r"checkpoint .*checkpoint-good already exists and is "
         r"committed; saves never overwrite", _save("checkpoint-good")),
    Case("non-empty directory as checkpoint_id", FileExistsError, r"is not empty \(holds \['notes.txt'\]\)", _junk_dir),
    Case("output_dir that is a file", OSError, r"a-file", _file_as_output_dir, forge=False),
    Case("read-only output_dir", PermissionError, r"/sys/kernel/checkpoint-1",
         _save("checkpoint-1", output_dir="/sys/kernel"), forge=False),
    Case("stateful whose state_dict raises", RuntimeError, r"state_dict\(\) of a broken stateful",
         _save(components=declared(box=StateComponent("box", Broken({}), "global"))), forge=False),
    Case("full disk (RLIMIT_FSIZE: EFBIG from the kernel)", OSError, r"File too large: rank 0 writing __0_\d\.distcp "
         r"of checkpoint .*too-big \(holds \['weights'\]\)", _full_disk, forge=False, tier="dist"),
    Case("full disk (1 MiB tmpfs: ENOSPC)", OSError, r"No space left on device: rank 0 writing __0_\d\.distcp",
         _on_tmpfs("1m"), forge=False),
    Case("read-only filesystem (tmpfs remounted read-only: EROFS)", OSError, r"Read-only file system: claiming "
         r"checkpoint .*too-big", _on_tmpfs("1m", read_only=True), forge=False),
    Case("a value pickle refuses", TypeError, r"cannot pickle '_thread.lock' object",
         _save(components=declared(box=StateComponent("box", Box({"lock": threading.Lock()}), "global"))),
         forge=False),
    Case("storage scheme without its package", ImportError, r"pip install gcsfs to use gs:// URLs",
         _save(output_dir="gs://bucket/run"), forge=False),
    # --- load ---------------------------------------------------------------------------------------
    Case("nothing to load in a missing output_dir", FileNotFoundError, r"no committed checkpoint under .*nowhere",
         lambda root, good: coordinator(os.path.join(root, "nowhere")).load_checkpoint()),
    Case("loading an uncommitted checkpoint", FileNotFoundError, r"was never committed", _uncommitted),
    Case("strict not a bool", TypeError, r"'strict' must be <bool>", _load(strict="no")),
    Case("missing required component", KeyError, r"component 'extra'.*not in checkpoint",
         _load(components=declared(extra=StateComponent("extra", Box({"x": 1}), "global")))),
    Case("undeclared component in strict mode", KeyError, r"holds components nobody declared: \['box'\]",
         _load(components=declared(box=None))),
    Case("shape mismatch", ValueError, r"component 'model'.*shape mismatch for 'model.weight': checkpoint has "
         r"\(3, 4\), current state expects \(5, 4\)", _load(components=declared(model=StateComponent(
             "model", model(out=5), "replicated")))),
    Case("dtype mismatch", ValueError, r"dtype mismatch for 'model.weight': checkpoint has torch.float32, current "
         r"state expects torch.float64", _load(components=declared(model=StateComponent(
             "model", model(dtype=torch.float64), "replicated")))),
    Case("expanded tensor as a destination", ValueError, r"component 'box' on rank 0: the destination of 'box.t' is "
         r"an expanded view \(shape \(5,\), strides \(0,\)\) whose elements share memory",
         _load(components=declared(box=StateComponent("box", Box({"step": 0, "t": torch.zeros(1).expand(5)}),
                                                      "global")))),
    Case("meta tensor as a destination", ValueError, r"component 'box' on rank 0: the destination of 'box.t' is a "
         r"tensor on the meta device", _load(components=declared(box=StateComponent(
             "box", Box({"step": 0, "t": torch.empty(5, device="meta")}), "global")))),
    Case("truncated manifest", ValueError, r"checkpoint_manifest.json is not the manifest this checkpoint was "
         r"committed with", _tampered(_edit_manifest(lambda text: text[:len(text) // 2], seal=False))),
    Case("truncated manifest, checksums off", ValueError, r"checkpoint manifest is malformed",
         _tampered(_edit_manifest(lambda text: text[:len(text) // 2], seal=False), verify=False)),
    Case("checkpoint of a newer format version", ValueError, r"manifest format version 99 is newer than this "
         rf"dcp_forge understands \({FORMAT_VERSION}\); upgrade dcp_forge", _tampered(_edit_manifest(_newer_format, seal=True))),
    Case("corrupted commit marker", ValueError, r"commit marker .*_COMMITTED is malformed",
         _tampered(lambda path: Path(os.path.join(path, COMMIT_FILE)).write_text("{"))),
]


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "run")


@pytest.fixture
def good(root):
    return coordinator(root).save_checkpoint(checkpoint_id="checkpoint-good")


def test_the_catalogue_has_at_least_25_cases():
    assert len(CASES) + len(GLOO_CASES) >= 25
    assert len({c.name for c in CASES} | set(GLOO_CASES)) == len(CASES) + len(GLOO_CASES)


@pytest.mark.parametrize("case", [pytest.param(c, marks=[getattr(pytest.mark, c.tier)] if c.tier else [])
                                  for c in CASES], ids=lambda c: c.name)
def test_bad_input(case, root, good):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(case.builtin, match=case.match) as err:
            case.run(root, good)
    if case.forge:
        assert isinstance(err.value, ForgeError), f"{type(err.value).__mro__} is not a dcp_forge error"
    assert list_checkpoints(root) == [good]  # nothing half-written looks complete ...
    assert os.listdir(root) == [os.path.basename(good)]  # ... nor is left behind at all ...
    assert verify_checkpoint(good) == []  # ... and what was committed before is intact


# --- several ranks --------------------------------------------------------------------------------
def _catch(fn) -> tuple[str, str, list[str]]:
    try:
        fn()
    except Exception as err:  # reported to the parent, which checks type and message
        return type(err).__name__, str(err), [k.__name__ for k in type(err).__mro__]
    return "no error", "", []


def gloo_cases(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    out = {}
    pattern = "replicated" if rank == 0 else "per_rank"
    out["declarations that differ across ranks"] = _catch(lambda: CheckpointCoordinator(
        [StateComponent("model", model(), pattern)], output_dir=os.path.join(root, "a")))
    group = dist.new_group([0, 1], backend="gloo")
    groups = {"dp": group} if rank == 0 else {"pp": group}
    out["process group names that differ across ranks"] = _catch(lambda: CheckpointCoordinator(
        [StateComponent("model", model(), "replicated")], groups, os.path.join(root, "b")))
    weights = model()
    if rank == 1:
        with torch.no_grad():
            weights.weight[0, 0] += 1e-3
    coord = CheckpointCoordinator([StateComponent("model", weights, "replicated", validate_replication=True)],
                                  output_dir=os.path.join(root, "c"))
    out["replicated state that differs across ranks"] = _catch(
        lambda: coord.save_checkpoint(checkpoint_id="c", validate=True))
    out["listed after the failed save"] = list_checkpoints(os.path.join(root, "c"))
    CheckpointCoordinator(declared(), output_dir=os.path.join(root, "d")).save_checkpoint(checkpoint_id="world-2")
    return out


GLOO_CASES = {  # name -> (builtin, regex)
    "declarations that differ across ranks": (ValueError, r"state components differ between rank \d and rank \d"),
    "process group names that differ across ranks": (ValueError, r"ranks disagree on process group names"),
    "replicated state that differs across ranks": (ValueError, r"replication check \(tensor\) failed for REPLICATED "
                                                   r"component 'model': 'weight': differs across ranks"),
    "world-size change with a required PER_RANK component": (ValueError, r"'rng'.*world"),
}


@pytest.fixture(scope="module")
def gloo_outcome(ranks, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad-gloo"))
    results = ranks(gloo_cases, 2, root)
    # The 2-rank checkpoint, loaded by a job of 1: its PER_RANK 'rng' has no copy for the new layout.
    path = os.path.join(root, "d", "world-2")
    results[0]["world-size change with a required PER_RANK component"] = _catch(
        lambda: coordinator(os.path.join(root, "d")).load_checkpoint(path))
    results[0]["verified after the world-size change"] = verify_checkpoint(path)
    return results


@pytest.mark.parametrize("name", list(GLOO_CASES))
def test_bad_input_across_ranks(gloo_outcome, name):
    builtin, match = GLOO_CASES[name]
    failed = [r for r in gloo_outcome if name in r]
    for kind, message, mro in (r[name] for r in failed):
        assert builtin.__name__ in mro and "ForgeError" in mro, (kind, message)
        assert re.search(match, message, re.S), message
    assert gloo_outcome[0]["listed after the failed save"] == []
    assert gloo_outcome[0]["verified after the world-size change"] == []

