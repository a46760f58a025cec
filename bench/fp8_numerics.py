"""Float8 numerics check for the frozen LM (`parallel.float8`): the same short training run twice, bf16 and
float8, on the same data and seed; the float8 loss must stay within 1% of the bf16 loss at every logged step.

    python -m bench.fp8_numerics [--steps 200] [--out DIR] [--tolerance 0.01]

The run is the demo recipe's Flamingo stage (train/configs/demo.toml: shapes captions and VQA, the trainer
with FSDP2 and bf16 mixed precision) from random weights: the trainable resampler, xattn layers and special
rows learn the shapes text, so the check covers a descending loss, not a flat line. Needs a GPU with float8
matmuls and torchao; elsewhere it exits with status 2 and says why. Writes DIR/fp8_numerics.json (both loss
curves, the worst relative gap, pass/fail).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def compare_losses(bf16: dict[int, float], fp8: dict[int, float], tolerance: float) -> dict:
    """Per logged step |fp8 - bf16| / |bf16|; passes when every step both runs logged is within tolerance."""
    steps = sorted(set(bf16) & set(fp8))
    if not steps:
        raise ValueError("the two runs logged no common step")
    gaps = {step: abs(fp8[step] - bf16[step]) / abs(bf16[step]) for step in steps}
    worst = max(gaps, key=gaps.get)
    return {"steps": steps, "bf16": [bf16[s] for s in steps], "fp8": [fp8[s] for s in steps],
            "relative_gap": [gaps[s] for s in steps], "worst_step": worst, "worst_gap": gaps[worst],
            "tolerance": tolerance, "passed": gaps[worst] <= tolerance}


def _run(out: Path, steps: int, float8: bool) -> dict[int, float]:
    from train.cli import resolve_config_path
    from train.config import load_config
    from train.loop import Trainer
    from train.parallel import shutdown_distributed

    overrides = [f"--train.out_dir={out}", f"--train.steps={steps}", "--train.log_every=10", "--train.seed=0",
                 "--train.progress=false", "--eval.at_end=false", "--eval.every_epoch=false",
                 "--checkpoint.save_final=false", "--parallel.fsdp=true", "--parallel.param_dtype=bfloat16",
                 "--parallel.reduce_dtype=float32", f"--parallel.float8={'true' if float8 else 'false'}"]
    cfg = load_config(resolve_config_path("demo"), overrides)
    try:
        Trainer(cfg).run()
    finally:
        shutdown_distributed()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fp8_numerics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/fp8_numerics"))
    parser.add_argument("--tolerance", type=float, default=0.01)
    args = parser.parse_args(argv)
    from flamingo_fast.models.float8 import float8_unsupported_reason

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    reason = float8_unsupported_reason(device)
    if reason is not None:
        print(f"fp8 numerics: not run here: {reason}", file=sys.stderr)
        return 2
    losses = {name: _run(args.out / name, args.steps, name == "fp8") for name in ("bf16", "fp8")}
    result = compare_losses(losses["bf16"], losses["fp8"], args.tolerance)
    result["device"] = torch.cuda.get_device_name(device)
    (args.out / "fp8_numerics.json").write_text(json.dumps(result, indent=1))
    for step, a, b, gap in zip(result["steps"], result["bf16"], result["fp8"], result["relative_gap"]):
        print(f"step {step:4d}  bf16 {a:.4f}  fp8 {b:.4f}  gap {100 * gap:.2f}%")
    verdict = "PASS" if result["passed"] else "FAIL"
    print(f"fp8 numerics {verdict}: worst gap {100 * result['worst_gap']:.2f}% at step {result['worst_step']} "
          f"(tolerance {100 * args.tolerance:g}%)")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
