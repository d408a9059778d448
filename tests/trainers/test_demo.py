"""`dcp-forge demo`, the README's first command, end to end (short): three torchrun launches of the
training job, interrupted, resumed in fresh processes, compared bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO

ROOT = str(REPO)


def demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcp_forge.cli", "demo", *args], cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)


def _earlier_run(output_dir) -> None:
    from dcp_forge import CheckpointCoordinator, RNGState, SharingPattern, StateComponent

    CheckpointCoordinator([StateComponent("rng", RNGState(), SharingPattern.PER_RANK)],
                          output_dir=output_dir).save_checkpoint(checkpoint_id="checkpoint-60")


@pytest.mark.dist
def test_the_demo_interrupts_resumes_and_matches_also_when_run_again(tmp_path):
    taken = tmp_path / "checkpoints"
    _earlier_run(taken)  # as a first `bash tools/demo.sh` leaves ./checkpoints
    out = tmp_path / "checkpoints-2"
    proc = demo("--output-dir", str(taken), "--steps", "6", "--save-every", "2", "--interrupt-at", "5")
    text = proc.stdout
    # Every failure message carries the demo's output: a failed run is diagnosable from the CI log.
    assert proc.returncode == 0, f"exit {proc.returncode}\n{text[-4000:]}\n{proc.stderr[-6000:]}"
    assert text.startswith(f"{taken} already holds checkpoints (an earlier run's); this demo starts from "
                           f"scratch in {out}\n"), text
    assert "torchrun --standalone --nproc-per-node=2 -m dcp_forge.trainers.run --trainer ddp" in text
    for expected in ("stopped at step 5: interrupted after step 5", "model      replicated  1 copy",
                     "rng        per_rank    2 copies", f"resumed from {out}/checkpoint-4 at step 4",
                     "loss curves identical for all 2 steps after the resume: True",
                     "final parameters bit-identical on every rank: True"):
        assert expected in text, f"{expected!r} missing from the demo's output:\n{text}"
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"], text


def test_each_demo_gets_a_fresh_output_dir_and_bad_schedules_are_refused(tmp_path, capsys):
    from dcp_forge.cli import main
    from dcp_forge.trainers.demo import fresh_output_dir

    out = str(tmp_path / "checkpoints")
    assert fresh_output_dir(out, {}) == out, "an empty (or missing) output_dir is used as it is"
    _earlier_run(out)
    assert fresh_output_dir(out, {}) == fresh_output_dir(out + "/", {}) == f"{out}-2"
    _earlier_run(f"{out}-2")
    (tmp_path / "checkpoints-3").mkdir()  # empty: free
    assert fresh_output_dir(out, {}) == f"{out}-3"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--output-dir", str(tmp_path / "new"), "--interrupt-at", "100"])
    assert exit_info.value.code == 2 and "--interrupt-at" in capsys.readouterr().err
