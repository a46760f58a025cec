"""The `flamingo-fast` command line: info and plan (other subcommands are tested with their packages)."""

import subprocess
import sys

import pytest

from flamingo_fast import native


def run_cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "flamingo_fast.cli", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_info_reports_versions_extension_and_backends():
    out = run_cli("info")
    for needle in ("torch", "nvidia-cutlass", "_C build", "backend: attention", "backend: media_cross_attention"):
        assert needle in out


@pytest.mark.skipif(native.load() is None, reason="flamingo_fast._C is not built")
def test_plan_prints_key_ranges():
    out = run_cli("tile-plan", "--media-index=-1,-1,0,0,0,1,1,2,2,2", "--latents", "4", "--block-q", "4",
                  "--block-k", "4")
    assert "[0, 12)" in out and "[7, 10)" in out and "8..9" in out

