"""`flamingo-fast generate`: continue a prompt with interleaved images from an exported model folder.

    flamingo-fast generate --checkpoint DIR --image a.jpg --prompt "<image>Output:"
    flamingo-fast generate --checkpoint DIR --image a.jpg --image b.jpg \\
        --prompt "<image>Output:a cat.<|endofchunk|><image>Output:" --num-beams 3

One `--image` per `<image>` in the prompt, in order. DIR holds config.json, model.safetensors and
tokenizer.json (flamingo_fast.convert.save_pretrained). Prints the generated text (up to
`<|endofchunk|>` or eos).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from flamingo_fast.cli import at_least


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="flamingo-fast generate", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="exported model folder")
    parser.add_argument("--prompt", required=True, help='text with one "<image>" per --image')
    parser.add_argument("--image", action="append", default=[], help="image file (repeat, in prompt order)")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=20)
    parser.add_argument("--num-beams", type=at_least(1), default=1, help="beam search with this many beams (paper: 3)")
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy / beam search")
    parser.add_argument("--temperature", type=at_least(0.0, float, strictly=True), default=1.0)
    parser.add_argument("--top-p", type=at_least(0.0, float, strictly=True, at_most=1.0), default=1.0)
    parser.add_argument("--top-k", type=at_least(0), default=0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="cpu")
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from flamingo_fast.convert.pretrained import load_pretrained
    from flamingo_fast.data.sample import BadSampleError
    from flamingo_fast.data.transforms import open_image
    from flamingo_fast.eval.text_generation import generate_text

    try:
        images = [open_image(path) for path in args.image]
    except BadSampleError as error:
        raise SystemExit(f"flamingo-fast generate: cannot read image: {error.detail}") from None
    try:
        model, tokenizer = load_pretrained(args.checkpoint, device=args.device)
    except (OSError, ValueError) as error:
        raise SystemExit(f"flamingo-fast generate: cannot load --checkpoint {args.checkpoint}: {error}") from None
    options = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, length_penalty=args.length_penalty)
    if args.sample:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        options.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                       generator=generator)
    try:
        text = generate_text(model, tokenizer, [args.prompt], [images], **options)[0]
    except ValueError as error:
        raise SystemExit(f"flamingo-fast generate: {error}") from None
    print(text)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
