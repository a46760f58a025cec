"""The assembled Flamingo model on CPU: gating, media routing, loss convention, freezing, cache, bad input."""

import pytest
import torch
import torch.nn.functional as F

from flamingo_fast import Flamingo, FlamingoConfig

TINY = dict(
    vision={"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
    resampler={"dim": 32, "depth": 1, "heads": 2, "head_dim": 16, "n_latents": 4, "max_frames": 3},
    xattn={"heads": 4, "head_dim": 8, "kv_heads": 2},
    lm={"vocab_size": 30, "dim": 32, "layers": 3, "heads": 4, "kv_heads": 2, "ffn_dim": 64},
    pad_token_id=0,
)
IMG = 30  # <image> id = base vocab
EOC = 31


def make_model(seed=0, gates=None, **overrides) -> Flamingo:
    torch.manual_seed(seed)
    model = Flamingo(FlamingoConfig.from_preset("demo", **TINY).replace(**overrides)).eval()
    if gates is not None:
        with torch.no_grad():
            for layer in model.xattn_layers.values():
                layer.attn_gate.fill_(gates)
                layer.ffw_gate.fill_(-gates)
    return model


def tokens(rows: list[str], seed=0) -> torch.Tensor:
    """'t' random text token (1..29), 'i' <image>, 'e' <|endofchunk|>."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30, (len(rows), len(rows[0])), generator=g)
    for r, row in enumerate(rows):
        for c, ch in enumerate(row):
            if ch == "i":
                ids[r, c] = IMG
            elif ch == "e":
                ids[r, c] = EOC
    return ids


def images(b, t, f=1, seed=1) -> torch.Tensor:
    return torch.randn(b, t, f, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# consecutive images / image at the last position / no image / image first and text between
MIXED = ["ttiittte", "ttttttti", "tttttttt", "ittitttt"]


def test_zero_gates_reproduce_the_bare_lm_exactly():
    model = make_model()
    ids = tokens(MIXED)
    with torch.no_grad():
        out = model(ids, images(4, 2))
        bare = model.lm(ids)
    assert torch.equal(out.logits, bare)
    assert out.loss is None


def test_tokens_before_first_image_ignore_the_images():
    model = make_model(gates=0.8)
    ids = tokens(["tttitti", "ttittte"])
    with torch.no_grad():
        a = model(ids, images(2, 2, seed=1)).logits
        b = model(ids, images(2, 2, seed=2)).logits
    assert torch.equal(a[0, :3], b[0, :3]) and torch.equal(a[1, :2], b[1, :2])
    assert not torch.allclose(a[0, 3:], b[0, 3:]) and not torch.allclose(a[1, 2:], b[1, 2:])


def test_mixed_batch_rows_match_running_alone_and_backward_is_finite():
    model = make_model(gates=0.8).train()
    ids, imgs = tokens(MIXED), images(4, 2)
    out = model(ids, imgs, labels=ids)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    for r in range(4):
        with torch.no_grad():
            alone = model(ids[r : r + 1], imgs[r : r + 1]).logits
        torch.testing.assert_close(out.logits[r : r + 1], alone, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["xattn_layers.0.attn_gate"].abs().item() > 0
    assert grads["resampler.latents"].abs().sum() > 0


def test_batch_without_any_image_and_images_none():
    model = make_model(gates=0.8)
    ids = tokens(["tttttt", "ttttte"])
    with torch.no_grad():
        with_imgs = model(ids, images(2, 1)).logits
        without = model(ids).logits
    assert torch.equal(with_imgs, without)  # media_index is -1 everywhere: xattn contributes exactly 0


def test_bfloat16_model_takes_float32_images():
    model = make_model(gates=0.8).to(torch.bfloat16).train()
    ids = tokens(MIXED)
    out = model(ids, images(4, 2), labels=ids)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(model.xattn_layers["0"].attn.to_kv.weight.grad).all()


def test_video_frames_and_precomputed_latents():
    model = make_model(gates=0.8)
    ids = tokens(["tittitt", "ittttit"])
    video = images(2, 2, f=3)
    with torch.no_grad():
        latents = model.encode_images(video)
        assert latents.shape == (2, 2, 4, 32)
        a = model(ids, video).logits
        b = model(ids, latents=latents).logits
        c = model(ids, video[:, :, [0, 2, 1]]).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # frame order matters (temporal embeddings)


def test_only_immediate_switch_reaches_every_layer():
    # the masking itself is tested per layer in test_models_layers.py (at model level the LM's
    # self-attention mixes earlier tokens' views of earlier images into later tokens anyway)
    for only_immediate in (True, False):
        model = make_model(xattn={"only_immediate": only_immediate})
        assert all(layer.attn.only_immediate == only_immediate for layer in model.xattn_layers.values())
    # ... and changes what the model computes: the same weights give the same logits up to the second image
    # (both modes see image 0 only), and different logits after it (all previous images vs the latest one).
    immediate, all_previous = (make_model(gates=0.5, xattn={"only_immediate": flag}) for flag in (True, False))
    ids, pixels = tokens(["tittitttt"]), images(1, 2)
    with torch.no_grad():
        a, b = immediate(ids, pixels).logits, all_previous(ids, pixels).logits
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=1e-6, atol=1e-6)
    assert (a[:, 4:] - b[:, 4:]).abs().amax() > 1e-3


def test_loss_convention_shift_and_ignored_labels():
    model = make_model(gates=0.5)
    ids = tokens(["titttte", "ttttitt"])
    labels = ids.clone()
    labels[0, 2] = -100
    labels[1, 6] = 0  # pad id: ignored
    out = model(ids, images(2, 1), labels=labels)
    logits = out.logits.detach()
    keep = (labels[:, 1:] != -100) & (labels[:, 1:] != IMG) & (labels[:, 1:] != 0)
    expected = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-6, atol=1e-6)
    assert keep.sum() == 2 * 6 - 2 - 1 - 1  # 12 shifted targets minus two <image> labels, -100 and pad
    all_ignored = model(ids, images(2, 1), labels=torch.full_like(ids, -100)).loss
    assert all_ignored.item() == 0.0


def test_default_freezing_trains_resampler_xattn_and_two_token_rows():
    model = make_model(gates=0.5).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(("resampler.", "xattn_layers."))}
    expected |= {"lm.special_embed.weight", "lm.special_head.weight"}
    assert trainable == expected
    assert model.lm.special_embed.weight.shape == (2, 32) and model.lm.special_head.weight.shape == (2, 32)
    assert not model.lm.embed_tokens.weight.requires_grad and not model.lm.lm_head.weight.requires_grad
    ids = tokens(["tittttt", "ttttttt"])  # uses <image> but not <|endofchunk|> as input
    model(ids, images(2, 1), labels=ids).loss.backward()
    assert model.lm.embed_tokens.weight.grad is None and model.vision.embeddings.patch_embedding.weight.grad is None
    row_grads = model.lm.special_embed.weight.grad.abs().sum(-1)
    assert row_grads[0] > 0 and row_grads[1] == 0
    assert model.lm.special_head.weight.grad.abs().sum(-1).gt(0).all()  # both rows are scored by the softmax
    counts = model.parameter_counts()
    assert counts["trainable"] == counts["resampler"] + counts["xattn"] + 2 * 2 * 32


@pytest.mark.parametrize("mode,prefixes", [("all", ("",)), ("lm", ("lm.",)), ("vision", ("vision.",))])
def test_set_trainable_modes(mode, prefixes):
    model = make_model()
    assert model.set_trainable(mode) is model
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(prefixes), name
    model.set_trainable("flamingo")
    assert not model.lm.embed_tokens.weight.requires_grad and model.lm.special_embed.weight.requires_grad
    with pytest.raises(ValueError, match="mode"):
        model.set_trainable("everything")


def test_parameter_counts_and_shard_units_cover_the_model():
    model = make_model()
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == counts["lm"] + counts["vision"] + counts["resampler"] + counts["xattn"]
    units = model.shard_units()
    assert len(units) == 1 + 1 + 3  # 1 vision block, resampler, 3 LM blocks
    assert units[-3] == [model.xattn_layers["0"], model.lm.layers[0]]
    in_units = {id(p) for unit in units for m in unit for p in m.parameters()}
    outside = {n for n, p in model.named_parameters() if id(p) not in in_units}
    assert outside == {
        "vision.embeddings.class_embedding", "vision.embeddings.patch_embedding.weight",
        "vision.embeddings.position_embedding.weight", "vision.pre_layrnorm.weight", "vision.pre_layrnorm.bias",
        "vision.post_layernorm.weight", "vision.post_layernorm.bias", "lm.embed_tokens.weight",
        "lm.special_embed.weight", "lm.norm.weight", "lm.lm_head.weight", "lm.special_head.weight",
    }  # left to the root unit


def test_meta_build_then_init_weights():
    with torch.device("meta"):
        model = Flamingo(FlamingoConfig.from_preset("demo", **TINY))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights().eval()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(layer.attn_gate.item() == 0 and layer.ffw_gate.item() == 0 for layer in model.xattn_layers.values())
    assert model.lm.norm.weight.eq(1).all() and model.vision.pre_layrnorm.weight.eq(1).all()
    std = model.lm.layers[0].mlp.up_proj.weight.std().item()
    assert 0.015 < std < 0.025  # the LM's N(0, 0.02), not nn.Linear's default
    ids = tokens(["tittt"])
    with torch.no_grad():
        assert torch.equal(model(ids, images(1, 1)).logits, model.lm(ids))


def test_xattn_every_places_layers_from_zero():
    model = make_model(xattn={"every": 2})
    assert list(model.xattn_layers) == ["0", "2"]
    seen = []
    for name, layer in model.xattn_layers.items():
        layer.register_forward_pre_hook(lambda m, a, name=name: seen.append(name))
    model(tokens(["tittt"])[:1], images(1, 1))
    assert seen == ["0", "2"]


def test_cached_decoding_matches_full_forward():
    model = make_model(gates=0.8)
    ids = tokens(["ttitttittte", "itttttttitt"])  # second <image> of each row arrives during decoding
    imgs = images(2, 2)
    with torch.no_grad():
        full = model(ids, imgs).logits
        cache = model.new_cache(batch_size=2, max_length=16)
        steps = [model(ids[:, :4], imgs, cache=cache).logits]
        for t in range(4, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == ids.shape[1] and cache.media_state.tolist() == [2, 2]
    assert set(cache.media_kv) == set(model.xattn_layers)
    with pytest.raises(ValueError, match="first call"), torch.no_grad():
        model(ids[:, :1], imgs, cache=cache)  # media were given to this cache already


def test_left_padded_rows_match_each_row_alone():
    model = make_model(gates=0.8)
    ids = tokens(["ttitttit", "tttttiti"])
    padding = torch.zeros(2, 8, dtype=torch.bool)
    ids[1, :3], padding[1, :3] = 0, True  # row 1: 3 padding tokens, then "ttiti"
    imgs = images(2, 2)
    with torch.no_grad():
        padded = model(ids, imgs, key_padding_mask=padding).logits
        for r, start in ((0, 0), (1, 3)):
            alone = model(ids[r:r + 1, start:], imgs[r:r + 1]).logits
            torch.testing.assert_close(padded[r:r + 1, start:], alone, rtol=1e-5, atol=1e-5)


def test_cache_rejects_more_images_than_cached():
    model = make_model(gates=0.8)
    ids = tokens(["tittit"])
    cache = model.new_cache(batch_size=1, max_length=8)
    with torch.no_grad():
        model(ids[:, :3], images(1, 1), cache=cache)
        with pytest.raises(ValueError, match="T_img=1"):
            model(ids[:, 3:6], cache=cache)


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("ids_1d", ValueError, "input_ids must be 2-D"),
        ("empty_batch", ValueError, r"input_ids must be 2-D \(B, S\) with B >= 1 and S >= 1, got shape \(0, 6\)"),
        ("empty_sequence", ValueError, r"with B >= 1 and S >= 1, got shape \(2, 0\)"),
        ("ids_int32", TypeError, "input_ids must be a torch.long"),
        ("ids_out_of_range", ValueError, r"input_ids must lie in \[0, 32\)"),
        ("images_rank", ValueError, r"images must be 6-D \(B, T_img, F, C, H, W\)"),
        ("images_batch", ValueError, "images batch size 3 does not match input_ids batch size 2"),
        ("images_channels", ValueError, "images must have 3 channels"),
        ("images_size", ValueError, "images must be 16x16 pixels"),
        ("images_int", TypeError, "images must be a floating-point tensor"),
        ("images_device", ValueError, "images are on meta but input_ids are on cpu"),
        ("too_many_image_tokens", ValueError, "input_ids: a row has 3 <image> tokens .* only T_img=2"),
        ("image_tokens_without_images", ValueError, "no images were given"),
        ("media_index_past_images", ValueError, "media_index points at image 2"),
        ("media_index_below", ValueError, "media_index must be >= -1"),
        ("media_index_shape", ValueError, "media_index must have input_ids' shape"),
        ("media_index_float", TypeError, "media_index must be an int32/int64"),
        ("labels_shape", ValueError, "labels must match input_ids' shape"),
        ("labels_dtype", TypeError, "labels must be a torch.long"),
        ("labels_out_of_range", ValueError, r"labels must lie in \[0, 32\) or be -100"),
        ("labels_negative", ValueError, r"labels must lie in \[0, 32\) or be -100 .*\[-1, "),
        ("too_many_frames", ValueError, "max_frames=3"),
        ("images_and_latents", ValueError, "images or latents, not both"),
        ("latents_shape", ValueError, r"latents must be \(2, T_img, 4, 32\)"),
    ],
)
def test_bad_input(case, exc, match):
    model = make_model()
    ids = tokens(["ttittt", "tittit"])
    imgs = images(2, 2)
    kwargs = {}
    if case == "ids_1d":
        ids = ids[0]
    elif case == "empty_batch":
        ids, imgs = ids[:0], imgs[:0]
    elif case == "empty_sequence":
        ids = ids[:, :0]
    elif case == "ids_int32":
        ids = ids.int()
    elif case == "ids_out_of_range":
        ids[0, 0] = 32
    elif case == "images_rank":
        imgs = imgs[:, :, 0]
    elif case == "images_batch":
        imgs = images(3, 2)
    elif case == "images_channels":
        imgs = imgs[:, :, :, :1]
    elif case == "images_size":
        imgs = torch.randn(2, 2, 1, 3, 32, 32)
    elif case == "images_int":
        imgs = imgs.to(torch.uint8)
    elif case == "images_device":
        imgs = imgs.to("meta")
    elif case == "too_many_image_tokens":
        ids[1, 0] = IMG
    elif case == "image_tokens_without_images":
        imgs = None
    elif case == "media_index_past_images":
        kwargs["media_index"] = torch.full_like(ids, 2)
    elif case == "media_index_below":
        kwargs["media_index"] = torch.full_like(ids, -2)
    elif case == "media_index_shape":
        kwargs["media_index"] = torch.zeros(2, 5, dtype=torch.long)
    elif case == "media_index_float":
        kwargs["media_index"] = torch.zeros(2, 6)
    elif case == "labels_shape":
        kwargs["labels"] = ids[:, :-1]
    elif case == "labels_dtype":
        kwargs["labels"] = ids.float()
    elif case == "labels_out_of_range":
        kwargs["labels"] = ids.masked_fill(torch.arange(6) == 2, 32)  # one past the vocabulary
    elif case == "labels_negative":
        kwargs["labels"] = ids.masked_fill(torch.arange(6) == 0, -1).masked_fill(torch.arange(6) == 1, -100)
    elif case == "too_many_frames":
        imgs = images(2, 2, f=4)
    elif case == "images_and_latents":
        kwargs["latents"] = torch.zeros(2, 2, 4, 32)
    elif case == "latents_shape":
        imgs = None
        kwargs["latents"] = torch.zeros(2, 2, 5, 32)
    with pytest.raises(exc, match=match):
        model(ids, imgs, **kwargs)
