"""The `flamingo-fast` command line: demo, train, plan, bench, eval, generate, tile-plan, info."""

from __future__ import annotations

import argparse
import sys


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata
    import platform

    import torch

    import flamingo_fast

    versions = {"python": platform.python_version(), "flamingo_fast": flamingo_fast.__version__,
                "torch": torch.__version__, "torch.cuda": str(torch.version.cuda)}
    for package in ("nvidia-cutlass", "triton", "torchdata", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else the machine type): figures are stated with it, since float
    summation order differs between CPUs."""
    import platform

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _device_summary() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (CPU only)"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"


def _sample_backends() -> dict[str, str]:
    """Which backend each op picks on this machine for typical inputs (bf16 on a GPU, fp32 on CPU), and why not cuda."""
    import torch

    from flamingo_fast import ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.empty(1, 128, 8, 128, device=device, dtype=dtype)
    kv = torch.empty(1, 128, 8, 128, device=device, dtype=dtype)
    choices = {}
    for op in ("attention", "media_cross_attention", "perceiver_attention"):
        backend = ops.resolve_backend(op, q, kv, kv)
        reason = ops.cuda_unsupported_reason(op, q, kv, kv) if backend != "cuda" else None
        choices[op] = f"{backend} (cuda: {reason})" if reason else backend
    return choices


def cmd_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from flamingo_fast import native

    console = Console()
    table = Table(title="flamingo-fast", show_header=False)
    for name, version in _versions().items():
        table.add_row(name, version)
    table.add_row("device", _device_summary())
    build = native.build_info()
    if build["available"]:
        cuda = (f"CUDA {build['cuda_version']} for {build['cuda_archs']}" if build["cuda"] else
                "host only: the CUDA kernels were not compiled (the default without a visible GPU; reinstall with "
                "FLAMINGO_FAST_CUDA=1 to compile them); every op runs on the torch backend")
        table.add_row("_C build", cuda)
        table.add_row("_C functions", ", ".join(build["functions"]))
    else:
        table.add_row("_C build", f"[red]not importable[/red]: {build['error']}")
    for op, backend in _sample_backends().items():
        table.add_row(f"backend: {op}", backend)
    console.print(table)
    return 0


def at_least(minimum: int | float, kind: type = int, strictly: bool = False, at_most: int | float | None = None):
    """An argparse type: a `kind` number >= minimum (> minimum when `strictly`), and <= at_most if given."""
    def parse(text: str):
        value = kind(text)  # a ValueError here: argparse reports "invalid <kind> value"
        if value < minimum or (strictly and value == minimum) or (at_most is not None and value > at_most):
            bound = f"{'>' if strictly else '>='} {minimum}" + (f" and <= {at_most}" if at_most is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _parse_media_index(text: str):
    import torch

    try:
        rows = [[int(value) for value in row.split(",") if value.strip()] for row in text.split(";")]
    except ValueError:
        raise ValueError(f"--media-index: expected integers separated by ',' (rows by ';'), got {text!r}") from None
    if len({len(row) for row in rows}) != 1 or not rows[0]:
        raise ValueError("--media-index: every row (separated by ';') needs the same, non-zero length")
    return torch.tensor(rows, dtype=torch.int64)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the media-mask tile plan for a given media_index pattern."""
    from rich.console import Console
    from rich.table import Table

    from flamingo_fast.ops import check_media_index_values
    from flamingo_fast.tile_plan import plan_media_tiles

    try:
        media_index = _parse_media_index(args.media_index)
        num_images = int(media_index.max().item()) + 1 if args.num_images is None else args.num_images
        check_media_index_values(media_index, num_images)
    except ValueError as error:
        print(f"flamingo-fast tile-plan: {error}", file=sys.stderr)
        return 2
    num_keys = max(num_images, 0) * args.latents
    q_plan, k_plan = plan_media_tiles(media_index, num_keys, args.latents, args.block_q, args.block_k,
                                      not args.all_previous)
    console = Console()
    for row in range(media_index.shape[0]):
        table = Table(title=f"row {row}: {media_index.shape[1]} tokens, {num_keys} keys")
        table.add_column("query block")
        table.add_column("keys visited")
        for block, (begin, end) in enumerate(q_plan[row].tolist()):
            last = min((block + 1) * args.block_q, media_index.shape[1]) - 1
            table.add_row(f"{block * args.block_q}..{last}",
                          f"[{begin}, {end})" if end > begin else "none")
        console.print(table)
        keys = Table(title=f"row {row}: key blocks")
        keys.add_column("key block")
        keys.add_column("query rows visiting")
        for block, (begin, end) in enumerate(k_plan[row].tolist()):
            last = min((block + 1) * args.block_k, num_keys) - 1
            keys.add_row(f"{block * args.block_k}..{last}",
                         f"[{begin}, {end})" if end > begin else "none")
        console.print(keys)
    return 0


# Subcommands whose implementation owns its own argument parser: `flamingo-fast NAME ARGS...` is
# `module.main(ARGS)`. Imported lazily so `flamingo-fast info` stays fast.
FORWARDED = {
    "demo": ("train.demo", "train the demo preset on the built-in shapes data, then evaluate (the main job)"),
    "train": ("train.cli", "run the FSDP trainer (same as `torchrun -m train`)"),
    "plan": ("train.plan_cli", "memory, traffic and time of a training config on N GPUs, before renting them"),
    "bench": ("bench.cli", "kernel and end-to-end benchmarks"),
    "eval": ("flamingo_fast.eval.cli", "few-shot evaluation (vqav2, coco, flickr30k, shapes)"),
    "generate": ("flamingo_fast.generate_cli", "generate text for an image and a prompt"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flamingo-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in FORWARDED.items():
        sub.add_parser(name, help=help_text, add_help=False)

    info = sub.add_parser("info", help="versions, what _C contains, and which backend each op uses here")
    info.set_defaults(handler=cmd_info)

    plan = sub.add_parser("tile-plan", help="show the media-mask tile plan for a media_index pattern")
    plan.add_argument("--media-index", required=True,
                      help="comma-separated indices, rows separated by ';' (e.g. '-1,-1,0,0,1;0,0,0,0,0')")
    plan.add_argument("--num-images", type=at_least(0), default=None, help="images supplied (default: max index + 1)")
    plan.add_argument("--latents", type=at_least(1), default=64, help="latents per image")
    plan.add_argument("--block-q", type=at_least(1), default=128)
    plan.add_argument("--block-k", type=at_least(1), default=128)
    plan.add_argument("--all-previous", action="store_true", help="attend to all previous images")
    plan.set_defaults(handler=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in FORWARDED:
        import importlib

        return importlib.import_module(FORWARDED[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
