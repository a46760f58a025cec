"""`flamingo-fast plan`: per-rank memory, traffic and time of a training config on N GPUs, before renting them.

    flamingo-fast plan --config train/configs/xl.toml --gpus 256 --gpu h100-80gb --json xl-256.json

Runs one micro-batch of the real model, sharded by the trainer's FSDP2 plan over a fake world of N ranks,
on fake tensors (nothing is materialised; xl plans in under a minute on a laptop-class CPU). How each figure
is made: train/planner.py. Other arguments --section.key=value override the config as for `train`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flamingo_fast.cli import at_least

GIB = 2**30


def build_parser() -> argparse.ArgumentParser:
    from train.gpu_profiles import PROFILES

    parser = argparse.ArgumentParser(prog="flamingo-fast plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a trainer config: a shipped name (xl, demo) or a path")
    parser.add_argument("--gpus", type=at_least(1), required=True, help="world size (data-parallel ranks)")
    parser.add_argument("--gpu", choices=sorted(PROFILES), default="h100-80gb", help="GPU profile (gpu_profiles.py)")
    parser.add_argument("--gpu-json", type=Path, default=None,
                        help="a bench/results train-step JSON measured on that GPU: its efficiency replaces the profile's")
    parser.add_argument("--micro-batch", type=at_least(1), default=None, help="default: data.micro_batch_size")
    parser.add_argument("--seq-len", type=at_least(1), default=None, help="default: data.max_length")
    parser.add_argument("--images", type=at_least(1), default=5, help="images per row (M3W: up to 5)")
    parser.add_argument("--json", type=Path, default=None, help="write the plan here")
    return parser


def _gib(value: float) -> str:
    return f"{value / GIB:,.2f}"


def print_plan(plan) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    memory = Table(title=f"{plan.config}: {plan.preset} on {plan.world_size} x {plan.gpu}, micro-batch "
                         f"{plan.micro_batch} x {plan.seq_len} tokens, {plan.images_per_row} images per row")
    memory.add_column("memory per rank (peak of a step)")
    memory.add_column("GiB", justify="right")
    for name, value in plan.memory.by_category.items():
        if value:
            memory.add_row(name, _gib(value))
    memory.add_row("AdamW state (exp_avg, exp_avg_sq)", _gib(plan.memory.optimizer_state))
    memory.add_row("[bold]peak", f"[bold]{_gib(plan.memory.peak)}")
    memory.add_row("fits", f"{'yes' if plan.fits else '[red]no'} (largest micro-batch that fits: {plan.largest_micro_batch})")
    memory.add_row("host: prefetched batches", _gib(plan.memory.host_prefetch))
    console.print(memory)
    step = Table(title="per step")
    step.add_column("figure")
    step.add_column("value", justify="right")
    rows = [
        ("micro-batches per rank per step", f"{plan.accumulation}"),
        ("FLOPs per micro-batch", f"{plan.flops_per_micro_batch:.3e}"),
        ("compute per micro-batch", f"{plan.compute_s * 1e3:,.1f} ms"),
        ("all-gather / reduce-scatter per micro-batch", f"{_gib(plan.traffic.all_gather)} / "
                                                         f"{_gib(plan.traffic.reduce_scatter)} GiB"),
        ("communication per micro-batch", f"{plan.comm_s * 1e3:,.1f} ms"),
        ("step", f"{plan.step_s:,.2f} s"),
        ("tokens/s per GPU", f"{plan.tokens_per_s:,.0f}"),
        ("MFU", f"{plan.mfu:.1%}"),
        (f"schedule: {plan.schedule_steps:,} steps", f"{plan.schedule_hours / 24:,.1f} days, "
                                                    f"{plan.gpu_hours:,.0f} GPU-hours"),
    ]
    if plan.paper is not None:
        paper = plan.paper
        rows.append((f"the paper: {paper['model']} on {paper['chips']:,} {paper['chip']}",
                     f"{paper['days']:,.1f} days, {paper['chip_hours']:,.0f} chip-hours"))
    for name, value in rows:
        step.add_row(name, value)
    console.print(step)
    for note in plan.notes:
        console.print(f"  {note}")
    console.print(f"  planned in {plan.planning_s:.1f} s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, overrides = build_parser().parse_known_args(argv)
    from train.cli import resolve_config_path
    from train.config import load_config
    from train.gpu_profiles import from_bench_json, get_profile
    from train.planner import make_plan

    try:
        cfg = load_config(resolve_config_path(args.config), overrides)
        gpu = get_profile(args.gpu)
        if args.gpu_json is not None:
            gpu = from_bench_json(gpu, args.gpu_json)
        plan = make_plan(cfg, args.gpus, gpu, micro_batch=args.micro_batch, seq_len=args.seq_len,
                         images=args.images, config_name=str(args.config))
    except (ValueError, FileNotFoundError) as error:
        print(f"flamingo-fast plan: {error}", file=sys.stderr)
        return 2
    print_plan(plan)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
