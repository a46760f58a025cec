"""`flamingo-fast eval --task shapes` on an exported tiny model: table printed, JSON written, equal to evaluate()."""

import json

import torch

from flamingo_fast.convert import save_pretrained
from flamingo_fast.data.shapes import ShapesDataset, shapes_tokenizer
from flamingo_fast.eval import evaluate
from flamingo_fast.eval.cli import main
from flamingo_fast.models import Flamingo, FlamingoConfig

TOKENIZER = shapes_tokenizer()


def test_eval_shapes_cli(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = FlamingoConfig.from_preset(
        "demo", vocab_size=TOKENIZER.vocab_size, pad_token_id=TOKENIZER.pad_id,
        vision={"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
        resampler={"dim": 32, "depth": 1, "heads": 2, "head_dim": 16, "n_latents": 4},
        xattn={"heads": 2, "head_dim": 16}, lm={"dim": 32, "layers": 2, "heads": 2, "kv_heads": 1, "ffn_dim": 64})
    model = Flamingo(cfg).eval()
    save_pretrained(model, TOKENIZER, tmp_path / "model")
    out = tmp_path / "results.json"
    assert main(["--checkpoint", str(tmp_path / "model"), "--task", "shapes", "--shots", "0,1", "--num-queries", "2",
                 "--num-support", "6", "--num-beams", "1", "--max-new-tokens", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "shapes_caption" in printed and "shapes_vqa" in printed and "vqa_accuracy" in printed
    payload = json.loads(out.read_text())
    assert {(r["task"], r["shots"], r["metric"]) for r in payload["summary"]} == {
        (task, k, metric) for k in (0, 1)
        for task, metrics in (("shapes_caption", ("cider", "exact_match")), ("shapes_vqa", ("vqa_accuracy", "exact_match")))
        for metric in metrics}
    assert payload["settings"]["shots"] == [0, 1]
    # The same numbers as calling evaluate() directly on the same data.
    direct = evaluate(model, TOKENIZER, "shapes_vqa", [0, 1], queries=ShapesDataset("val", 2, image_size=16, task="vqa"),
                      support=ShapesDataset("train", 6, image_size=16, task="vqa"), num_beams=1, max_new_tokens=4)
    from_cli = [r for r in payload["results"] if r["task"] == "shapes_vqa"]
    assert [r["metrics"] for r in from_cli] == [r.metrics for r in direct]
    assert [p["prediction"] for r in from_cli for p in r["predictions"]] == [
        p["prediction"] for r in direct for p in r.predictions]
