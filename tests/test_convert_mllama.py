"""Llama 3.2 Vision (Mllama): tiny random transformers models saved as safetensors, imported, compared.

transformers 5.24 differs from Meta's reference implementation (which the released weights were trained with) in
two places, and the parity tests run it with both put back to the reference (`_reference`):
* tokens that see no image (text before the first `<|image|>`, left padding) attend to every vision key and add
  that to the residual (huggingface/transformers#39379: `full_text_row_masked_out_mask` is applied to the MLP
  only); the reference zeroes those rows' attention output, and so does this project;
* the vision encoder's "intermediate layer i" features are layer i's output in 5.24 but its input in the
  reference and in transformers 4.x (the #39643 regression, fixed by #40083 in 4.56, back in 5.x).
A separate test puts back only the second and checks rows that start with an image, where the first never acts.
"""

import json

import pytest
import torch

import transformers  # dev extra; deliberately not importorskip: these parity tests must run in CI
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.mllama import modeling_mllama
from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                          get_cross_attention_token_mask)

from flamingo_fast.convert import CheckpointKeyError, from_hf_mllama, mllama_config
from flamingo_fast.models import Flamingo, FlamingoConfig
from flamingo_fast.models.generate import generate

VOCAB, IMAGE = 90, 90
TILES, SIZE = 4, 28  # 4 tiles of 28 px, 7 px patches: 16 patches + 1 class token = 17 tokens per tile
RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
TILES_OF = [0] + [r * c for r, c in RATIOS]  # per aspect ratio id


def _hf_config():
    vision = dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=48,
                  image_size=SIZE, patch_size=7, max_num_tiles=TILES, intermediate_layers_indices=[2, 0],
                  vision_output_dim=96, supported_aspect_ratios=RATIOS)
    text = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, cross_attention_layers=[1, 4], pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    return transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)


@pytest.fixture(scope="module")
def mllama_folder(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.MllamaForConditionalGeneration(_hf_config()).eval()
    with torch.no_grad():  # transformers initialises every gate at 0 (and so hides the gated paths): randomise
        for name, p in hf.named_parameters():
            if "gate" in name and "proj" not in name:
                p.uniform_(-1.5, 1.5)
        for p in hf.parameters():  # no padding_idx zero row, no zero biases
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("mllama")
    hf.save_pretrained(folder, max_shard_size="200KB")
    return hf, folder


@pytest.fixture(scope="module")
def ours(mllama_folder):
    return from_hf_mllama(mllama_folder[1]).eval()


def _reference_vision(monkeypatch):
    """transformers' vision encoder recording each layer's input (hidden_states[i] = input of layer i), as Meta's
    reference and transformers 4.x, so that `intermediate_layers_indices` pick the same features."""
    def forward(self, hidden_states, attention_mask=None):
        states = ()
        for layer in self.layers:
            states += (hidden_states,)
            hidden_states = layer(hidden_states=hidden_states, attention_mask=attention_mask)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=states + (hidden_states,))

    monkeypatch.setattr(modeling_mllama.MllamaVisionEncoder, "forward", forward)


def _reference(monkeypatch):
    """Both fixes (module docstring)."""
    _reference_vision(monkeypatch)
    _reference_rows(monkeypatch)


def _reference_rows(monkeypatch):
    """transformers' cross-attention decoder layer with #39379 fixed: the row mask also scales the attention."""
    def forward(self, hidden_states, cross_attention_states, cross_attention_mask, attention_mask,
                full_text_row_masked_out_mask, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        h, _ = self.cross_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=cross_attention_mask,
                               cross_attention_states=cross_attention_states, cache=cache, **kwargs)
        if full_text_row_masked_out_mask is not None:
            h = full_text_row_masked_out_mask[:, 0] * h
        hidden_states = residual + self.cross_attn_attn_gate.tanh() * h
        residual = hidden_states
        h = self.mlp(self.post_attention_layernorm(hidden_states))
        if full_text_row_masked_out_mask is not None:
            h = full_text_row_masked_out_mask[:, 0] * h
        return residual + self.cross_attn_mlp_gate.tanh() * h

    monkeypatch.setattr(modeling_mllama.MllamaCrossAttentionDecoderLayer, "forward", forward)


def _batch(rows, aspect_ids, seed=0):
    """Right-aligned rows (left padding with 0), their images (real tiles random, padding tiles 0) and the
    processor's cross-attention mask. aspect_ids: per row, the aspect ratio id of each image."""
    g = torch.Generator().manual_seed(seed)
    length, images = max(map(len, rows)), max(map(len, aspect_ids))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, length - len(row):] = torch.tensor(row)
        attention[r, length - len(row):] = 1
    pixels = torch.zeros(len(rows), images, TILES, 3, SIZE, SIZE)
    ar = torch.zeros(len(rows), images, dtype=torch.long)
    ar_mask = torch.zeros(len(rows), images, TILES, dtype=torch.long)
    for r, per_image in enumerate(aspect_ids):
        for j, a in enumerate(per_image):
            ar[r, j] = a
            ar_mask[r, j, :TILES_OF[a]] = 1
            pixels[r, j, :TILES_OF[a]] = torch.randn(TILES_OF[a], 3, SIZE, SIZE, generator=g)
    spans = [get_cross_attention_token_mask(row.tolist(), IMAGE) for row in ids]
    tiles = [[TILES_OF[a] for a in per_image] for per_image in aspect_ids]
    xmask = torch.from_numpy(convert_sparse_cross_attention_mask_to_dense(spans, tiles, TILES, length))
    return dict(input_ids=ids, attention_mask=attention, pixel_values=pixels, aspect_ratio_ids=ar,
                aspect_ratio_mask=ar_mask, cross_attention_mask=xmask)


def _text(n, seed):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# Text before the first image, a group of 2 consecutive images, a later image; padding tiles; left padding.
ROWS = [[1, *_text(3, 1), IMAGE, IMAGE, *_text(5, 2), IMAGE, *_text(4, 3)],
        [1, IMAGE, *_text(6, 4), IMAGE, *_text(2, 5)]]
ASPECT = [[6, 2, 1], [5, 3]]  # 4, 2, 1 tiles; 2, 3 tiles (row 1 has a padding image slot)


def _hf_positions(attention_mask):
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def test_config_read(mllama_folder):
    cfg = mllama_config(mllama_folder[1])
    assert cfg.xattn_layer_ids == [1, 3]  # decoder layers 1 and 4 run before LM blocks 1 and 3
    assert (cfg.lm.layers, cfg.lm.dim, cfg.lm.n_kv_heads, cfg.lm.rope_llama3) == (4, 48, 2, (8.0, 1.0, 4.0, 16))
    assert cfg.vision.output_dim == 96 and cfg.keys_per_media == TILES * 17 and cfg.image_token_id == IMAGE


def test_logits_match_transformers(mllama_folder, ours, monkeypatch):
    hf, _ = mllama_folder
    _reference(monkeypatch)
    batch = _batch(ROWS, ASPECT)
    with torch.no_grad():
        expected = hf(**batch, position_ids=_hf_positions(batch["attention_mask"])).logits
        got = ours(batch["input_ids"], batch["pixel_values"], aspect_ratio_ids=batch["aspect_ratio_ids"],
                   key_padding_mask=batch["attention_mask"] == 0).logits
    real = batch["attention_mask"].bool()
    assert got.shape == expected.shape  # (B, S, V): the image token is input-only
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)
    # Row 0's text before its first image is what the text model alone gives (no leak from the images).
    with torch.no_grad():
        alone = ours(batch["input_ids"][:1, :4]).logits
    torch.testing.assert_close(alone[0], got[0, :4], atol=1e-5, rtol=0)


def test_transformers_cross_attention_agrees_when_rows_start_with_an_image(mllama_folder, ours, monkeypatch):
    hf, _ = mllama_folder
    _reference_vision(monkeypatch)  # transformers' own cross-attention layers: #39379 never acts on these rows
    rows = [[IMAGE, *_text(6, 6), IMAGE, IMAGE, *_text(3, 7)], [IMAGE, *_text(11, 8)]]  # equal lengths
    batch = _batch(rows, [[4, 8, 2], [7]], seed=1)
    batch.pop("attention_mask")
    with torch.no_grad():
        expected = hf(**batch).logits
        got = ours(batch["input_ids"], batch["pixel_values"], aspect_ratio_ids=batch["aspect_ratio_ids"]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers_with_media_kv_cached_once(mllama_folder, ours, monkeypatch):
    hf, _ = mllama_folder
    _reference(monkeypatch)
    batch = _batch(ROWS, ASPECT, seed=2)
    with torch.no_grad():
        expected = hf.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    kv_calls = []
    hooks = [layer.attn.to_kv.register_forward_hook(lambda *_: kv_calls.append(1))
             for layer in ours.xattn_layers.values()]
    try:
        out = generate(ours, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                       aspect_ratio_ids=batch["aspect_ratio_ids"], max_new_tokens=8, eos_token_ids=[])
    finally:
        for h in hooks:
            h.remove()
    assert out.tokens == expected[:, batch["input_ids"].shape[1]:].tolist()
    assert len(kv_calls) == len(ours.xattn_layers)  # each layer's media K/V: once, not once per step


def test_cached_forward_continues_image_groups(ours):
    """Token-by-token forward with a cache equals one full forward (the group state carries across calls)."""
    batch = _batch([ROWS[0]], [ASPECT[0]], seed=3)
    ids, pixels, ar = batch["input_ids"], batch["pixel_values"], batch["aspect_ratio_ids"]
    with torch.no_grad():
        full = ours(ids, pixels, aspect_ratio_ids=ar).logits
        cache = ours.new_cache(1, ids.shape[1])
        steps = [ours(ids[:, :3], pixels, aspect_ratio_ids=ar, cache=cache).logits]
        steps += [ours(ids[:, t:t + 1], cache=cache).logits for t in range(3, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_missing_and_unexpected_keys(mllama_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = mllama_folder
    tensors = {}
    for f in folder.glob("*.safetensors"):
        tensors.update(load_file(f))
    name = next(n for n in tensors if "cross_attn.k_proj" in n)
    tensors["model.language_model.layers.1.extra.weight"] = tensors.pop(name)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointKeyError) as info:
        from_hf_mllama(tmp_path)
    assert info.value.unexpected == ["model.language_model.layers.1.extra.weight"]
    assert info.value.missing == []  # the stacked to_kv is still half-covered by v_proj: reported below
    tensors.pop("model.language_model.layers.1.extra.weight")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointKeyError, match="never given values"):
        from_hf_mllama(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llava"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not 'mllama'"):
        mllama_config(tmp_path)


def test_presets_match_transformers_parameter_counts():
    """mllama-11b / -90b on the meta device against transformers' own model built from the same config."""
    for preset, text in (("mllama-11b", {}), ("mllama-90b", dict(hidden_size=8192, num_hidden_layers=100,
                                                                    num_attention_heads=64, intermediate_size=28672,
                                                                    cross_attention_layers=list(range(3, 100, 5))))):
        cfg = FlamingoConfig.from_preset(preset)
        with torch.device("meta"):
            model = Flamingo(cfg)
            hf = transformers.MllamaForConditionalGeneration(
                transformers.MllamaConfig(vision_config=dict(image_size=560), text_config=text))
        counts = model.parameter_counts()
        hf_total = sum(p.numel() for p in hf.parameters())
        # transformers' embedding has 8 reserved rows after the text vocabulary; this model keeps the 2 it uses
        assert counts["total"] == hf_total - 6 * cfg.lm.dim
        assert counts["total"] == {"mllama-11b": 10_670_196_259, "mllama-90b": 88_593_306_171}[preset]
