"""HF Llama / CLIP import: tiny random HF models saved as safetensors, imported, compared output for output."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import transformers  # dev extra; deliberately not importorskip: these parity tests must run in CI

from flamingo_fast.convert import (
    CheckpointKeyError,
    clip_vision_config,
    from_hf_clip_vision,
    from_hf_llama,
    llama_config,
)
from flamingo_fast.models import Flamingo, FlamingoConfig

VOCAB = 61


def _hf_llama(tie=False, **extra):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   max_position_embeddings=128, tie_word_embeddings=tie, **extra)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500.0}
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    model = _hf_llama()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder, max_shard_size="20KB")  # several shards + model.safetensors.index.json
    return model, folder


def test_llama_config_read(llama_folder):
    _, folder = llama_folder
    assert (folder / "model.safetensors.index.json").is_file()
    cfg = llama_config(folder)
    assert (cfg.vocab_size, cfg.dim, cfg.layers, cfg.heads, cfg.n_kv_heads, cfg.ffn_dim) == (VOCAB, 32, 2, 4, 2, 48)
    assert cfg.rope_theta == 500.0 and cfg.norm_eps == 1e-5


def test_llama_logits_match_hf(llama_folder):
    hf, folder = llama_folder
    lm = from_hf_llama(folder)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = lm(ids)
    assert got.shape == (2, 11, VOCAB + 2)
    torch.testing.assert_close(got[..., :VOCAB], expected, atol=1e-4, rtol=0)
    # Fresh special rows are the mean of the base rows.
    torch.testing.assert_close(lm.special_embed.weight[0], hf.model.embed_tokens.weight.mean(0))
    torch.testing.assert_close(lm.special_head.weight[1], hf.lm_head.weight.mean(0))


def test_llama_into_flamingo_reproduces_hf(llama_folder):
    # A Flamingo whose LM comes from the HF folder: with the gates at 0 and no images it is the HF LM.
    hf, folder = llama_folder
    cfg = FlamingoConfig.from_preset("demo", lm=dict(vars(llama_config(folder))))
    model = Flamingo(cfg).eval()
    special_before = model.lm.special_embed.weight.clone()
    from_hf_llama(folder, into=model.lm)
    torch.testing.assert_close(model.lm.special_embed.weight, special_before)  # existing rows kept
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., :VOCAB], hf(ids).logits, atol=1e-4, rtol=0)


def test_llama_dtype_preserved_and_tied(tmp_path):
    hf = _hf_llama(tie=True).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    lm = from_hf_llama(tmp_path)
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(lm.lm_head.weight, hf.model.embed_tokens.weight, atol=0, rtol=0)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids.long())[..., :VOCAB].float(), hf(ids).logits.float(), atol=3e-2, rtol=0)


def test_llama_missing_and_unexpected_keys(tmp_path):
    hf = _hf_llama()
    hf.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(3)
    save_file(tensors, file)
    with pytest.raises(CheckpointKeyError) as info:
        from_hf_llama(tmp_path)
    assert info.value.missing == ["model.layers.1.mlp.up_proj.weight"]
    assert info.value.unexpected == ["model.layers.1.mlp.extra.weight"]
    assert "missing keys (1)" in str(info.value) and "unexpected keys (1)" in str(info.value)


def test_llama_shape_mismatch_and_unsupported_config(tmp_path, llama_folder):
    _, folder = llama_folder
    other = FlamingoConfig.from_preset("demo")
    with pytest.raises(ValueError, match="does not match config.json"):
        from_hf_llama(folder, into=Flamingo(other).lm)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'llama3' RoPE scaling needs 'low_freq_factor'"):
        llama_config(tmp_path)
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported"):
        llama_config(tmp_path)
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a Llama-family"):
        llama_config(tmp_path)


def test_llama3_rope_scaling_matches_hf(tmp_path):
    """Llama 3.1's "llama3" RoPE frequencies (Llama 3.2 Vision's text model uses them)."""
    model = _hf_llama()
    model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}
    hf = transformers.LlamaForCausalLM(model.config).eval()
    hf.load_state_dict(model.state_dict())
    hf.save_pretrained(tmp_path)
    lm = from_hf_llama(tmp_path)
    assert lm.cfg.rope_llama3 == (8.0, 1.0, 4.0, 16)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))  # past 16 positions
    with torch.no_grad():
        torch.testing.assert_close(lm(ids)[..., :VOCAB], hf(ids).logits, atol=1e-4, rtol=0)


# -- CLIP -------------------------------------------------------------------------------------------------------
def _clip_vision_cfg(**extra):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, **extra)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_vision_features_match_hf(tmp_path, act):
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**_clip_vision_cfg(hidden_act=act))).eval()
    hf.save_pretrained(tmp_path)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = hf(pixel_values=images)
        # HF's last_hidden_state: class token + patches, no post_layernorm.
        full = from_hf_clip_vision(tmp_path, output_class_token=True, output_norm=False)
        torch.testing.assert_close(full(images), out.last_hidden_state, atol=1e-4, rtol=0)
        # The default features: patch tokens after post_layernorm (pooler_output = the same on the class token).
        default = from_hf_clip_vision(tmp_path)
        assert default.cfg.activation == act and default.cfg.num_features == 16
        tower = getattr(hf, "vision_model", hf)  # transformers 5 flattened CLIPVisionModel
        expected = tower.post_layernorm(out.last_hidden_state[:, 1:])
        torch.testing.assert_close(default(images), expected, atol=1e-4, rtol=0)


def test_clip_full_model_folder_skips_text_tower(tmp_path):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, max_position_embeddings=16),
        vision_config=_clip_vision_cfg(), projection_dim=8)
    hf = transformers.CLIPModel(config).eval()
    hf.save_pretrained(tmp_path)
    assert clip_vision_config(tmp_path).width == 32
    vision = from_hf_clip_vision(tmp_path, output_class_token=True, output_norm=False)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf.vision_model(pixel_values=images).last_hidden_state
        torch.testing.assert_close(vision(images), expected, atol=1e-4, rtol=0)
    # Into a Flamingo's encoder (shapes checked per tensor).
    cfg = FlamingoConfig.from_preset("demo", vision=dict(vars(clip_vision_config(tmp_path))))
    model = Flamingo(cfg)
    from_hf_clip_vision(tmp_path, into=model.vision)
    torch.testing.assert_close(model.vision.encoder.layers[1].mlp.fc2.weight,
                               hf.vision_model.encoder.layers[1].mlp.fc2.weight)


def test_clip_shape_mismatch(tmp_path):
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**_clip_vision_cfg()))
    hf.save_pretrained(tmp_path)
    model = Flamingo(FlamingoConfig.from_preset("demo"))  # width 128, not 32
    with pytest.raises(ValueError, match="width: model 128 vs checkpoint 32"):
        from_hf_clip_vision(tmp_path, into=model.vision)
