"""Decoding speed with media K/V cached (ours) vs recomputed every step (OpenFlamingo), on CPU.

    python -m flamingo_fast.eval.bench_media_cache [--images 4,8,16] [--new-tokens 32] [--json PATH]

Runs `flamingo_fast.models.generate.benchmark_media_cache` (greedy decoding, stopping disabled) on two
small random models: the "demo" preset and a scaled-down 3B shape (gated cross-attention before every LM
block, 64 latents per image, resampler width = LM width). Modes: "kv" keeps each xattn layer's keys/values
of the latents, "latents" keeps only the latents and re-projects them in every layer at every step (what
OpenFlamingo's generate does), "none" also re-runs the vision encoder and resampler every step. The gap
grows with the number of images in the prompt (shots) because the re-projection costs
T_img x 64 x Dm x 2 x heads x head_dim multiply-adds per layer per step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from flamingo_fast.models.config import FlamingoConfig
from flamingo_fast.models.flamingo import Flamingo
from flamingo_fast.models.generate import MEDIA_CACHE_MODES, benchmark_media_cache

MODELS = {
    "demo": lambda: FlamingoConfig.from_preset("demo"),
    "3b-shape-small": lambda: FlamingoConfig.from_preset(
        "demo",
        vision={"image_size": 32, "patch_size": 4, "width": 128, "layers": 2, "heads": 4, "mlp_dim": 512},
        resampler={"dim": 512, "depth": 2, "heads": 8, "head_dim": 64, "n_latents": 64},
        xattn={"every": 1, "heads": 8, "head_dim": 64},
        lm={"vocab_size": 1022, "dim": 512, "layers": 8, "heads": 8, "kv_heads": 8, "ffn_dim": 1408},
    ),
}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flamingo_fast.eval.bench_media_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated from {sorted(MODELS)}")
    parser.add_argument("--images", default="4,8,16", help="images in the prompt (comma-separated)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(args.threads)
    table = Table(title=f"greedy decoding, tokens/s (batch {args.batch_size}, {args.new_tokens} new tokens, CPU)")
    for column in ("model", "images", *MEDIA_CACHE_MODES, "kv vs latents", "kv vs none"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
        torch.manual_seed(0)
        model = Flamingo(MODELS[name]()).eval()
        for images in (int(v) for v in args.images.split(",")):
            result = benchmark_media_cache(model, args.batch_size, images, args.prompt_tokens, args.new_tokens,
                                           args.repeats)
            rows.append({"model": name, "images": images, **result})
            table.add_row(name, str(images), *(f"{result[m]['tokens_per_s']:.1f}" for m in MEDIA_CACHE_MODES),
                          f"{result['latents']['speedup_of_kv']:.2f}x", f"{result['none']['speedup_of_kv']:.2f}x")
    Console().print(table)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
