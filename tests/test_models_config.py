"""Presets: parameter counts against the Flamingo paper, meta-device construction, overrides, token ids."""


import pytest
import torch

from flamingo_fast import Flamingo, FlamingoConfig


def build_on_meta(name: str, **overrides) -> Flamingo:
    with torch.device("meta"):
        return Flamingo(FlamingoConfig.from_preset(name, **overrides))


def within(value: int, target: float, rel: float) -> bool:
    return abs(value - target) <= rel * target


def test_xl_builds_on_meta_with_paper_counts():
    model = build_on_meta("xl")  # (no weight is materialised; how long it takes belongs in the bench, not here)
    assert all(p.is_meta for p in model.parameters())
    counts = model.parameter_counts()
    assert within(counts["total"], 80e9, 0.03), counts
    assert within(counts["lm"], 70e9, 0.05), counts
    assert within(counts["xattn"], 10e9, 0.10), counts
    assert within(counts["resampler"], 194e6, 0.15), counts
    assert len(model.xattn_layers) == 12
    assert [int(k) for k in model.xattn_layers] == list(range(0, 80, 7))
    # default policy trains resampler + xattn + the 2 special rows of the embedding and of the head
    assert counts["trainable"] == counts["resampler"] + counts["xattn"] + 2 * 2 * 8192
    assert counts["total"] == counts["lm"] + counts["vision"] + counts["resampler"] + counts["xattn"]


def test_xl_lm_is_llama2_70b_shaped():
    cfg = FlamingoConfig.from_preset("xl")
    assert (cfg.lm.layers, cfg.lm.dim, cfg.lm.heads, cfg.lm.n_kv_heads, cfg.lm.ffn_dim) == (80, 8192, 64, 8, 28672)
    assert cfg.vocab_size == 32002
    model = build_on_meta("xl")
    k_proj = model.lm.layers[0].self_attn.k_proj.weight
    assert tuple(k_proj.shape) == (8 * 128, 8192)
    assert tuple(model.xattn_layers["0"].attn.to_kv.weight.shape) == (2 * 128 * 128, 1536)
    assert tuple(model.xattn_layers["0"].ffw.fc1.weight.shape) == (4 * 8192, 8192)


@pytest.mark.parametrize("name,total,n_xattn", [("3b", 3.2e9, 24), ("9b", 9.3e9, 10)])
def test_3b_9b_totals(name, total, n_xattn):
    model = build_on_meta(name)
    counts = model.parameter_counts()
    assert within(counts["total"], total, 0.10), counts
    assert within(counts["resampler"], 194e6, 0.15), counts
    assert len(model.xattn_layers) == n_xattn


def test_demo_is_small_and_every_layer_has_xattn():
    model = build_on_meta("demo")
    counts = model.parameter_counts()
    assert counts["total"] < 20e6
    assert len(model.xattn_layers) == model.cfg.lm.layers


def test_token_ids_and_vocab_override_round_trip():
    cfg = FlamingoConfig.from_preset("demo", vocab_size=100)
    assert cfg.lm.vocab_size == 98
    assert (cfg.vocab_size, cfg.image_token_id, cfg.eoc_token_id) == (100, 98, 99)
    again = FlamingoConfig.from_preset("demo", vocab_size=cfg.vocab_size)
    assert again == cfg
    assert FlamingoConfig.from_preset("xl").image_token_id == 32000
    assert FlamingoConfig.from_preset("xl").vision.image_size == 224


def test_nested_overrides_and_dict_round_trip():
    cfg = FlamingoConfig.from_preset("demo", lm={"layers": 2}, vision={"image_size": 64}, xattn={"every": 2})
    assert cfg.lm.layers == 2 and cfg.lm.dim == FlamingoConfig.from_preset("demo").lm.dim
    assert cfg.vision.image_size == 64
    assert cfg.xattn_layer_ids == [0]
    assert FlamingoConfig.from_dict(cfg.to_dict()) == cfg
    # presets are independent copies
    assert FlamingoConfig.from_preset("demo").lm.layers == 4


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"bogus": 1}, "bogus"),
        ({"lm": {"nope": 1}}, "nope"),
        ({"vocab_size": 2}, "vocab_size"),
        ({"lm": {"heads": 3}}, "heads"),
        ({"vision": {"image_size": 30}}, "patch_size"),
        ({"xattn": {"every": 0}}, "every"),
        # Zero, negative and wrong-typed sizes: each names its field (some used to build a model silently).
        ({"lm": {"dim": 0}}, r"lm\.dim must be an int >= 1, got 0"),
        ({"lm": {"layers": -1}}, r"lm\.layers must be an int >= 1, got -1"),
        ({"lm": {"ffn_dim": 2.5}}, r"lm\.ffn_dim must be an int >= 1, got 2\.5"),
        ({"lm": {"kv_heads": 0}}, r"lm\.kv_heads must be an int >= 1"),
        ({"lm": {"norm_eps": 0.0}}, r"lm\.norm_eps must be a finite number > 0"),
        ({"lm": {"rope_theta": float("nan")}}, r"lm\.rope_theta must be a finite number > 0"),
        ({"lm": {"max_seq_len": True}}, r"lm\.max_seq_len must be an int >= 1, got True"),
        ({"vision": {"width": "64"}}, r"vision\.width must be an int >= 1, got '64'"),
        ({"vision": {"image_size": 0}}, r"vision\.image_size must be an int >= 1"),
        ({"vision": {"layers": 0}}, r"vision\.layers must be an int >= 1"),
        ({"xattn": {"heads": 0}}, r"xattn\.heads must be an int >= 1"),
        ({"xattn": {"first_layer": -1}}, r"xattn\.first_layer must be an int >= 0"),
        ({"resampler": {"n_latents": 0}}, r"resampler\.n_latents must be an int >= 1"),
        ({"resampler": {"layer_norm_eps": -1e-5}}, r"resampler\.layer_norm_eps must be a finite number > 0"),
    ],
)
def test_bad_overrides(overrides, match):
    with pytest.raises(ValueError, match=match):
        FlamingoConfig.from_preset("demo", **overrides)


def test_zero_first_layer_and_optional_kv_heads_stay_valid():
    cfg = FlamingoConfig.from_preset("demo", xattn={"first_layer": 0, "kv_heads": None}, lm={"kv_heads": None})
    assert cfg.xattn_layer_ids[0] == 0 and cfg.lm.n_kv_heads == cfg.lm.heads


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        FlamingoConfig.from_preset("huge")
