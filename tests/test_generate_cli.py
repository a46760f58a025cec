"""`flamingo-fast generate` on an exported tiny model: prints what generate_text returns."""

import pytest
import torch
from PIL import Image

from flamingo_fast.convert import save_pretrained
from flamingo_fast.data.shapes import random_scene, render_scene, shapes_tokenizer
from flamingo_fast.eval import generate_text
from flamingo_fast.generate_cli import main
from flamingo_fast.models import Flamingo, FlamingoConfig

TOKENIZER = shapes_tokenizer()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    cfg = FlamingoConfig.from_preset(
        "demo", vocab_size=TOKENIZER.vocab_size, pad_token_id=TOKENIZER.pad_id,
        vision={"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
        resampler={"dim": 32, "depth": 1, "heads": 2, "head_dim": 16, "n_latents": 4},
        xattn={"heads": 2, "head_dim": 16}, lm={"dim": 32, "layers": 2, "heads": 2, "kv_heads": 1, "ffn_dim": 64})
    model = Flamingo(cfg).eval()
    with torch.no_grad():
        for layer in model.xattn_layers.values():
            layer.attn_gate.fill_(1.0)
        # Stop tokens get logit 0 while some word's logit is positive: the random model writes a few words.
        model.lm.special_head.weight.zero_()
        model.lm.lm_head.weight[TOKENIZER.eos_id] = 0
    folder = tmp_path_factory.mktemp("export")
    save_pretrained(model, TOKENIZER, folder)
    import random

    paths = []
    for i in range(2):
        path = folder / f"scene{i}.png"
        render_scene(random_scene(random.Random(i)), 48).save(path)
        paths.append(path)
    return model, folder, paths


def test_generate_prints_the_continuation(exported, capsys):
    model, folder, paths = exported
    prompt = "<image>Output:a red circle<|endofchunk|><image>Output:"
    assert main(["--checkpoint", str(folder), "--image", str(paths[0]), "--image", str(paths[1]),
                 "--prompt", prompt, "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip()
    images = [Image.open(p).convert("RGB") for p in paths]
    expected = generate_text(model, TOKENIZER, [prompt], [images], max_new_tokens=5)[0]
    assert printed == expected and printed


def test_generate_sampling_is_seeded(exported, capsys):
    _, folder, paths = exported
    args = ["--checkpoint", str(folder), "--image", str(paths[0]), "--prompt", "<image>Output:", "--sample",
            "--temperature", "3", "--max-new-tokens", "6"]
    outputs = []
    for seed in ("1", "1", "2"):
        main(args + ["--seed", seed])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_generate_errors(exported, tmp_path):
    _, folder, paths = exported
    with pytest.raises(SystemExit, match="2 <image> markers but 1 images"):
        main(["--checkpoint", str(folder), "--image", str(paths[0]), "--prompt", "<image><image>Output:"])
    with pytest.raises(SystemExit, match="cannot read image"):
        main(["--checkpoint", str(folder), "--image", str(tmp_path / "missing.jpg"), "--prompt", "<image>Output:"])
