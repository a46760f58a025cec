"""Fault injection: the trainer is SIGKILLed at every named point of a checkpoint write and of a re-write of
the same step (train/checkpoint.py KILL_POINTS), then resumed. Each resume starts from the newest checkpoint
that was complete when the kill came, leaves no partial folder behind, and reproduces the losses of the run
that was never killed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from train.checkpoint import KILL_AT_ENV, KILL_POINTS

ROOT = Path(__file__).resolve().parents[1]
# keep_last=1: saving step 4 prunes step 2, so "renamed" (4 in, 2 not yet pruned) and "pruned" differ.
BASE = [sys.executable, "-m", "train", "--config", "tiny", "--parallel.fsdp=false", "--checkpoint.every=2",
        "--checkpoint.keep_last=1", "--eval.at_end=false"]
# Kill while saving step 4 of a 6-step run (step 2 is complete) -> the step the resume must start from.
FIRST_WRITE = {"folder_created": 2, "weights_written": 2, "rank_state_written": 2, "manifest_written": 2,
               "marked_complete": 2, "renamed": 4, "pruned": 4}
# Kill while a finished 6-step run, resumed, re-saves step 6: either copy of step 6 is the same state.
REWRITE = {"marked_complete": 6, "set_aside": 6, "new_in_place": 6, "renamed": 6}


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None)
    env.pop(KILL_AT_ENV, None)
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    return env


def _train(out: Path, steps: int, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*BASE, f"--train.steps={steps}", f"--train.out_dir={out}", *extra], env=_env(kill_at),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _killed(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == -signal.SIGKILL, f"not killed (exit {result.returncode})\n{result.stderr[-3000:]}"


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, filter(str.strip, lines))}


def _resumed_step(result: subprocess.CompletedProcess) -> int:
    match = re.search(r"resumed from .*?step_(\d{8})", result.stdout.replace("\n", ""))
    assert match, f"no resume in the output:\n{result.stdout[-2000:]}"
    return int(match.group(1))


def _assert_clean(out: Path) -> None:
    """Only complete checkpoints are left: no .tmp- folder, no set-aside copy."""
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert all(re.fullmatch(r"step_\d{8}", name) for name in names), names


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs: 6 steps; and that finished run resumed to 8 steps (the re-write cases' reference)."""
    root = tmp_path_factory.mktemp("reference")
    _ok(_train(root / "six", 6))
    shutil.copytree(root / "six", root / "eight")
    _ok(_train(root / "eight", 8, "--resume"))
    return {"six": root / "six", "eight": root / "eight"}


def _first_write_case(point: str, out: Path) -> tuple[int, dict[int, float], subprocess.CompletedProcess]:
    _killed(_train(out, 6, kill_at=f"{point}:4"))
    resumed = _ok(_train(out, 6, "--resume"))
    return _resumed_step(resumed), _losses(out), resumed


def _rewrite_case(point: str, out: Path, finished: Path) -> tuple[int, dict[int, float], subprocess.CompletedProcess]:
    shutil.copytree(finished, out)
    _killed(_train(out, 6, "--resume", kill_at=f"{point}:6"))
    resumed = _ok(_train(out, 8, "--resume"))
    return _resumed_step(resumed), _losses(out), resumed


@pytest.mark.slow
def test_every_kill_point_is_a_named_point_of_the_save():
    assert set(FIRST_WRITE) | set(REWRITE) == set(KILL_POINTS)


@pytest.mark.slow
def test_kill_at_every_point_of_a_checkpoint_write_and_rewrite_then_resume_exactly(tmp_path, reference):
    # Two cases at a time (each process uses one thread): the 2-core CI machine runs the 22 processes in ~1 min.
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = {point: pool.submit(_first_write_case, point, tmp_path / f"first-{point}") for point in FIRST_WRITE}
        again = {point: pool.submit(_rewrite_case, point, tmp_path / f"again-{point}", reference["six"])
                 for point in REWRITE}
        outcomes = {("write", p): f.result() for p, f in first.items()} | \
                   {("rewrite", p): f.result() for p, f in again.items()}
    want_six, want_eight = _losses(reference["six"]), _losses(reference["eight"])
    for (kind, point), (resumed_from, losses, result) in outcomes.items():
        expected_from, want = (FIRST_WRITE[point], want_six) if kind == "write" else (REWRITE[point], want_eight)
        assert resumed_from == expected_from, (kind, point, result.stdout[-2000:])
        assert sorted(losses) == sorted(want), (kind, point)
        for step, loss in want.items():
            assert abs(losses[step] - loss) <= 1e-6, (kind, point, step, losses[step], loss)
        _assert_clean(tmp_path / f"{'first' if kind == 'write' else 'again'}-{point}")
