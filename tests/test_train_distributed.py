"""Real processes: a 2-rank gloo FSDP run equals a 1-rank run with the same global batch, and a run
killed with SIGKILL after a checkpoint resumes to exactly the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# One source: the global batch is then the same set of samples for any world size (ranks stride it).
ONE_SOURCE = '--data.sources=[{kind="shapes", name="mixed", split="train", n=5000, task="mixed"}]'


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records}


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.mark.slow
def test_two_rank_fsdp_matches_one_rank(tmp_path):
    # Unpacked rows: packing fills rows from each rank's own shard, so one rank and two form other rows.
    args = ["-m", "train", "--config", "tiny", ONE_SOURCE, "--train.steps=4", "--checkpoint.every=0",
            "--checkpoint.save_final=false", "--eval.at_end=true", "--data.packing=false"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", *args,
                          f"--train.out_dir={tmp_path / 'two'}"], env=_env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    _check(two)
    one = subprocess.run([sys.executable, *args, f"--train.out_dir={tmp_path / 'one'}"], env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    _check(one)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["label_tokens"] == b[step]["label_tokens"]  # the same global batch
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5, (step, a[step]["loss"], b[step]["loss"])
        assert abs(a[step]["grad_norm"] - b[step]["grad_norm"]) <= 1e-5 * max(1.0, a[step]["grad_norm"])
    assert a[4]["loss"] != a[1]["loss"]  # it trained
    # The held-out evaluation is split over the ranks and reduced: the same samples are counted, per type too.
    eval_one, eval_two = (json.loads((tmp_path / run / "eval.jsonl").read_text()) for run in ("one", "two"))
    assert eval_one["num_vqa"] == eval_two["num_vqa"] == 8 and eval_one["num_caption"] == eval_two["num_caption"] == 8
    counts = {key: value["count"] for key, value in eval_one["vqa_by_type"].items()}
    assert counts == {key: value["count"] for key, value in eval_two["vqa_by_type"].items()}
    assert sum(counts.values()) == 8 and len(counts) > 1


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
    base = [sys.executable, "-m", "train", "--config", "tiny", "--train.steps=8", "--checkpoint.every=2",
            "--checkpoint.keep_last=2"]
    killed = tmp_path / "killed"
    process = subprocess.Popen(base + [f"--train.out_dir={killed}"], env=_env(), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    # Kill after checkpoint 4 is complete and step 5 has been logged (so the resumed run must also drop
    # the stale metrics line), well before the run could finish.
    while time.time() < deadline:
        metrics = killed / "metrics.jsonl"
        if (killed / "checkpoints" / "step_00000004" / "COMPLETE").is_file() and metrics.is_file() and \
                max(_losses(killed), default=0) >= 5:
            break
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()[-4000:]}"
        time.sleep(0.01)
    else:
        process.kill()
        pytest.fail("timed out waiting for checkpoint 4")
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "checkpoints" / "step_00000008").exists()
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    latest = [name for name in checkpoints if name.startswith("step_")][-1]
    resumed_from = int(latest.split("_")[1])

    resumed = subprocess.run(base + [f"--train.out_dir={killed}", "--resume"], env=_env(), cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    _check(resumed)
    assert "resumed from" in resumed.stdout and latest in resumed.stdout.replace("\n", "")
    reference = tmp_path / "reference"
    _check(subprocess.run(base + [f"--train.out_dir={reference}"], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=300))
    got, want = _losses(killed), _losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in range(resumed_from + 1, 9):
        assert abs(got[step]["loss"] - want[step]["loss"]) <= 1e-6, (step, got[step]["loss"], want[step]["loss"])
        assert abs(got[step]["grad_norm"] - want[step]["grad_norm"]) <= 1e-6 * max(1.0, want[step]["grad_norm"])


@pytest.mark.slow
def test_two_rank_checkpoint_manifest_covers_every_rank_and_a_corrupt_shard_stops_both_ranks(tmp_path):
    """Each rank hashes the files it wrote; on resume each rank hashes a share of the files and all ranks get
    one verdict, so a bad shard stops every rank (none is left waiting in a collective)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    args = ["-m", "train", "--config", "tiny", ONE_SOURCE, "--train.steps=2", "--checkpoint.every=2",
            "--eval.at_end=false", f"--train.out_dir={tmp_path}"]
    _check(subprocess.run([*launch, f"--master_port={_free_port()}", *args], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300))
    # Packed rows (tiny's default): the packing efficiency is reduced over both ranks and logged per source.
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r["packing_efficiency"]) == {"mixed"} and 0.5 < r["packing_efficiency"]["mixed"] <= 1.0
               for r in logged)
    folder = tmp_path / "checkpoints" / "step_00000002"
    files = json.loads((folder / "MANIFEST.json").read_text())["files"]
    assert {"__0_0.distcp", "__1_0.distcp", "rank_0.json", "rank_1.json", ".metadata", "trainer.json"} <= set(files)
    assert not list(folder.glob(".manifest_rank_*"))  # the per-rank parts were merged and removed
    shard = folder / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    resumed = subprocess.run([*launch, f"--master_port={_free_port()}", *args, "--train.steps=3", "--resume"],
                             env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode != 0
    assert resumed.stderr.count("__1_0.distcp does not match its SHA-256") >= 2  # both ranks say why
