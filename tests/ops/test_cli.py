"""The ``dcp-forge`` command line on real checkpoints: ls, inspect, verify, diff, convert, bench.

Most commands run in process through ``cli.main`` (fast); one test runs the real entry point as a
subprocess to check exit codes end to end.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import torch.distributed.checkpoint as dcp

from benchmarks.disk import drop_page_cache, recycle_page_cache, resident_bytes
from benchmarks.save_load import vs_best_dcp
from dcp_forge import CheckpointCoordinator, RNGState, StateComponent
from dcp_forge.cli import EXIT_ERROR, EXIT_FOUND, EXIT_OK, main
from dcp_forge.core.placement import ChunkPolicy
from dcp_forge.format.names import CLAIM_FILE
from tests.support.paths import REPO
from tests.support.statefuls import Box
from tests.support.tamper import data_files, flip_byte

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = str(REPO)


def _components(seed=0, step=10, extra_component=False):
    torch.manual_seed(seed)
    comps = [StateComponent("model", torch.nn.Linear(64, 32), "replicated"),
             StateComponent("trainer", Box({"step": step, "name": "run", "big": torch.arange(4096.0)}), "global"),
             StateComponent("rng", RNGState(), "per_rank", required=False)]
    if extra_component:
        comps.append(StateComponent("ema", Box({"w": torch.ones(3)}), "replicated"))
    return comps


def _save(root, checkpoint_id, storage_options=None, **kwargs):
    coord = CheckpointCoordinator(_components(**kwargs), output_dir=root, storage_options=storage_options,
                                  chunk_policy=ChunkPolicy(2048, 2))
    return coord.save_checkpoint(checkpoint_id=checkpoint_id, extra={"step": kwargs.get("step", 10)})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    a = _save(root, "checkpoint-10")
    b = _save(root, "checkpoint-20", seed=1, step=20, extra_component=True)
    same = _save(root / "again", "checkpoint-10")
    return root, a, b, same


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_lists_committed_and_partial_checkpoints(run, capsys, tmp_path):
    root, a, b, _ = run
    code, out, _ = _cli(capsys, "ls", root)
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split() == ["checkpoint", "step", "size", "time", "state"]
    assert [line.split()[0] for line in lines[1:]] == ["checkpoint-10", "checkpoint-20"]
    assert "committed" in lines[1] and " 20 " in lines[2]

    # a crashed save (claimed, never committed) shows as partial, and --committed hides it
    partial = tmp_path / "checkpoint-30"
    partial.mkdir()
    (partial / CLAIM_FILE).write_text(json.dumps({"save_id": "x", "claimed_at": 1.0, "pid": 1}))
    code, out, _ = _cli(capsys, "ls", tmp_path, "--json")
    assert [(e["name"], e["state"], e["step"]) for e in json.loads(out)] == [("checkpoint-30", "partial", 30)]
    code, out, err = _cli(capsys, "ls", tmp_path, "--committed")
    assert code == EXIT_OK and out == "" and "no checkpoints" in err


@pytest.mark.parametrize("json_output", [False, True], ids=["table", "json"])
def test_ls_of_a_directory_that_does_not_exist_says_so(capsys, tmp_path, json_output):
    # A mistyped directory is not an empty run: it fails, naming the path; an empty one lists nothing.
    typo = tmp_path / "rnu"
    code, out, err = _cli(capsys, "ls", typo, *(["--json"] if json_output else []))
    assert code == EXIT_ERROR and out == "" and "no such output_dir" in err and str(typo) in err, err
    assert not typo.exists()
    (tmp_path / "run").mkdir()
    code, out, err = _cli(capsys, "ls", tmp_path / "run")
    assert code == EXIT_OK and "no checkpoints" in err


def test_inspect_table_and_json(run, capsys):
    _, a, _, _ = run
    code, out, _ = _cli(capsys, "inspect", a)
    assert code == EXIT_OK
    assert "state       committed" in out and "saved topology: world_size=1, nodes=1" in out and "torch" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("model", "rng", "trainer"))}
    assert rows["model"][1] == "replicated" and rows["rng"][1] == "per_rank" and rows["trainer"][1] == "global"

    code, out, _ = _cli(capsys, "inspect", a, "--json")
    summary = json.loads(out)
    comps = {c["key"]: c for c in summary["components"]}
    assert set(comps) == {"model", "trainer", "rng"}
    assert comps["model"]["replicated_across"] == [0] and comps["model"]["ranks"] == [0]
    assert comps["model"]["size_bytes"] > 64 * 32 * 4 and comps["model"]["checksum"]
    assert summary["save_topology"]["world_size"] == 1 and summary["versions"]["torch"] == torch.__version__
    assert summary["state"] == "committed" and summary["extra"] == {"step": 10}


def test_inspect_plain_dcp_checkpoint(tmp_path, capsys):
    dcp.save({"model": {"w": torch.ones(4, 4)}, "step": 3}, checkpoint_id=tmp_path / "legacy")
    code, out, _ = _cli(capsys, "inspect", tmp_path / "legacy", "--json")
    summary = json.loads(out)
    assert code == EXIT_OK and summary["state"] == "legacy"
    assert {c["key"]: c["items"] for c in summary["components"]} == {"model": 1, "step": 1}


def test_verify_intact_damaged_and_missing(run, capsys, tmp_path):
    _, a, _, _ = run
    code, out, _ = _cli(capsys, "verify", a)
    assert code == EXIT_OK and out.startswith("OK")

    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    name = data_files(copy)[0]
    flip_byte(copy / name, os.path.getsize(copy / name) // 2)
    code, out, _ = _cli(capsys, "verify", copy)
    assert code == EXIT_FOUND
    lines = out.splitlines()
    assert lines and all(len(line.split("\t")) == 3 for line in lines)
    assert any(line.startswith(f"{name}\t") and "checksum mismatch" in line for line in lines)

    # nothing to verify is bad input (exit 2, one line on stderr), not a finding
    for extra in ((), ("--json",)):
        code, out, err = _cli(capsys, "verify", tmp_path / "nowhere", *extra)
        assert (code, out) == (EXIT_ERROR, "")
        assert err == f"dcp-forge verify: error: no checkpoint at {tmp_path / 'nowhere'}\n"


def test_diff_identical_and_different(run, capsys):
    _, a, b, same = run
    code, out, _ = _cli(capsys, "diff", a, same)
    assert code == EXIT_OK and out.strip() == "no differences"

    code, out, _ = _cli(capsys, "diff", a, b, "--json")
    assert code == EXIT_FOUND
    diffs = {(d["scope"], d["name"]): d for d in json.loads(out)}
    assert diffs[("component", "ema")]["change"] == "only in B"
    weight = diffs[("tensor", "model.weight")]
    torch.manual_seed(0)
    w0 = torch.nn.Linear(64, 32).weight
    torch.manual_seed(1)
    w1 = torch.nn.Linear(64, 32).weight
    assert weight["change"] == "values" and weight["max_abs_diff"] == pytest.approx(float((w0 - w1).abs().max()))
    assert diffs[("key", "trainer.step")]["detail"] == "A 10, B 20"
    assert ("tensor", "trainer.big") not in diffs  # same values: no difference

    code, out, _ = _cli(capsys, "diff", a, b, "--no-values", "--limit", "1")
    assert code == EXIT_FOUND and "more difference(s)" in out


def test_convert_to_torch_and_safetensors_and_back(run, capsys, tmp_path):
    _, a, _, _ = run
    code, out, _ = _cli(capsys, "convert", a, tmp_path / "full.pt")
    assert code == EXIT_OK
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    assert torch.equal(full["model"]["weight"], model.weight) and full["trainer"]["step"] == 10
    assert set(full) == {"model", "trainer", "rng@rank0"}

    code, out, err = _cli(capsys, "convert", a, tmp_path / "model.safetensors")
    assert code == EXIT_OK and "trainer.step" in err
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    assert torch.equal(tensors["model.weight"], model.weight) and torch.equal(tensors["trainer.big"], torch.arange(4096.0))

    # torch.save -> dcp_forge, both ways of naming components; the result verifies and loads
    torch.save({"model": model.state_dict(), "opt": {"lr": 0.1}}, tmp_path / "plain.pt")
    code, _, _ = _cli(capsys, "convert", tmp_path / "plain.pt", tmp_path / "out" / "checkpoint-1")
    assert code == EXIT_OK and _cli(capsys, "verify", tmp_path / "out" / "checkpoint-1")[0] == EXIT_OK
    fresh = torch.nn.Linear(64, 32)
    CheckpointCoordinator([StateComponent("model", fresh, "replicated"),
                           StateComponent("opt", Box({"lr": 0.0}), "replicated")],
                          output_dir=tmp_path / "out").load_checkpoint()
    assert torch.equal(fresh.weight, model.weight)

    torch.save({"0.weight": model.weight}, tmp_path / "dotted.pt")
    code, _, err = _cli(capsys, "convert", tmp_path / "dotted.pt", tmp_path / "bad")
    assert code == EXIT_ERROR and "--component" in err
    code, _, _ = _cli(capsys, "convert", tmp_path / "dotted.pt", tmp_path / "good", "--component", "model")
    assert code == EXIT_OK
    code, out, _ = _cli(capsys, "inspect", tmp_path / "good", "--json")
    assert [c["key"] for c in json.loads(out)["components"]] == ["model"]


def test_convert_exports_only_the_selected_component(run, capsys, tmp_path):
    _, a, _, _ = run
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    code, out, _ = _cli(capsys, "convert", a, tmp_path / "model.pt", "--component", "model")
    assert code == EXIT_OK and "weight" in out
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(exported) == {"weight", "bias"} and torch.equal(exported["weight"], model.weight)
    assert _cli(capsys, "convert", a, tmp_path / "model.safetensors", "--component", "model")[0] == EXIT_OK
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "model.safetensors")) == {"weight", "bias"}, "no optimizer, trainer or RNG tensor"
    # a PER_RANK component keeps its storage keys (one copy per saved rank)
    assert _cli(capsys, "convert", a, tmp_path / "rng.pt", "--component", "rng")[0] == EXIT_OK
    assert set(torch.load(tmp_path / "rng.pt", weights_only=False)) == {"rng@rank0"}
    code, _, err = _cli(capsys, "convert", a, tmp_path / "nope.pt", "--component", "nope")
    assert code == EXIT_ERROR and "has no component 'nope'" in err and "'model'" in err
    assert not (tmp_path / "nope.pt").exists()
    # the inverse of importing a file as one component
    assert _cli(capsys, "convert", tmp_path / "model.pt", tmp_path / "imported", "--component", "model")[0] == EXIT_OK
    assert _cli(capsys, "convert", tmp_path / "imported", tmp_path / "again.pt", "--component", "model")[0] == EXIT_OK
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert again.keys() == exported.keys() and all(torch.equal(again[k], v) for k, v in exported.items())


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_converted_files_follow_the_umask(run, tmp_path, umask):
    _, a, _, _ = run
    previous = os.umask(umask)
    try:
        for name in ("out.pt", "out.safetensors"):
            assert main(["convert", str(a), str(tmp_path / name)]) == EXIT_OK
    finally:
        os.umask(previous)
    modes = {name: oct(os.stat(tmp_path / name).st_mode & 0o777) for name in ("out.pt", "out.safetensors")}
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))
    assert sorted(os.listdir(tmp_path)) == ["out.pt", "out.safetensors"], "no temporary file is left"


def test_bench_quick_writes_report_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, out, _ = _cli(capsys, "bench", "--quick", "--size-mib", "8", "--repetitions", "1", "--index-items", "2000",
                        "--out", tmp_path / "report", "--dir", tmp_path)
    assert code == EXIT_OK
    report = json.loads((tmp_path / "report" / "bench.json").read_text())
    assert set(report["save_load"]["save"]) == {"disk limit", "dcp_forge", "dcp defaults", "dcp thread_count=2",
                                                "torch.save"}
    assert report["index"]["items"] == 2000 and report["planning"]["rows"]
    assert (tmp_path / "report" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| save: dcp_forge |" in out
    assert 0.0 <= report["save_load"]["resident_after_eviction_max"] <= 1.0
    for phase in ("save", "load"):
        best = report["save_load"]["vs_best_dcp"][phase]
        rows = report["save_load"][phase]
        assert best["ratio"] == rows["dcp_forge"]["gbps_median"] / rows[best["best_dcp"]]["gbps_median"]


def _filesystem_type(path) -> str:
    """The type of the filesystem holding ``path`` (longest matching mount point in /proc/mounts)."""
    path, best, kind = os.path.realpath(path), "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, fstype = line.split()[:3]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


@pytest.mark.skipif(not os.path.exists("/proc/mounts"), reason="Linux page cache only")
def test_bench_eviction_leaves_nothing_cached(tmp_path):
    path = tmp_path / "data.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(3 * 4096 + 100))
        f.flush()
        os.fsync(f.fileno())
    assert resident_bytes(str(path)) == 3 * 4096 + 100  # just written: every page cached
    assert resident_bytes(str(tmp_path)) == 3 * 4096 + 100  # a directory counts its files
    assert drop_page_cache(str(tmp_path)) == 3 * 4096 + 100
    if _filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("this filesystem keeps its pages: nothing to evict them to")
    assert resident_bytes(str(path)) == 0


def test_recycling_page_cache_leaves_nothing_behind(tmp_path):
    recycle_page_cache(str(tmp_path), [torch.ones(3000), torch.zeros(5, dtype=torch.int8)])
    assert os.listdir(tmp_path) == []


def test_vs_best_dcp_picks_the_fastest_dcp_configuration():
    rows = {"disk limit": {"gbps_median": 9.0}, "dcp_forge": {"gbps_median": 3.0},
            "dcp defaults": {"gbps_median": 1.0}, "dcp thread_count=2": {"gbps_median": 2.0},
            "torch.save": {"gbps_median": 5.0}}
    assert vs_best_dcp(rows) == {"best_dcp": "dcp thread_count=2", "ratio": 1.5}
    assert vs_best_dcp({"dcp_forge": {"gbps_median": 3.0}}) is None


# Runs ``dcp_forge.cli.main`` once per argument list in one fresh interpreter (as ``python -m dcp_forge.cli``
# would, but paying for the imports once), each with its own stdout/stderr, and every warning shown
# every time it is raised.
_CLI_SESSION = """
import contextlib, io, json, sys, warnings
warnings.simplefilter("always")
from dcp_forge.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    out.append((code, stdout.getvalue(), stderr.getvalue()))
print(json.dumps(out))
"""


def cli_session(python, *argvs, env=None):
    """Each of ``argvs`` run through ``cli.main`` in one fresh interpreter (``python``)."""
    done = subprocess.run([python, "-c", _CLI_SESSION, json.dumps([[str(a) for a in argv] for argv in argvs])],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return [subprocess.CompletedProcess(argv, code, stdout, stderr)
            for argv, (code, stdout, stderr) in zip(argvs, json.loads(done.stdout), strict=True)]


def test_entry_point_exit_codes(run, tmp_path, interpreters):
    _, a, _, _ = run
    nowhere = tmp_path / "nowhere"
    ok, missing, convert_missing, verify_missing, to_pt, to_safetensors, back = cli_session(
        interpreters,
        ("verify", a), ("inspect", nowhere), ("convert", nowhere, tmp_path / "out.pt"), ("verify", nowhere),
        ("convert", a, tmp_path / "out.pt", "--component", "model"),
        ("convert", a, tmp_path / "out.safetensors", "--component", "model"),
        ("convert", tmp_path / "out.pt", tmp_path / "imported"), env=dict(os.environ, PYTHONPATH=ROOT))
    assert ok.returncode == EXIT_OK
    assert missing.returncode == EXIT_ERROR and "no checkpoint" in missing.stderr
    # a missing source: one line, exit 2 (no DCP tracebacks, no AssertionError)
    for command, proc in (("convert", convert_missing), ("verify", verify_missing)):
        assert (proc.returncode, proc.stdout) == (EXIT_ERROR, "")
        assert proc.stderr == f"dcp-forge {command}: error: no checkpoint at {nowhere}\n"
    # a conversion prints what it wrote and nothing else (no "torch.distributed is disabled" warning)
    for proc in (to_pt, to_safetensors, back):
        assert proc.returncode == EXIT_OK and proc.stderr == "", proc.stderr
    # the console entry point itself
    assert subprocess.run([interpreters, "-m", "dcp_forge.cli", "verify", str(a)], cwd=ROOT,
                          capture_output=True, timeout=120).returncode == EXIT_OK


def test_every_command_works_on_s3_with_credentials_from_the_environment(s3_url, s3_storage_options, s3_env,
                                                                          tmp_path, interpreters):
    a = _save(s3_url, "checkpoint-10", s3_storage_options)
    b = _save(s3_url, "checkpoint-20", s3_storage_options, seed=1, step=20)
    env = dict(os.environ, PYTHONPATH=ROOT, **s3_env)

    def cli(*args):
        done = subprocess.run([interpreters, "-m", "dcp_forge.cli", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert s3_env["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr
        return done

    listed = cli("ls", s3_url)
    assert listed.returncode == EXIT_OK and "checkpoint-10" in listed.stdout and "checkpoint-20" in listed.stdout
    inspected = cli("inspect", a, "--json")
    assert inspected.returncode == EXIT_OK and "model" in {c["key"] for c in json.loads(inspected.stdout)["components"]}
    assert cli("verify", b).returncode == EXIT_OK
    differ = cli("diff", a, b)
    assert differ.returncode == EXIT_FOUND and "model" in differ.stdout
    out = tmp_path / "model.pt"
    assert cli("convert", a, out, "--to", "torch").returncode == EXIT_OK and out.stat().st_size > 0


def test_usage_errors_and_help(run, capsys):
    _, a, _, _ = run
    with pytest.raises(SystemExit) as exc:
        main(["diff", a])
    assert exc.value.code == 2 and "usage" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and all(c in out for c in ("inspect", "verify", "diff", "convert", "bench", "ls"))
    for command in ("ls", "inspect", "verify", "diff", "convert", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert len(capsys.readouterr().out) > 200  # a description, not just the usage line


def test_ls_and_inspect_start_without_torch(run, interpreters):
    """Listing and inspecting must not import torch (seconds of start-up): see dcp_forge/__init__.py."""
    root, a, _, _ = run
    script = ("import sys, dcp_forge.cli as cli\n"
              "codes = [cli.main(['ls', sys.argv[1]]), cli.main(['inspect', sys.argv[2], '--json'])]\n"
              "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
              "print('TORCH', heavy[:5], codes, file=sys.stderr)\n"
              "sys.exit(1 if heavy or codes != [0, 0] else 0)\n")
    done = subprocess.run([interpreters, "-c", script, str(root), str(a)], env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
