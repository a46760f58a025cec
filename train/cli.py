"""`flamingo-fast train` and `python -m train` (also under torchrun).

    torchrun --nproc_per_node=8 -m train --config train/configs/xl.toml --train.steps=100 --checkpoint.resume=true
    flamingo-fast train --config demo --optim.lr=3e-4

--config takes a path or the name of a shipped config (demo, xl, finetune_vqav2). Every other argument is
an override `--section.key=value` (see train/config.py). --resume is short for --checkpoint.resume=true.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.config import config_path, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flamingo-fast train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: --section.key=value, e.g. --optim.lr=1e-4 --train.steps=500 --parallel.compile=true",
    )
    parser.add_argument("--config", default="demo", help="TOML file, or a shipped config name (default: demo)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def resolve_config_path(name: str) -> Path:
    path = Path(name)
    return path if path.is_file() else config_path(name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, overrides = build_parser().parse_known_args(argv)
    if args.resume:
        overrides.append("--checkpoint.resume=true")
    try:
        cfg = load_config(resolve_config_path(args.config), overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"flamingo-fast train: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        from train.config import to_toml

        print(to_toml(cfg.to_dict()))
        return 0

    from rich.console import Console

    from train.loop import NonFiniteLossError, train
    from train.parallel import shutdown_distributed

    console = Console()
    finished = False
    try:
        result = train(cfg, console=console)
        finished = True
    except NonFiniteLossError as error:
        console.print(f"[red]stopped:[/red] {error}")
        return 1
    finally:
        shutdown_distributed(synchronize=finished)
    console.print(f"done: {result.steps} steps in {result.wall_seconds:.1f} s, final loss {result.final_loss}, "
                  f"{result.skipped_steps} skipped; run folder {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
