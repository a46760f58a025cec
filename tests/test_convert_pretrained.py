"""The project's exported folder (config.json + model.safetensors + tokenizer.json): round trip and errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flamingo_fast.convert import CheckpointKeyError, load_pretrained, save_pretrained
from flamingo_fast.data.shapes import shapes_tokenizer
from flamingo_fast.models import Flamingo, FlamingoConfig

TOKENIZER = shapes_tokenizer()


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = FlamingoConfig.from_preset(
        "demo", vocab_size=TOKENIZER.vocab_size, pad_token_id=TOKENIZER.pad_id,
        vision={"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
        resampler={"dim": 32, "depth": 1, "heads": 2, "head_dim": 16, "n_latents": 4},
        xattn={"heads": 2, "head_dim": 16}, lm={"dim": 32, "layers": 2, "heads": 2, "kv_heads": 1, "ffn_dim": 64})
    model = Flamingo(cfg).to(dtype).eval()
    with torch.no_grad():
        for layer in model.xattn_layers.values():
            layer.attn_gate.fill_(0.7)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(tmp_path, dtype):
    model = tiny_model(dtype)
    save_pretrained(model, TOKENIZER, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["lm"]["dim"] == 32
    loaded, tokenizer = load_pretrained(tmp_path)
    assert tokenizer.vocab_size == TOKENIZER.vocab_size and tokenizer.encode("a red star") == TOKENIZER.encode("a red star")
    assert loaded.cfg == model.cfg
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    # Freezing survives: the LM base weights stay frozen, the resampler trains.
    assert not loaded.lm.embed_tokens.weight.requires_grad and loaded.resampler.latents.requires_grad
    ids = torch.tensor([[TOKENIZER.bos_id, TOKENIZER.image_token_id] + TOKENIZER.encode("output : a red")])
    images = torch.randn(1, 1, 1, 3, 16, 16).to(dtype)
    with torch.no_grad():
        assert torch.equal(loaded(ids, images).logits, model(ids, images).logits)


def test_errors(tmp_path):
    model = tiny_model()
    save_pretrained(model, TOKENIZER, tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["resampler.latents"]
    save_file(tensors, file)
    with pytest.raises(CheckpointKeyError, match="resampler.latents"):
        load_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["lm"]["vocab_size"] += 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the model config"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "nope")
