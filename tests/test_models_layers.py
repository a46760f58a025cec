"""Model components on CPU: ViT, Perceiver Resampler, gated xattn-dense (media masking), LM + KV cache."""

import math

import pytest
import torch

from flamingo_fast.models import (
    FlamingoConfig,
    GatedXAttnDense,
    LanguageModel,
    PerceiverResampler,
    VisionTransformer,
)
from flamingo_fast.models.perceiver import sincos_2d

TINY = dict(
    vision={"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
    resampler={"dim": 32, "depth": 2, "heads": 2, "head_dim": 16, "n_latents": 4, "max_frames": 3},
    xattn={"heads": 4, "head_dim": 8, "kv_heads": 2},
    lm={"vocab_size": 30, "dim": 32, "layers": 3, "heads": 4, "kv_heads": 2, "ffn_dim": 64},
)


def tiny_cfg(**overrides) -> FlamingoConfig:
    return FlamingoConfig.from_preset("demo", **TINY).replace(**overrides)


# -- vision ----------------------------------------------------------------------------------------------------
def test_vision_shapes_and_clip_names():
    cfg = tiny_cfg().vision
    torch.manual_seed(0)
    vit = VisionTransformer(cfg)
    out = vit(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 16, 32) and torch.isfinite(out).all()
    names = set(dict(vit.named_parameters()))
    for name in [
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "embeddings.position_embedding.weight",
        "pre_layrnorm.weight",
        "encoder.layers.0.layer_norm1.weight",
        "encoder.layers.0.self_attn.q_proj.weight",
        "encoder.layers.0.self_attn.q_proj.bias",
        "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.0.mlp.fc1.weight",
        "encoder.layers.0.mlp.fc2.bias",
        "post_layernorm.weight",
    ]:
        assert name in names, name
    assert vit.embeddings.position_embedding.weight.shape == (17, 32)  # 16 patches + class token
    with_cls = VisionTransformer(tiny_cfg(vision={"output_class_token": True}).vision)
    assert with_cls(torch.randn(1, 3, 16, 16)).shape == (1, 17, 32)


def test_vision_attention_matches_plain_math():
    """One block recomputed by hand: pre-LN, softmax attention over all tokens, GELU MLP."""
    cfg = tiny_cfg().vision
    torch.manual_seed(1)
    vit = VisionTransformer(cfg).double()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    x = vit.pre_layrnorm(vit.embeddings(images))
    layer = vit.encoder.layers[0]
    h = layer.layer_norm1(x)
    att = layer.self_attn

    def heads(t):
        return t.view(2, 17, 2, 16).transpose(1, 2)

    q, k, v = heads(att.q_proj(h)), heads(att.k_proj(h)), heads(att.v_proj(h))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1)
    x = x + att.out_proj((probs @ v).transpose(1, 2).reshape(2, 17, 32))
    x = x + layer.mlp.fc2(torch.nn.functional.gelu(layer.mlp.fc1(layer.layer_norm2(x))))
    expected = vit.post_layernorm(x[:, 1:])
    torch.testing.assert_close(vit(images), expected, rtol=1e-10, atol=1e-10)


def test_vision_conv_stem_layout_and_math():
    """stem: 3x3 convs (channels, stride) + GELU, then a 1x1 patch_embedding; same token grid as patchify."""
    cfg = tiny_cfg(vision={"stem": [[6, 1], [8, 2], [12, 2]]}).vision
    torch.manual_seed(2)
    vit = VisionTransformer(cfg).double()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert vit(images).shape == (2, 16, 32)
    emb = vit.embeddings
    assert emb.patch_embedding.weight.shape == (32, 12, 1, 1)
    F = torch.nn.functional
    h = F.gelu(F.conv2d(images, emb.stem[0].weight, emb.stem[0].bias, stride=1, padding=1))
    h = F.gelu(F.conv2d(h, emb.stem[2].weight, emb.stem[2].bias, stride=2, padding=1))
    h = F.gelu(F.conv2d(h, emb.stem[4].weight, emb.stem[4].bias, stride=2, padding=1))
    tokens = F.conv2d(h, emb.patch_embedding.weight).flatten(2).transpose(1, 2)  # (2, 16, 32)
    expected = torch.cat([emb.class_embedding.expand(2, 1, -1), tokens], 1) + emb.position_embedding.weight
    torch.testing.assert_close(emb(images), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stem", [[[8, 2]], [[8, 2], [12, 2], [16, 2]], [[8, 2], [0, 2]], [[8, 4]],
                                  [[8, 1], [8, 3]], [8, 12], [["a", 2], [8, 2]], [[8, 2.0], [8, 2]],
                                  [[8, True], [8, 2], [8, 2]], ["12", "12"], [[8, 2, 1], [8, 2]], "stem"])
def test_vision_bad_stem_names_stem(stem):
    with pytest.raises(ValueError, match="vision.stem"):
        tiny_cfg(vision={"stem": stem}).validate()


def test_config_round_trip_keeps_stem_and_reads_older_stem_channels():
    import json

    cfg = tiny_cfg(vision={"stem": [[6, 1], [8, 2], [12, 2]]}, resampler={"spatial_embedding": "sincos2d"})
    again = FlamingoConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.vision.stem == ((6, 1), (8, 2), (12, 2))
    older = cfg.to_dict()  # an export written before `stem` replaced `stem_channels` (stride-2 convs only)
    del older["vision"]["stem"]
    older["vision"]["stem_channels"] = [8, 12]
    assert FlamingoConfig.from_dict(older).vision.stem == ((8, 2), (12, 2))


def test_vision_wrong_channels_names_images():
    vit = VisionTransformer(tiny_cfg().vision)
    with pytest.raises(ValueError, match=r"images.*3 channels"):
        vit(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="images"):
        vit(torch.randn(1, 3, 12, 12))


# -- perceiver resampler ----------------------------------------------------------------------------------------
def test_resampler_output_shape_and_media_projection():
    cfg = tiny_cfg(resampler={"dim": 48, "heads": 3, "head_dim": 16})
    torch.manual_seed(0)
    resampler = PerceiverResampler(cfg.resampler, media_dim=32)
    out = resampler(torch.randn(2, 3, 1, 16, 32))
    assert out.shape == (2, 3, 4, 48)
    assert isinstance(resampler.media_proj, torch.nn.Linear)
    assert isinstance(PerceiverResampler(cfg.resampler, media_dim=48).media_proj, torch.nn.Identity)


def test_resampler_items_are_independent():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    resampler = PerceiverResampler(cfg.resampler, media_dim=32)
    features = torch.randn(2, 3, 2, 5, 32)
    out = resampler(features)
    alone = resampler(features[1:, 2:])
    torch.testing.assert_close(out[1:, 2:], alone, rtol=1e-5, atol=1e-6)


def test_resampler_temporal_embeddings_used_per_frame():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    resampler = PerceiverResampler(cfg.resampler, media_dim=32)
    with torch.no_grad():
        resampler.frame_embs.normal_()
    features = torch.randn(1, 2, 2, 5, 32)
    out = resampler(features)
    # swapping two frames changes the result only because each frame gets its own temporal embedding
    swapped = resampler(features.flip(2))
    assert not torch.allclose(out, swapped, atol=1e-4)
    with torch.no_grad():
        resampler.frame_embs.zero_()
    torch.testing.assert_close(resampler(features), resampler(features.flip(2)), rtol=1e-5, atol=1e-5)
    # gradients reach exactly the embeddings of the frames present (F=2 of max_frames=3)
    resampler.zero_grad()
    resampler(features).square().sum().backward()
    grad = resampler.frame_embs.grad
    assert grad[:2].abs().sum(-1).gt(0).all() and grad[2].eq(0).all()
    with pytest.raises(ValueError, match="max_frames"):
        resampler(torch.randn(1, 1, 4, 5, 32))


def test_sincos_2d_matches_formula_row_major():
    grid, dim = 3, 8
    table = sincos_2d(grid, dim)
    assert table.shape == (grid * grid, dim) and table.dtype == torch.float32
    for row in range(grid):
        for col in range(grid):
            omega = [grid ** -(i / 2) for i in range(2)]
            expected = ([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                        + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])
            torch.testing.assert_close(table[row * grid + col], torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert torch.unique(table, dim=0).shape[0] == grid * grid  # every patch position is told apart
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(3, 6)


def test_resampler_spatial_embedding_adds_patch_positions():
    torch.manual_seed(0)
    plain = PerceiverResampler(tiny_cfg().resampler, media_dim=32)
    spatial = PerceiverResampler(tiny_cfg(resampler={"spatial_embedding": "sincos2d"}).resampler, media_dim=32)
    spatial.load_state_dict(plain.state_dict())  # no new parameters: the table is fixed
    features = torch.randn(2, 1, 2, 16, 32)  # 4 x 4 patches, 2 frames
    torch.testing.assert_close(spatial(features), plain(features + sincos_2d(4, 32)), rtol=1e-5, atol=1e-6)
    # Without it the resampler cannot tell where a patch is: shuffling the patches changes nothing.
    shuffle = torch.randperm(16)
    torch.testing.assert_close(plain(features[:, :, :, shuffle]), plain(features), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(spatial(features[:, :, :, shuffle]), spatial(features), atol=1e-3)
    with pytest.raises(ValueError, match="square patch grid"):
        spatial(torch.randn(1, 1, 1, 15, 32))


def test_resampler_spatial_embedding_bad_config():
    with pytest.raises(ValueError, match="resampler.spatial_embedding"):
        tiny_cfg(resampler={"spatial_embedding": "learned"}).validate()
    with pytest.raises(ValueError, match="output_class_token"):
        tiny_cfg(resampler={"spatial_embedding": "sincos2d"}, vision={"output_class_token": True}).validate()
    with pytest.raises(ValueError, match="vision.width divisible by 4"):
        tiny_cfg(resampler={"spatial_embedding": "sincos2d"}, vision={"width": 30, "heads": 2}).validate()


def test_resampler_matches_plain_math():
    """The paper's update: latents += Attn(q=LN(latents), kv=[LN(media); LN(latents)]); latents += FFW."""
    cfg = tiny_cfg(resampler={"depth": 1})
    torch.manual_seed(2)
    resampler = PerceiverResampler(cfg.resampler, media_dim=24).double()
    with torch.no_grad():
        resampler.frame_embs.normal_()
    features = torch.randn(2, 1, 2, 3, 24, dtype=torch.float64)
    media = resampler.media_proj((features + resampler.frame_embs[:2, None]).reshape(2, 6, 24))
    lat = resampler.latents.expand(2, -1, -1)
    attn = resampler.layers[0].attn
    lat_n = attn.norm_latents(lat)
    kv = torch.cat([attn.norm_media(media), lat_n], dim=1)
    q = attn.to_q(lat_n).view(2, 4, 2, 16).transpose(1, 2)
    k, v = (t.view(2, 10, 2, 16).transpose(1, 2) for t in attn.to_kv(kv).chunk(2, dim=-1))
    o = (torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v).transpose(1, 2).reshape(2, 4, 32)
    lat = lat + attn.to_out(o)
    lat = lat + resampler.layers[0].ffw(lat)
    torch.testing.assert_close(resampler(features)[:, 0], resampler.norm(lat), rtol=1e-10, atol=1e-10)


# -- gated xattn-dense ---------------------------------------------------------------------------------------------
N_LAT = 4


def make_xattn(only_immediate=True, seed=0, dtype=torch.float64) -> GatedXAttnDense:
    cfg = tiny_cfg(xattn={"only_immediate": only_immediate})
    torch.manual_seed(seed)
    layer = GatedXAttnDense(cfg.xattn, dim=32, media_dim=32, latents_per_media=N_LAT).to(dtype)
    with torch.no_grad():  # non-zero gates so the cross-attention path matters
        layer.attn_gate.fill_(0.7)
        layer.ffw_gate.fill_(-0.4)
    return layer


def media_index_of(rows: list[str]) -> torch.Tensor:
    """'t' text, 'i' image token -> cumsum - 1, as Flamingo computes it."""
    marks = torch.tensor([[c == "i" for c in row] for row in rows])
    return marks.long().cumsum(1) - 1


# consecutive images / image at the last position / no image / image first and text between
MIXED = ["ttiitt", "ttttti", "tttttt", "ittitt"]


def manual_xattn(layer: GatedXAttnDense, x, latents, media_index, only_immediate):
    """Loop-per-token oracle of the masked cross-attention (output 0 where no image is visible)."""
    a = layer.attn
    b, s, _ = x.shape
    k, v = a.media_kv(latents)
    q = a.to_q(a.norm(x)).view(b, s, 4, 8)
    k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    out = torch.zeros(b, s, 4, 8, dtype=x.dtype)
    for r in range(b):
        for t in range(s):
            m = int(media_index[r, t])
            if m < 0:
                continue
            lo = 0 if not only_immediate else m * N_LAT
            keys = slice(lo, (m + 1) * N_LAT)
            scores = torch.einsum("hd,khd->hk", q[r, t], k[r, keys]) / math.sqrt(8)
            out[r, t] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[r, keys])
    return a.to_out(out.reshape(b, s, 32))


@pytest.mark.parametrize("only_immediate", [True, False])
def test_xattn_matches_per_token_oracle_on_mixed_batch(only_immediate):
    layer = make_xattn(only_immediate)
    mi = media_index_of(MIXED)
    x = torch.randn(4, 6, 32, dtype=torch.float64)
    latents = torch.randn(4, 2, N_LAT, 32, dtype=torch.float64)
    got = layer.attn(x, mi, latents=latents)
    torch.testing.assert_close(got, manual_xattn(layer, x, latents, mi, only_immediate), rtol=1e-9, atol=1e-10)
    full = layer(x, mi, latents=latents)
    expected = x + math.tanh(0.7) * got
    expected = expected + math.tanh(-0.4) * layer.ffw(expected)
    torch.testing.assert_close(full, expected, rtol=1e-12, atol=1e-12)
    # each row is independent of the others
    torch.testing.assert_close(layer(x[1:2], mi[1:2], latents=latents[1:2]), full[1:2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_xattn_zero_before_first_image_forward_and_backward(dtype):
    layer = make_xattn(dtype=dtype)
    mi = media_index_of(MIXED)
    x = torch.randn(4, 6, 32, dtype=dtype, requires_grad=True)
    latents = torch.randn(4, 2, N_LAT, 32, dtype=dtype, requires_grad=True)
    out = layer.attn(x, mi, latents=latents)
    before = mi < 0
    assert torch.isfinite(out).all()
    assert out[before].eq(0).all() and out[~before].abs().sum(-1).gt(0).all()
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(latents.grad).all()
    assert x.grad[before].eq(0).all() and x.grad[~before].abs().sum(-1).gt(0).all()
    # row 2 has no image: no gradient reaches its latents; images never referenced get none either
    assert latents.grad[2].eq(0).all()
    assert latents.grad[1, 1].eq(0).all() and latents.grad[1, 0].abs().sum() > 0
    assert layer.attn.to_q.weight.grad is not None and torch.isfinite(layer.attn.to_q.weight.grad).all()


def test_xattn_token_sees_only_its_latest_image():
    mi = media_index_of(["itttittt"])
    x = torch.randn(1, 8, 32, dtype=torch.float64)
    latents = torch.randn(1, 2, N_LAT, 32, dtype=torch.float64)
    perturbed = latents.clone()
    perturbed[:, 0] += 1.0  # change the first image only
    for only_immediate in (True, False):
        layer = make_xattn(only_immediate)
        a, b = layer(x, mi, latents=latents), layer(x, mi, latents=perturbed)
        after_second = mi[0] == 1
        assert not torch.allclose(a[0, ~after_second], b[0, ~after_second])  # tokens of image 0 see the change
        if only_immediate:
            assert torch.equal(a[0, after_second], b[0, after_second])
        else:
            assert (a[0, after_second] - b[0, after_second]).abs().sum(-1).gt(1e-6).all()


def test_xattn_precomputed_media_kv_and_no_media():
    layer = make_xattn()
    mi = media_index_of(MIXED)
    x = torch.randn(4, 6, 32, dtype=torch.float64)
    latents = torch.randn(4, 2, N_LAT, 32, dtype=torch.float64)
    kv = layer.media_kv(latents)
    assert kv[0].shape == (4, 2 * N_LAT, 2, 8)
    assert torch.equal(layer(x, mi, media_kv=kv), layer(x, mi, latents=latents))
    # without media only the gated FFW acts
    no_media = layer(x, torch.full((4, 6), -1))
    torch.testing.assert_close(no_media, x + math.tanh(-0.4) * layer.ffw(x), rtol=0, atol=0)


def test_xattn_ffw_is_squared_relu_and_gates_start_at_zero():
    cfg = tiny_cfg()
    layer = GatedXAttnDense(cfg.xattn, dim=32, media_dim=32, latents_per_media=N_LAT)
    assert layer.attn_gate.shape == (1,) and layer.attn_gate.item() == 0 and layer.ffw_gate.item() == 0
    assert layer.ffw.fc1.out_features == 4 * 32
    x = torch.randn(3, 32)
    h = layer.ffw.fc1(layer.ffw.norm(x))
    torch.testing.assert_close(layer.ffw(x), layer.ffw.fc2(torch.relu(h) ** 2))
    mi = torch.zeros(1, 3, dtype=torch.long)
    x = torch.randn(1, 3, 32)
    assert torch.equal(layer(x, mi, latents=torch.randn(1, 1, N_LAT, 32)), x)


# -- language model ------------------------------------------------------------------------------------------------
def make_lm(seed=0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(tiny_cfg().lm).eval()


def test_lm_llama_names_and_special_rows():
    lm = make_lm()
    names = set(dict(lm.named_parameters()))
    for name in [
        "embed_tokens.weight",
        "layers.0.input_layernorm.weight",
        "layers.0.self_attn.q_proj.weight",
        "layers.0.self_attn.k_proj.weight",
        "layers.0.self_attn.v_proj.weight",
        "layers.0.self_attn.o_proj.weight",
        "layers.0.post_attention_layernorm.weight",
        "layers.0.mlp.gate_proj.weight",
        "layers.0.mlp.up_proj.weight",
        "layers.0.mlp.down_proj.weight",
        "norm.weight",
        "lm_head.weight",
        "special_embed.weight",
        "special_head.weight",
    ]:
        assert name in names, name
    assert lm.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 32)  # GQA: 2 kv heads of 8
    ids = torch.tensor([[1, 30, 5, 31]])
    emb = lm.embed(ids)
    assert torch.equal(emb[0, 1], lm.special_embed.weight[0]) and torch.equal(emb[0, 3], lm.special_embed.weight[1])
    assert torch.equal(emb[0, 0], lm.embed_tokens.weight[1])
    logits = lm(ids)
    assert logits.shape == (1, 4, 32)
    h = lm.hidden_states(emb)
    torch.testing.assert_close(logits[..., 30:], h @ lm.special_head.weight.T)


def test_lm_is_causal():
    lm = make_lm()
    ids = torch.randint(0, 32, (2, 9))
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 32
    a, b = lm(ids), lm(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_lm_rope_matches_rotation_formula():
    """RoPE (HF rotate_half layout) rotates pair (x_j, x_{j+d/2}) by angle pos * theta^(-2j/d)."""
    from flamingo_fast.models.lm import apply_rope, rope_cos_sin

    d, theta = 8, 10000.0
    x = torch.randn(1, 5, 1, d, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(5), d, theta, torch.float64)
    got = apply_rope(x, cos, sin)
    for pos in range(5):
        for j in range(d // 2):
            ang = pos * theta ** (-2 * j / d)
            a, b = x[0, pos, 0, j], x[0, pos, 0, j + d // 2]
            assert torch.allclose(got[0, pos, 0, j], a * math.cos(ang) - b * math.sin(ang))
            assert torch.allclose(got[0, pos, 0, j + d // 2], b * math.cos(ang) + a * math.sin(ang))


def test_lm_kv_cache_decoding_matches_full_forward():
    lm = make_lm()
    ids = torch.randint(0, 32, (2, 11))
    with torch.no_grad():
        full = lm(ids)
        cache = lm.new_cache(batch_size=2, max_length=16)
        steps = [lm(ids[:, :5], cache=cache)]  # prefill, then chunks of 1, 1, 3, 1
        for lo, hi in [(5, 6), (6, 7), (7, 10), (10, 11)]:
            steps.append(lm(ids[:, lo:hi], cache=cache))
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_length"):
        lm(ids[:, :6], cache=cache)
    with pytest.raises(ValueError, match="batch"):
        lm(ids[:1, :1], cache=lm.new_cache(batch_size=2, max_length=4))


def test_lm_left_padding_mask_matches_each_row_alone_with_and_without_cache():
    lm = make_lm()
    rows = [torch.randint(0, 32, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    padding = torch.ones(3, 7, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, 7 - len(row):], padding[r, 7 - len(row):] = row, False
    with torch.no_grad():
        full = lm(ids, key_padding_mask=padding)
        cache = lm.new_cache(batch_size=3, max_length=9)
        lm(ids, cache=cache, key_padding_mask=padding)
        new = torch.tensor([[4], [5], [6]])
        step = lm(new, cache=cache, key_padding_mask=torch.cat([padding, torch.zeros(3, 1, dtype=torch.bool)], 1))
        for r, row in enumerate(rows):
            alone = lm(torch.cat([row, new[r]])[None])
            torch.testing.assert_close(full[r, 7 - len(row):], alone[0, :-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step[r, 0], alone[0, -1], rtol=1e-5, atol=1e-5)
    # No padding at all: the explicit mask reproduces the default causal path; explicit positions are used.
    torch.testing.assert_close(lm(ids, key_padding_mask=torch.zeros(3, 7, dtype=torch.bool)), lm(ids),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lm(ids, positions=torch.arange(7)), lm(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        lm(ids, key_padding_mask=padding[:, 1:])
    with pytest.raises(ValueError, match="positions"):
        lm(ids, positions=torch.arange(6))


def test_lm_before_block_hook_runs_before_each_block():
    lm = make_lm()
    seen = []

    def hook(i, x):
        seen.append(i)
        return x

    ids = torch.randint(0, 32, (1, 4))
    torch.testing.assert_close(lm(ids, before_block=hook), lm(ids), rtol=0, atol=0)
    assert seen == [0, 1, 2]


def test_lm_bad_input_ids():
    lm = make_lm()
    with pytest.raises(TypeError, match="input_ids"):
        lm(torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="input_ids"):
        lm(torch.zeros(3, dtype=torch.long))
