"""The bad-input table: each row is one bad call of a public op or of the command line (with a bad train
config among them), and what it must give: the error type and the words its message must contain (the
argument's name and what was expected). A command must end with a usage error on stderr and a non-zero exit
code, never a traceback. Model inputs and model-config fields have their own tables
(tests/test_models_flamingo.py::test_bad_inputs_raise_clear_errors, tests/test_models_config.py::test_bad_overrides).
"""

from __future__ import annotations

import contextlib
import io
import random
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from flamingo_fast import ops
from flamingo_fast.cli import main as cli_main


@dataclass(frozen=True)
class Case:
    call: Callable[[dict], object]  # gets the module fixture (paths of an exported model, a bad TOML, an image)
    error: type | int  # an exception type (ops), or the exit code (command line)
    words: tuple[str, ...]


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _qkv():
    """Valid attention inputs: q (2, 5, 4, 16), k/v (2, 6, 2, 16)."""
    return _t(2, 5, 4, 16), _t(2, 6, 2, 16), _t(2, 6, 2, 16)


def _media(edit: Callable[[torch.Tensor], None] | None = None):
    """Valid media inputs (3 images of 2 latents), media_index edited in place by `edit`."""
    q, k, v = _qkv()
    media_index = torch.tensor([[-1, 0, 0, 1, 2], [0, 0, 1, 1, 1]])
    if edit is not None:
        edit(media_index)
    return q, k, v, media_index


def _with(args: tuple, index: int, value) -> tuple:
    return args[:index] + (value,) + args[index + 1:]


def _attention(index: int, value, **kwargs):
    return lambda _: ops.attention(*_with(_qkv(), index, value(_qkv()[index])), **kwargs)


def _cross(edit=None, latents=2, **kwargs):
    return lambda _: ops.media_cross_attention(*_media(edit), latents, **kwargs)


def _setitem(row: int, col: int, value: int):
    return lambda media_index: media_index.__setitem__((row, col), value)


def _fill(text: str, paths: dict[str, str]) -> str:
    """Put the fixture's paths in for {model}, {toml}, {image} (str.format would trip on TOML's braces)."""
    for key, path in paths.items():
        text = text.replace("{" + key + "}", path)
    return text


def _cli(*argv: str):
    """`flamingo-fast ARGV`, run in this process."""
    return lambda paths: [_fill(arg, paths) for arg in argv]


TRAIN = ("train", "--config", "tiny")

CASES: dict[str, Case] = {
    # -- ops: attention ---------------------------------------------------------------------------------------
    "attention: q not a tensor": Case(lambda _: ops.attention([[1.0]], *_qkv()[1:]), TypeError, ("q", "torch.Tensor")),
    "attention: q rank 3": Case(_attention(0, lambda t: t[0]), ValueError, ("q", "rank 4")),
    "attention: k rank 3": Case(_attention(1, lambda t: t[0]), ValueError, ("k", "rank 4")),
    "attention: v rank 3": Case(_attention(2, lambda t: t[0]), ValueError, ("v", "rank 4")),
    "attention: batch mismatch": Case(lambda _: ops.attention(_qkv()[0], _qkv()[1][:1], _qkv()[2][:1]), ValueError,
                                      ("k", "batch")),
    "attention: head_dim mismatch": Case(lambda _: ops.attention(_qkv()[0], _t(2, 6, 2, 8), _t(2, 6, 2, 8)),
                                         ValueError, ("k", "head_dim")),
    "attention: q heads not a multiple of kv heads": Case(
        lambda _: ops.attention(_qkv()[0], _t(2, 6, 3, 16), _t(2, 6, 3, 16)), ValueError,
        ("q heads", "multiple", "k/v heads")),
    "attention: k and v shapes differ": Case(_attention(2, lambda t: t[:, :5]), ValueError, ("k and v", "same shape")),
    "attention: int64 q": Case(_attention(0, lambda t: t.long()), TypeError, ("q", "dtype", "float32")),
    "attention: int32 q": Case(_attention(0, lambda t: t.int()), TypeError, ("q", "dtype")),
    "attention: bool q": Case(_attention(0, lambda t: t.bool()), TypeError, ("q", "dtype")),
    "attention: complex q": Case(_attention(0, lambda t: t.to(torch.complex64)), TypeError, ("q", "dtype")),
    "attention: v float64, q float32": Case(_attention(2, lambda t: t.double()), TypeError, ("v", "dtype")),
    "attention: k, v on another device": Case(
        lambda _: ops.attention(_qkv()[0], _qkv()[1].to("meta"), _qkv()[2].to("meta")), ValueError,
        ("k", "device", "meta")),
    "attention: no keys": Case(lambda _: ops.attention(_qkv()[0], _qkv()[1][:, :0], _qkv()[2][:, :0]), ValueError,
                               ("k and v", "at least one key")),
    "attention: causal not a bool": Case(lambda _: ops.attention(*_qkv(), causal="yes"), TypeError, ("causal", "bool")),
    "attention: scale a tensor": Case(lambda _: ops.attention(*_qkv(), scale=torch.tensor(0.5)), TypeError,
                                      ("scale", "float")),
    "perceiver: q and k heads differ": Case(lambda _: ops.perceiver_attention(*_qkv()), ValueError,
                                            ("k has 2 heads", "q has 4")),
    # -- ops: media cross-attention ---------------------------------------------------------------------------
    "media: media_index rank 1": Case(lambda _: ops.media_cross_attention(*_media()[:3], _media()[3][0], 2), ValueError,
                                      ("media_index", "rank 2")),
    "media: media_index too short": Case(lambda _: ops.media_cross_attention(*_media()[:3], _media()[3][:, :4], 2),
                                         ValueError, ("media_index", "shape")),
    "media: media_index float": Case(lambda _: ops.media_cross_attention(*_media()[:3], _media()[3].float(), 2),
                                     TypeError, ("media_index", "int32", "int64")),
    "media: media_index int16": Case(lambda _: ops.media_cross_attention(*_media()[:3], _media()[3].short(), 2),
                                     TypeError, ("media_index", "int32", "int64")),
    "media: media_index bool": Case(lambda _: ops.media_cross_attention(*_media()[:3], _media()[3].bool(), 2),
                                    TypeError, ("media_index", "int32", "int64")),
    "media: media_index on another device": Case(
        lambda _: ops.media_cross_attention(*_media()[:3], _media()[3].to("meta"), 2), ValueError,
        ("media_index", "device")),
    "media: media_index decreasing": Case(_cross(_setitem(1, 3, 0)), ValueError,
                                          ("media_index", "non-decreasing", "row 1")),
    "media: media_index below -1": Case(_cross(_setitem(0, 0, -2)), ValueError, ("media_index", ">= -1")),
    "media: media_index past the images": Case(_cross(_setitem(1, 4, 3)), ValueError,
                                               ("media_index", "image 3", "only 3 images")),
    "media: keys not a multiple of latents_per_media": Case(_cross(latents=4), ValueError,
                                                            ("latents_per_media=4", "multiple")),
    "media: latents_per_media 0": Case(_cross(latents=0), ValueError, ("latents_per_media", "positive int")),
    "media: latents_per_media negative": Case(_cross(latents=-2), ValueError, ("latents_per_media", "positive int")),
    "media: latents_per_media float": Case(_cross(latents=2.0), ValueError, ("latents_per_media", "positive int")),
    "media: latents_per_media bool": Case(_cross(latents=True), ValueError, ("latents_per_media", "positive int")),
    "media: only_immediate an int": Case(_cross(only_immediate=1), TypeError, ("only_immediate", "bool")),
    "media: check_media_index_values on a decreasing row": Case(
        lambda _: ops.check_media_index_values(torch.tensor([[0, 1, 0]]), 2), ValueError, ("non-decreasing",)),
    # -- command line: flamingo-fast, plan, bench ---------------------------------------------------------------
    "cli: no command": Case(_cli(), 2, ("required",)),
    "cli: unknown command": Case(_cli("fly"), 2, ("invalid choice", "fly")),
    "tile-plan: media index not integers": Case(_cli("tile-plan", "--media-index", "a,b"), 2, ("--media-index", "'a,b'")),
    "tile-plan: ragged media index rows": Case(_cli("tile-plan", "--media-index", "0,1;0"), 2, ("--media-index", "same")),
    "tile-plan: decreasing media index": Case(_cli("tile-plan", "--media-index", "1,0"), 2, ("non-decreasing",)),
    "tile-plan: index past --num-images": Case(_cli("tile-plan", "--media-index", "0,2", "--num-images", "2"), 2, ("image 2",)),
    "tile-plan: --latents 0": Case(_cli("tile-plan", "--media-index", "0", "--latents", "0"), 2, ("--latents", ">= 1")),
    "tile-plan: --block-q 0": Case(_cli("tile-plan", "--media-index", "0", "--block-q", "0"), 2, ("--block-q", ">= 1")),
    "tile-plan: --num-images -3": Case(_cli("tile-plan", "--media-index", "0", "--num-images", "-3"), 2, ("--num-images",)),
    "bench: --threads 0": Case(_cli("bench", "--threads", "0"), 2, ("--threads", ">= 1")),
    "bench: --min-time -1": Case(_cli("bench", "--min-time", "-1"), 2, ("--min-time", "> 0")),
    "bench: unknown op": Case(_cli("bench", "--ops", "softmax"), 2, ("--ops", "invalid choice")),
    # -- command line: train and its config ----------------------------------------------------------------------
    "train: unknown shipped config": Case(_cli("train", "--config", "nope"), 2, ("no shipped config 'nope'",)),
    "train: config file not TOML": Case(_cli("train", "--config", "{toml}"), 2, ("{toml}", "not valid TOML")),
    "train: unknown key": Case(_cli(*TRAIN, "--train.stepz=3"), 2, ("unknown key train.stepz", "steps")),
    "train: steps not an integer": Case(_cli(*TRAIN, "--train.steps=abc"), 2, ("train.steps", "integer")),
    "train: zero steps": Case(_cli(*TRAIN, "--train.steps=0"), 2, ("train.steps must be >= 1",)),
    "train: negative lr": Case(_cli(*TRAIN, "--optim.lr=-1"), 2, ("optim.lr",)),
    "train: micro-batch 0": Case(_cli(*TRAIN, "--data.micro_batch_size=0"), 2, ("data.micro_batch_size", ">= 1")),
    "train: keep_last 0": Case(_cli(*TRAIN, "--checkpoint.keep_last=0"), 2, ("checkpoint.keep_last", ">= 1")),
    "train: unknown dtype": Case(_cli(*TRAIN, "--parallel.param_dtype=float7"), 2, ("parallel.param_dtype", "float7")),
    "train: unknown preset": Case(_cli(*TRAIN, "--model.preset=huge"), 2, ("unknown preset 'huge'",)),
    "train: zero LM layers": Case(_cli(*TRAIN, "--model.overrides={lm={layers=0}}"), 2, ("lm.layers", ">= 1")),
    "train: no data sources": Case(_cli(*TRAIN, "--data.sources=[]"), 2, ("data.sources", "non-empty")),
    "train: unknown source kind": Case(_cli(*TRAIN, '--data.sources=[{kind="laion"}]'), 2,
                                       ("data.sources[0]", "kind", "'laion'")),
    "train: packing not a bool": Case(_cli(*TRAIN, '--data.packing="yes"'), 2, ("data.packing", "true or false")),
    "train: packing buffer 0": Case(_cli(*TRAIN, "--data.packing_buffer=0"), 2, ("data.packing_buffer", ">= 1")),
    "train: epochs of packed rows": Case(_cli(*TRAIN, "--train.epochs=2"), 2,
                                         ("train.epochs with data.packing", "train.steps_per_epoch")),
    "train: zero source weight": Case(_cli(*TRAIN, '--eval.sources=[{kind="shapes", weight=0}]'), 2,
                                      ("eval.sources[0].weight", "> 0")),
    "plan: zero GPUs": Case(_cli("plan", "--config", "tiny", "--gpus", "0"), 2, ("--gpus", ">= 1")),
    "plan: no images": Case(_cli("plan", "--config", "tiny", "--gpus", "2", "--images", "0"), 2, ("--images", ">= 1")),
    "plan: unknown GPU profile": Case(_cli("plan", "--config", "tiny", "--gpus", "2", "--gpu", "tpu"), 2,
                                      ("--gpu", "invalid choice")),
    "plan: batch that does not split over the GPUs": Case(_cli("plan", "--config", "tiny", "--gpus", "3"), 2,
                                                          ("global_batch_tokens", "world_size")),
    # -- command line: demo ------------------------------------------------------------------------------------
    "demo: seeds not integers": Case(_cli("demo", "--seeds", "x"), 2, ("--seeds", "'x'")),
    "demo: repeated seed": Case(_cli("demo", "--seeds", "1,1"), 2, ("--seeds", "each once")),
    "demo: --seed with --seeds": Case(_cli("demo", "--seed", "1", "--seeds", "0,1"), 2, ("either --seed",)),
    "demo: negative LM steps": Case(_cli("demo", "--lm-steps", "-1"), 2, ("--lm-steps", ">= 1")),
    "demo: zero learning rate": Case(_cli("demo", "--vision-lr", "0"), 2, ("--vision-lr", "> 0")),
    "demo: stray argument": Case(_cli("demo", "extra"), 2, ("unrecognized arguments", "extra")),
    # -- command line: eval and generate -----------------------------------------------------------------------
    "eval: unknown task": Case(_cli("eval", "--checkpoint", "{model}", "--task", "nope"), 2, ("--task", "nope")),
    "eval: negative shots": Case(_cli("eval", "--checkpoint", "{model}", "--task", "shapes", "--shots", "-1"), 2,
                                 ("--shots", ">= 0")),
    "eval: batch size 0": Case(_cli("eval", "--checkpoint", "{model}", "--task", "shapes", "--batch-size", "0"), 2,
                               ("--batch-size", ">= 1")),
    "eval: checkpoint folder missing": Case(_cli("eval", "--checkpoint", "{model}/absent", "--task", "shapes"), 1,
                                            ("cannot load --checkpoint", "absent")),
    "eval: vqav2 without its files": Case(_cli("eval", "--checkpoint", "{model}", "--task", "vqav2"), 1,
                                          ("--task vqav2 needs", "--questions")),
    "eval: vqav2 questions file missing": Case(
        _cli("eval", "--checkpoint", "{model}", "--task", "vqav2", "--images", "{model}",
             *(f"--{kind}={{model}}/{kind}.json" for kind in ("questions", "annotations", "support-questions",
                                                             "support-annotations"))),
        1, ("--task vqav2", "questions.json")),
    "generate: image file missing": Case(_cli("generate", "--checkpoint", "{model}", "--image", "{model}/none.png",
                                              "--prompt", "<image>Output:"), 1, ("cannot read image", "none.png")),
    "generate: fewer images than <image> markers": Case(
        _cli("generate", "--checkpoint", "{model}", "--image", "{image}", "--prompt", "<image>a<image>Output:"), 1,
        ("generate", "<image>")),
    "generate: checkpoint folder missing": Case(
        _cli("generate", "--checkpoint", "{model}/absent", "--image", "{image}", "--prompt", "<image>Output:"), 1,
        ("cannot load --checkpoint", "absent")),
    "generate: top-p above 1": Case(_cli("generate", "--checkpoint", "{model}", "--prompt", "x", "--top-p", "1.5"), 2,
                                    ("--top-p", "<= 1.0")),
    "generate: temperature 0": Case(_cli("generate", "--checkpoint", "{model}", "--prompt", "x", "--temperature", "0"),
                                    2, ("--temperature", "> 0")),
    "generate: zero new tokens": Case(_cli("generate", "--checkpoint", "{model}", "--prompt", "x",
                                           "--max-new-tokens", "0"), 2, ("--max-new-tokens", ">= 1")),
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """A tiny exported model folder, a scene image, and a file that is not TOML."""
    from flamingo_fast.convert import save_pretrained
    from flamingo_fast.data.shapes import random_scene, render_scene, shapes_tokenizer
    from flamingo_fast.models import Flamingo, FlamingoConfig

    folder = tmp_path_factory.mktemp("bad_inputs")
    tokenizer = shapes_tokenizer()
    cfg = FlamingoConfig.from_preset(
        "demo", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
        vision={"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
        resampler={"dim": 32, "depth": 1, "heads": 2, "head_dim": 16, "n_latents": 4},
        xattn={"heads": 2, "head_dim": 16}, lm={"dim": 32, "layers": 2, "heads": 2, "kv_heads": 1, "ffn_dim": 64})
    save_pretrained(Flamingo(cfg).eval(), tokenizer, folder / "model")
    render_scene(random_scene(random.Random(0)), 32).save(folder / "scene.png")
    (folder / "broken.toml").write_text("[train]\nsteps = = 3\n")
    return {"model": str(folder / "model"), "image": str(folder / "scene.png"), "toml": str(folder / "broken.toml")}


def _run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli_main(argv)
        except SystemExit as exit_:
            code = exit_.code
    if isinstance(code, str):  # SystemExit("message"): Python prints it and exits with 1
        return 1, err.getvalue() + code
    return code, err.getvalue()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, paths):
    case = CASES[name]
    words = [_fill(word, paths) for word in case.words]
    if isinstance(case.error, int):
        code, message = _run_cli(case.call(paths))
        assert code == case.error, (code, message)
    else:
        with pytest.raises(case.error) as info:
            case.call(paths)
        message = str(info.value)
    for word in words:
        assert word in message, message
    assert "Traceback" not in message


def test_the_table_covers_ops_and_every_command():
    assert len(CASES) >= 40
    prefixes = {name.split(":")[0] for name in CASES}
    assert {"attention", "media", "perceiver", "cli", "tile-plan", "plan", "bench", "train", "demo", "eval", "generate"} <= prefixes


def test_the_unedited_inputs_are_valid():
    # Every op row edits one thing of these inputs: unedited, they must pass (else a row could pass for the
    # wrong reason).
    ops.attention(*_qkv())
    ops.perceiver_attention(_t(2, 5, 2, 16), *_qkv()[1:])
    ops.media_cross_attention(*_media(), 2, only_immediate=True)
    ops.check_media_index_values(_media()[3], 3)
    ops.check_media_index_values(torch.tensor([[-1, 0, 1, 1]]), 2)
