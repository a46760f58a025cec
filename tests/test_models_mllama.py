"""The Llama 3.2 Vision (Mllama) configuration of the model family: config checks, the layer switches, the
trainable sets, dict round trip, and torch.compile(fullgraph=True). Parity with transformers:
tests/test_convert_mllama.py."""

import pytest
import torch

from flamingo_fast import Flamingo, FlamingoConfig
from flamingo_fast.models.config import mllama_xattn

LM = {"vocab_size": 40, "dim": 32, "layers": 3, "heads": 4, "kv_heads": 2, "ffn_dim": 48}


def tiny_mllama(**overrides) -> FlamingoConfig:
    from flamingo_fast.models.config import LMConfig

    lm = LMConfig(**LM, rope_llama3=(8.0, 1.0, 4.0, 16), special_logits=False)
    return FlamingoConfig.from_preset(
        "mllama-11b", lm=lm, xattn=mllama_xattn(lm, (0, 2)), pad_token_id=0,
        vision={"image_size": 14, "patch_size": 7, "width": 16, "layers": 3, "global_layers": 1, "heads": 2,
                "mlp_dim": 32, "max_tiles": 2, "intermediate_layers": (1,), "aspect_ratios": ((1, 1), (1, 2), (2, 1))},
    ).replace(**overrides)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (2, 9), generator=g)
    ids[0, 2] = ids[0, 3] = ids[0, 7] = 40  # text first, a group of two images, a later image
    ids[1, 0] = 40
    images = torch.randn(2, 3, 2, 3, 14, 14, generator=g)
    aspect = torch.tensor([[2, 1, 3], [1, 0, 0]])  # 2, 1, 2 tiles; row 1: one image and two padding slots
    images[0, 1, 1] = 0
    images[1, 1:] = 0
    return ids, images, aspect


def _model(seed=0) -> Flamingo:
    torch.manual_seed(seed)
    model = Flamingo(tiny_mllama()).eval()
    with torch.no_grad():
        for layer in model.xattn_layers.values():
            layer.attn_gate.fill_(0.7)
            layer.ffw_gate.fill_(-0.5)
    return model


def test_tiny_config_shapes():
    cfg = tiny_mllama()
    assert cfg.vision.tokens_per_tile == 5 and cfg.keys_per_media == 10 and cfg.vision.output_dim == 32
    model = Flamingo(cfg)
    assert model.resampler is None and model.connector is model.projector
    assert model.projector.in_features == 32 and model.projector.out_features == 32
    assert model.lm.special_head is None and model.lm.output_size == 40
    layer = model.xattn_layers["0"]
    assert layer.attn.q_norm is not None and layer.ffw.fc1.out_features == 2 * 48  # [gate; up] stacked
    assert model.parameter_counts()["projector"] == 32 * 32 + 32
    assert [len(u) for u in model.shard_units()] == [1] * 4 + [1] + [2, 1, 2]  # vision, projector, LM (+xattn)


@pytest.mark.parametrize("overrides, match", [
    ({"vision": {"kind": "vit"}}, "vision.kind must be"),
    ({"vision": {"aspect_ratios": ((1, 3),)}}, "at most max_tiles"),
    ({"connector": "resampler"}, "go together"),
    ({"xattn": {"media_span": "index"}}, "go together"),
    ({"xattn": {"layer_ids": (1, 5)}}, "layer_ids must be LM block indices"),
    ({"xattn": {"layer_ids": (2, 1)}}, "increasing"),
    ({"xattn": {"media_span": "all"}}, "media_span must be"),
    ({"xattn": {"norm": "batchnorm"}}, "xattn.norm must be"),
    ({"lm": {"rope_llama3": (8.0, 4.0, 1.0, 16)}}, "high > low"),
    ({"vision": {"intermediate_layers": (3,)}}, "local layer indices"),
])
def test_bad_family_fields(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_mllama(**overrides)


def test_config_dict_round_trip():
    cfg = tiny_mllama()
    again = FlamingoConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.xattn.layer_ids == (0, 2) and again.vision.aspect_ratios == ((1, 1), (1, 2), (2, 1))


def test_trainable_sets():
    model = Flamingo(tiny_mllama())
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projector", "xattn_layers", "lm"}
    assert {n for n, p in model.lm.named_parameters() if p.requires_grad} == {"special_embed.weight"}
    model.set_trainable("lm")
    assert all(p.requires_grad == n.startswith("lm.") for n, p in model.named_parameters())


def test_tokens_without_an_image_are_the_text_model_and_padding_images_do_not_matter():
    model = _model()
    ids, images, aspect = _inputs()
    with torch.no_grad():
        out = model(ids, images, aspect_ratio_ids=aspect).logits
        text_only = model(ids[:1, :2]).logits  # row 0 before its first image
        other = images.clone()
        other[0, 1, 1] = 5.0  # the padding tile of image 1 and the padding images: not attended ...
        other[1, 1:] = 3.0
        again = model(ids, other, aspect_ratio_ids=aspect).logits
    torch.testing.assert_close(out[0, :2], text_only[0], atol=1e-6, rtol=0)
    # ... but real tiles' tokens attend to padding tiles' tokens inside the vision encoder (Meta's mask), so only
    # rows whose images have no padding tile are unchanged: row 1 (one 1-tile image, padding slots only).
    torch.testing.assert_close(out[1], again[1], atol=1e-6, rtol=0)
    assert (out[0, 3:] - again[0, 3:]).abs().max() > 1e-4


def test_zero_ffw_without_media_switch():
    model = _model()
    ids, images, aspect = _inputs()
    layer = model.xattn_layers["0"]
    x = torch.randn(2, 9, 32)
    media, _ = model.media_for_tokens(ids, None, model.key_count(aspect))
    latents = model.encode_images(images, aspect)
    with torch.no_grad():
        y = layer(x, media, latents=latents)
        layer.zero_ffw_without_media = False
        y_flamingo = layer(x, media, latents=latents)
    torch.testing.assert_close(y[0, :2], x[0, :2])  # no image yet: attention 0 and FFW zeroed
    assert (y_flamingo[0, :2] - x[0, :2]).abs().max() > 1e-4  # Flamingo's FFW acts on every token


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _model().train()
    model.set_trainable("all")
    ids, images, aspect = _inputs()
    labels = ids.clone()

    def run(fn):
        model.zero_grad(set_to_none=True)
        out = fn(ids, images, labels=labels, aspect_ratio_ids=aspect)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = run(model)
    loss, grads = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys() and any(n.endswith("attn_gate") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bad_inputs_name_the_argument():
    model = _model()
    ids, images, aspect = _inputs()
    with pytest.raises(ValueError, match="aspect_ratio_ids"):
        model(ids, images)
    with pytest.raises(ValueError, match=r"aspect_ratio_ids must be \(B, T_img\)"):
        model(ids, images, aspect_ratio_ids=aspect[:, :2])
    with pytest.raises(ValueError, match=r"aspect_ratio_ids must lie in \[0, 3\]"):
        model(ids, images, aspect_ratio_ids=aspect + 3)
    with pytest.raises(ValueError, match=r"end in \(max_tiles, C, H, W\)"):
        model(ids, images[:, :, :1], aspect_ratio_ids=aspect)
    with pytest.raises(ValueError, match="packing Mllama rows is not supported"):
        model(ids, images[0], aspect_ratio_ids=aspect, document_ids=torch.zeros_like(ids), media_index=ids * 0)
    bad = ids.clone()
    bad[0, 8] = 40  # row 0: 4 image tokens, 3 image slots
    with pytest.raises(ValueError, match="a row has 4 <image> tokens"):
        model(bad, images, aspect_ratio_ids=aspect)


def test_flamingo_config_cannot_take_mllama_spans():
    with pytest.raises(ValueError, match="go together"):
        FlamingoConfig.from_preset("demo", xattn={"media_span": "groups"})


def test_image_token_on_a_padding_slot_is_refused():
    model = _model()
    ids, images, aspect = _inputs()
    bad = ids.clone()
    bad[1, 4] = 40  # row 1's second <image>: slot 1 is a padding image (aspect ratio id 0)
    with pytest.raises(ValueError, match="row 1's <image> token number 2 stands for image slot 1, a padding image"):
        model(bad, images, aspect_ratio_ids=aspect)


def test_generate_checks_like_forward():
    from flamingo_fast.models.generate import generate

    model = _model()
    ids, images, aspect = _inputs()
    with pytest.raises(ValueError, match="aspect_ratio_ids"):
        generate(model, ids, images, eos_token_ids=[2])
    with pytest.raises(ValueError, match="aspect_ratio_ids"):
        generate(model, ids[:, :2], aspect_ratio_ids=aspect, eos_token_ids=[2])
    with pytest.raises(ValueError, match="default stop token <\\|endofchunk\\|> .* has no logit"):
        generate(model, ids, images, aspect_ratio_ids=aspect)
    out = generate(model, ids, images, aspect_ratio_ids=aspect, eos_token_ids=[2], max_new_tokens=3)
    assert all(len(t) <= 3 for t in out.tokens)


def test_selective_checkpointing_keeps_span_attention():
    """Selective activation checkpointing saves the span attention's output instead of recomputing it."""
    from torch.utils.checkpoint import CheckpointPolicy

    from train.parallel import _save_matmuls_policy

    policy = _save_matmuls_policy()
    assert policy(None, torch.ops.flamingo_fast.media_span_attention_fwd.default) == CheckpointPolicy.MUST_SAVE
