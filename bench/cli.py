"""`python -m bench` / `flamingo-fast bench`: run the benchmark, print the table, write JSON / plot / results."""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from bench.cases import OPS, last_case_per_op, select_cases
from bench.e2e import COMPILED as E2E_COMPILED
from bench.e2e import MODELS as E2E_MODELS
from bench.e2e import SHAPES as E2E_SHAPES
from bench.e2e import VARIANTS as E2E_VARIANTS
from bench.flops import DIRECTIONS
from bench.harness import DTYPE_NAMES, Row, Settings, bench_case, fill_best_peer, measure_peaks, select_impls
from bench.impls import IMPL_NAMES
from flamingo_fast.cli import at_least
from flamingo_fast.models.compile import COMPILE_MODES

E2E_OP = "train_step"
GENERATE_OP = "generate"
DATA_OP = "data"
PACKING_OP = "packing"
MLLAMA_OP = "mllama"
ALL_OPS = OPS + (E2E_OP, GENERATE_OP, DATA_OP, PACKING_OP, MLLAMA_OP)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flamingo-fast bench",
        description="Time every implementation of the attention ops (and a training step) side by side, "
                    "after checking each against a float64 reference.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="one small case per op (under a minute on a 2-core CPU); skips torch.compile-based "
                             "implementations unless --impls names them")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as a JSON list")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of TFLOP/s against sequence length")
    parser.add_argument("--save", type=Path, metavar="DIR",
                        help="also write DIR/<date>-<device>.json, .md (summary) and .png (e.g. bench/results)")
    parser.add_argument("--ops", nargs="+", choices=ALL_OPS, default=list(ALL_OPS),
                        help="ops to run (train_step = the end-to-end training step; generate = greedy decoding "
                             "with the media K/V cached vs recomputed every step, as OpenFlamingo does; data = "
                             "WebDataset samples/s per decode worker; packing = useful tokens/s of packed vs padded "
                             "rows; mllama = Llama 3.2 Vision cross-attention (image ranges, ragged tiles) against "
                             "transformers' dense-mask SDPA and FlexAttention)")
    parser.add_argument("--impls", nargs="+", choices=IMPL_NAMES, default=None,
                        help="implementations of the attention ops to run (default: all); generate uses torch")
    parser.add_argument("--variants", nargs="+", choices=E2E_VARIANTS, default=None,
                        help="train_step variants (default: all; on CPU the compiled ones only when named here)")
    parser.add_argument("--models", nargs="+", choices=tuple(E2E_MODELS), default=None,
                        help="train_step models (default: all on CUDA, demo on CPU)")
    parser.add_argument("--shapes", nargs="+", choices=tuple(E2E_SHAPES), default=None,
                        help="train_step shapes: pairs (32 tokens, 1 image), m3w (256, 5), long (2048, 8); "
                             "default: all")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="regional",
                        help="train_step compiled variants: per repeated block (default) or the whole model")
    parser.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--threads", type=at_least(1), default=None,
                        help="torch intra-op threads (default on cpu: 1, see bench/README.md; on cuda: unchanged)")
    parser.add_argument("--min-time", type=at_least(0.0, float, strictly=True), default=None,
                        help="CPU: seconds each measurement repeats for (default 0.5, 0.2 with --quick)")
    parser.add_argument("--device-name", default=None, help="name used in the rows and result file names")
    parser.add_argument("--date", default=None, help="date for --save file names (default: today, YYYY-MM-DD)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def device_name(device: torch.device) -> str:
    """"cpu-2core" or a slug of the GPU's name, e.g. "nvidia-h200"."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu-{cores}core"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    from flamingo_fast.cli import cpu_model

    return f"{cpu_model()}, {device_name(device).removeprefix('cpu-')}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    threads = args.threads or (1 if device.type == "cpu" else None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(args, device, dtype, argv)
    finally:
        torch.set_num_threads(previous_threads)


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr)
    # Piped output (logs, CI) would otherwise wrap the wide tables at 80 columns.
    return console if console.is_terminal else Console(stderr=stderr, width=240)


def _run(args, device: torch.device, dtype: torch.dtype, argv) -> int:
    from bench import report
    from bench.e2e import bench_e2e
    from bench.generation import IMPL as GENERATE_IMPL
    from bench.generation import bench_generation

    compiled_variants_named = bool(args.variants and set(args.variants) & set(E2E_COMPILED))
    compiled_impls_named = bool(args.impls) and any(n in args.impls for n in ("compile", "flex"))
    explicit_compiled = compiled_impls_named or compiled_variants_named
    kernel_ops = tuple(op for op in args.ops if op in OPS)
    cases, case_note = select_cases(device.type, args.quick, kernel_ops)
    settings = Settings(
        device=device, dtype=dtype,
        min_time_s=args.min_time if args.min_time is not None else (0.2 if args.quick else 0.5),
        seed=args.seed, skip_compiled=args.quick and not explicit_compiled,
        skip_model_compile=device.type == "cpu" and not compiled_variants_named,
        compiled_cases=(last_case_per_op(cases) if device.type == "cpu" and not args.quick and not explicit_compiled
                        else None),
        device_name=args.device_name or device_name(device), threads=torch.get_num_threads(),
    )
    impls = select_impls(args.impls)

    out, log = _console(), _console(stderr=True)
    started = time.perf_counter()
    peaks = measure_peaks(settings, quick=args.quick)
    log.print(f"[dim]peaks on {settings.device_name} ({DTYPE_NAMES[dtype]}): matmul {peaks.tflops:.3g} TFLOP/s, "
              f"copy {peaks.gbps:.3g} GB/s[/dim]")

    finished: list[Row] = []

    def progress(row: Row) -> None:
        timing = f"{row.ms:.3g} ms" if row.ms is not None else row.status
        log.print(f"[dim]{time.perf_counter() - started:6.1f}s  {row.op} {row.case} {row.direction} "
                  f"{row.impl}: {timing}[/dim]")
        finished.append(row)
        if args.json:  # rows so far, so that a run stopped by a time limit still leaves its results
            report.write_json(finished, args.json)

    rows: list[Row] = []
    for case in cases:
        for direction in args.directions:
            rows += bench_case(case, direction, impls, settings, peaks, on_row=progress)
    if E2E_OP in args.ops:
        variants = tuple(args.variants or E2E_VARIANTS)
        rows += bench_e2e(settings, peaks, args.quick, variants, on_row=progress, models=args.models,
                          shapes=args.shapes, compile_mode=args.compile_mode)
    if GENERATE_OP in args.ops and (args.impls is None or GENERATE_IMPL in args.impls):
        rows += bench_generation(settings, args.quick, on_row=progress)
    if DATA_OP in args.ops:
        from bench.data_path import bench_data

        rows += bench_data(settings, args.quick, on_row=progress)
    if PACKING_OP in args.ops:
        from bench.packing import bench_packing

        rows += bench_packing(settings, args.quick, on_row=progress)
    if MLLAMA_OP in args.ops:
        from bench.mllama_xattn import bench_mllama

        rows += bench_mllama(settings, args.quick, peaks, tuple(args.directions), on_row=progress)
    fill_best_peer(rows)

    note = f"  ({case_note})" if case_note and cases else ""
    report.print_tables(rows, out, peaks, title_note=note)
    targets = report.media_targets(rows)
    report.print_targets(targets, out)
    report.print_generation(report.generation_ratios(rows), out)
    report.print_step_ratios(report.train_step_ratios(rows), out)
    log.print(f"[dim]done in {time.perf_counter() - started:.0f} s[/dim]")

    if args.json:
        report.write_json(rows, args.json)
    if args.plot:
        report.write_plot(rows, args.plot, title=f"{settings.device_name} {DTYPE_NAMES[dtype]}")
    if args.save:
        date = args.date or datetime.date.today().isoformat()
        stem = f"{date}-{settings.device_name}"
        report.write_json(rows, args.save / f"{stem}.json")
        report.write_plot(rows, args.save / f"{stem}.png", title=f"{settings.device_name} {DTYPE_NAMES[dtype]}")
        meta = {
            "device_name": settings.device_name, "date": date, "device_description": device_description(device),
            "dtype": DTYPE_NAMES[dtype], "torch": torch.__version__, "threads": torch.get_num_threads(),
            "peak_tflops": peaks.tflops, "peak_gbps": peaks.gbps, "case_note": case_note,
            "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
            "json_name": f"{stem}.json", "plot_name": f"{stem}.png",
        }
        (args.save / f"{stem}.md").write_text(report.markdown_summary(rows, meta, targets))
    return 0
