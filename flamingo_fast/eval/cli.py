"""`flamingo-fast eval`: few-shot evaluation of an exported model folder; prints a table, writes JSON.

    flamingo-fast eval --checkpoint DIR --task shapes --shots 0,4 --num-queries 100 --json out.json
    flamingo-fast eval --checkpoint DIR --task coco --karpathy dataset_coco.json --images COCO_DIR
    flamingo-fast eval --checkpoint DIR --task vqav2 --questions Q.json --annotations A.json --images DIR \\
        --support-questions TQ.json --support-annotations TA.json --support-images TDIR

DIR is a folder written by flamingo_fast.convert.save_pretrained (config.json, model.safetensors,
tokenizer.json). "shapes" evaluates the embedded shapes data (captions and VQA; queries from the "val"
split, demonstrations from "train"). COCO / Flickr30k read Karpathy split files (queries: --split, test by
default; demonstrations: --support-split, train). The JSON holds the settings, the summary rows
(mean/std over seeds) and every run's metrics and predictions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from flamingo_fast.cli import at_least


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _shot_list(text: str) -> list[int]:
    values = _int_list(text)
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"shot counts must be >= 0, got {text!r}")
    return values


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="flamingo-fast eval", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="exported model folder (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--task", required=True, choices=["vqav2", "coco", "flickr30k", "shapes"])
    parser.add_argument("--shots", type=_shot_list, default=[0, 4, 8, 32], help="comma-separated, e.g. 0,4,8,32")
    parser.add_argument("--num-queries", type=at_least(1), default=None, help="first N queries (default: all; shapes: 200)")
    parser.add_argument("--seeds", type=_int_list, default=[0], help="demonstration draws, e.g. 0,1,2")
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--num-beams", type=at_least(1), default=3)
    parser.add_argument("--length-penalty", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=at_least(1), default=None, help="default: 20 captions, 5 VQA")
    parser.add_argument("--rices", action="store_true", help="choose demonstrations by image similarity")
    parser.add_argument("--separator", default="", help="text between in-context chunks (OpenFlamingo: '\\n')")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    data = parser.add_argument_group("data")
    data.add_argument("--images", help="image folder of the query split (VQAv2, COCO, Flickr30k)")
    data.add_argument("--questions", help="VQAv2 questions json (queries)")
    data.add_argument("--annotations", help="VQAv2 annotations json (queries)")
    data.add_argument("--support-questions", help="VQAv2 questions json of the demonstrations (train)")
    data.add_argument("--support-annotations", help="VQAv2 annotations json of the demonstrations")
    data.add_argument("--support-images", help="image folder of the demonstrations (default: --images)")
    data.add_argument("--karpathy", help="Karpathy split json (COCO, Flickr30k)")
    data.add_argument("--split", default="test", help="Karpathy split of the queries")
    data.add_argument("--support-split", default="train", help="Karpathy split of the demonstrations")
    data.add_argument("--num-support", type=at_least(1), default=2048, help="shapes: generated demonstration pool")
    return parser


def _require(args: argparse.Namespace, *names: str) -> None:
    absent = ["--" + n.replace("_", "-") for n in names if getattr(args, n) is None]
    if absent:
        raise SystemExit(f"flamingo-fast eval --task {args.task} needs {', '.join(absent)}")


def load_task_data(args: argparse.Namespace, image_size: int) -> list[tuple[str, object, object]]:
    """[(task name, queries, support)] for the CLI's --task."""
    if args.task == "shapes":
        from flamingo_fast.data.shapes import ShapesDataset

        n = args.num_queries or 200
        size = max(image_size, 16)
        return [(f"shapes_{kind}", ShapesDataset("val", n, image_size=size, task=kind),
                 ShapesDataset("train", args.num_support, image_size=size, task=kind)) for kind in ("caption", "vqa")]
    if args.task == "vqav2":
        from flamingo_fast.data.vqav2 import VQAv2Dataset

        _require(args, "questions", "annotations", "images", "support_questions", "support_annotations")
        queries = VQAv2Dataset(args.questions, args.images, args.annotations)
        support = VQAv2Dataset(args.support_questions, args.support_images or args.images, args.support_annotations)
        return [("vqav2", queries, support)]
    from flamingo_fast.data.captions import CaptionDataset

    _require(args, "karpathy", "images")
    queries = CaptionDataset(args.karpathy, args.images, split=args.split, per_caption=False)
    support = CaptionDataset(args.karpathy, args.support_images or args.images, split=args.support_split,
                             per_caption=False)
    return [(args.task, queries, support)]


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("task", "shots", "metric", "score", "seeds", "queries"):
        table.add_column(column, justify="right" if column not in ("task", "metric") else "left")
    for row in rows:
        score = f"{row['mean']:.2f}" + (f" ± {row['std']:.2f}" if row["seeds"] > 1 else "")
        table.add_row(row["task"], str(row["shots"]), row["metric"], score, str(row["seeds"]), str(row["num_queries"]))
    Console().print(table)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from flamingo_fast.convert.pretrained import load_pretrained
    from flamingo_fast.eval.harness import evaluate, summarize

    try:
        model, tokenizer = load_pretrained(args.checkpoint, device=args.device)
    except (OSError, ValueError) as error:
        raise SystemExit(f"flamingo-fast eval: cannot load --checkpoint {args.checkpoint}: {error}") from None
    try:
        tasks = load_task_data(args, model.cfg.vision.image_size)
    except (OSError, ValueError) as error:
        raise SystemExit(f"flamingo-fast eval --task {args.task}: {error}") from None
    results = []
    with Progress(transient=True) as progress:
        for name, queries, support in tasks:
            bar = progress.add_task(f"eval {name}", total=None)
            results += evaluate(
                model, tokenizer, name, args.shots, queries=queries, support=support, num_queries=args.num_queries,
                seeds=args.seeds, batch_size=args.batch_size, num_beams=args.num_beams,
                length_penalty=args.length_penalty, max_new_tokens=args.max_new_tokens, rices=args.rices,
                demo_separator=args.separator,
                on_batch=lambda done, total, bar=bar: progress.update(bar, completed=done, total=total),
            )
    rows = summarize(results)
    print_table(rows, f"flamingo-fast eval: {args.checkpoint}")
    if args.json is not None:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "handler"}
        payload = {"settings": settings, "summary": rows, "results": [r.to_dict() for r in results]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
