"""OpenFlamingo import: its PerceiverResampler / GatedCrossAttentionBlock (open_flamingo 2.0.1, loaded from
the installed package's source) against ours after `from_open_flamingo`, media masking included, plus the
whole OpenFlamingo model (tiny HF Llama inside) against ours, logits and greedy generation."""

import importlib

import pytest
import torch
import transformers  # dev extra: these parity tests must run in CI, so no importorskip

from bench.openflamingo_model import VisualTower, open_flamingo_src
from flamingo_fast.convert import CheckpointKeyError, from_open_flamingo, open_flamingo_config
from flamingo_fast.convert.open_flamingo import open_flamingo_layer_ids
from flamingo_fast.models import Flamingo, LMConfig, VisionConfig
from flamingo_fast.models.generate import generate


OF = open_flamingo_src()
of_helpers = importlib.import_module("of_src.helpers")

BASE = 40  # LM base vocabulary; OpenFlamingo ids: <|endofchunk|> 40, <image> 41, <PAD> 42
OF_EOC, OF_IMAGE = BASE, BASE + 1
OURS_IMAGE, OURS_EOC = BASE, BASE + 1
WIDTH = 32  # vision width = resampler dim (OpenFlamingo has no projection)


def _cfg(layers=2, every=1, immediate=True, frames=1):
    lm = LMConfig(vocab_size=BASE, dim=64, layers=layers, heads=4, kv_heads=2, ffn_dim=96, norm_eps=1e-5)
    vision = VisionConfig(image_size=16, patch_size=4, width=WIDTH, layers=1, heads=2, mlp_dim=64)
    return open_flamingo_config(lm, vision, every, only_attend_immediate_media=immediate,
                                resampler={"depth": 2, "n_latents": 8, "max_frames": frames})


def _randomise(module, seed):
    # OpenFlamingo initialises gates at 0 (which would hide the cross-attention): give everything values.
    # Matrices ~ N(0, 1/fan_in) keep activations O(1); vectors (norm weights, biases, gates) ~ 1 + N(0, 0.2).
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise / p.shape[-1] ** 0.5 if p.dim() > 1 else 1 + 0.2 * noise)
    return module


def _of_blocks(cfg, seed=0, frames=None, immediate=True):
    perceiver = of_helpers.PerceiverResampler(dim=WIDTH, depth=2, dim_head=64, heads=8, num_latents=8,
                                              max_num_frames=frames)
    blocks = {i: of_helpers.GatedCrossAttentionBlock(dim=64, dim_visual=WIDTH,
                                                     only_attend_immediate_media=immediate)
              for i in open_flamingo_layer_ids(cfg.lm.layers, cfg.xattn.every)}
    for k, module in enumerate([perceiver, *blocks.values()]):
        _randomise(module, seed + k)
    return perceiver.eval(), {i: b.eval() for i, b in blocks.items()}


def _checkpoint(tmp_path, perceiver, blocks, wrapped=False):
    """A state-dict file laid out like OpenFlamingo's (perceiver.*, lang_encoder.gated_cross_attn_layers.*
    or its FlamingoLayer view lang_encoder.model.layers.i.gated_cross_attn_layer.*)."""
    state = {f"perceiver.{k}": v for k, v in perceiver.state_dict().items()}
    for i, block in blocks.items():
        prefix = f"lang_encoder.model.layers.{i}.gated_cross_attn_layer." if wrapped else \
            f"lang_encoder.gated_cross_attn_layers.{i}."
        state.update({prefix + k: v for k, v in block.state_dict().items()})
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("frames", [None, 3])
def test_perceiver_matches_open_flamingo(tmp_path, frames):
    cfg = _cfg(frames=frames or 1)
    perceiver, blocks = _of_blocks(cfg, frames=frames)
    model = from_open_flamingo(_checkpoint(tmp_path, perceiver, blocks), cfg, Flamingo(cfg).eval())
    f = frames or 1
    features = torch.randn(2, 3, f, 16, WIDTH, generator=torch.Generator().manual_seed(7))  # (B, T, F, v, D)
    with torch.no_grad():
        torch.testing.assert_close(model.resampler(features), perceiver(features), atol=1e-4, rtol=0)
    if frames is None:  # OpenFlamingo without frame embeddings = ours with zeros
        assert torch.count_nonzero(model.resampler.frame_embs) == 0


def _media_locations(rows):
    """'i' = <image> token, '.' = text."""
    return torch.tensor([[c == "i" for c in row] for row in rows])


@pytest.mark.parametrize("wrapped", [False, True])
def test_gated_xattn_matches_open_flamingo_with_media_masking(tmp_path, wrapped):
    cfg = _cfg()
    perceiver, blocks = _of_blocks(cfg)
    model = from_open_flamingo(_checkpoint(tmp_path, perceiver, blocks, wrapped), cfg, Flamingo(cfg).eval())
    # Text before the first image, an image at position 0, consecutive images, a row without image.
    rows = ["..i...i.", "i..ii...", "........", "...i...."]
    locations = _media_locations(rows)
    latents = torch.randn(4, 3, 8, WIDTH, generator=torch.Generator().manual_seed(8))
    x = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(9))
    media_index = locations.long().cumsum(1) - 1
    with torch.no_grad():
        for i, block in blocks.items():
            ours = model.xattn_layers[str(i)](x, media_index, latents=latents)
            torch.testing.assert_close(ours, block(x, latents, media_locations=locations), atol=1e-4, rtol=0)
            # use_cached_media (generation): new tokens attend to the last image of the prompt.
            new = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(10))
            count = locations.sum(1)
            cached_index = (count - 1)[:, None].expand(4, 3)
            expected = block(new, latents, media_locations=locations, use_cached_media=True)
            ours = model.xattn_layers[str(i)](new, cached_index, latents=latents)
            torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_gated_xattn_all_previous_images_after_the_first_image(tmp_path):
    # only_attend_immediate_media=False: tokens attend to all images so far. OpenFlamingo differs from us
    # only on text before the first image (it averages all images there instead of giving 0), so compare
    # the positions at and after each row's first image.
    cfg = _cfg(immediate=False)
    perceiver, blocks = _of_blocks(cfg, immediate=False)
    model = from_open_flamingo(_checkpoint(tmp_path, perceiver, blocks), cfg, Flamingo(cfg).eval())
    rows = ["..i..i.i", "i..ii..."]
    locations = _media_locations(rows)
    latents = torch.randn(2, 3, 8, WIDTH, generator=torch.Generator().manual_seed(11))
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(12))
    media_index = locations.long().cumsum(1) - 1
    seen = media_index >= 0
    with torch.no_grad():
        for i, block in blocks.items():
            ours = model.xattn_layers[str(i)](x, media_index, latents=latents)
            theirs = block(x, latents, media_locations=locations)
            torch.testing.assert_close(ours[seen], theirs[seen], atol=1e-4, rtol=0)


def test_key_errors_and_placement(tmp_path):
    cfg = _cfg()
    perceiver, blocks = _of_blocks(cfg)
    state = {f"perceiver.{k}": v for k, v in perceiver.state_dict().items()}
    state["lang_encoder.transformer.blocks.0.attn.Wqkv.weight"] = torch.zeros(3)  # an MPT LM: not ours
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointKeyError) as info:
        from_open_flamingo(tmp_path / "bad.pt", cfg, Flamingo(cfg))
    assert "lang_encoder.transformer.blocks.0.attn.Wqkv.weight" in info.value.unexpected
    assert "xattn_layers.0.attn.to_q.weight" in info.value.missing
    # Without a model, everything must come from the file: the LM and vision are not in it.
    with pytest.raises(CheckpointKeyError, match="load the LM and vision encoder first"):
        from_open_flamingo(_checkpoint(tmp_path, perceiver, blocks), cfg)
    # OpenFlamingo's every-4 placement (layers 3, 7) is reproduced by starting at layer n - 1; a checkpoint
    # whose blocks sit elsewhere is refused with the two placements named.
    every4 = _cfg(layers=8, every=4)
    assert every4.xattn_layer_ids == [3, 7]
    perceiver4, blocks4 = _of_blocks(every4)
    from_open_flamingo(_checkpoint(tmp_path, perceiver4, blocks4), every4, Flamingo(every4))
    shifted = {i - 3: block for i, block in blocks4.items()}  # layers 0, 4
    with pytest.raises(ValueError, match=r"before LM layers \[0, 4\]"):
        from_open_flamingo(_checkpoint(tmp_path, perceiver4, shifted), every4, Flamingo(every4))
    # media_time_embs has no counterpart.
    torch.save({**state, "perceiver.media_time_embs": torch.zeros(2, 1, WIDTH)}, tmp_path / "time.pt")
    with pytest.raises(ValueError, match="media_time_embs"):
        from_open_flamingo(tmp_path / "time.pt", cfg, Flamingo(cfg))
    # OpenFlamingo's resampler has no spatial embedding: a config with one would compute something else.
    spatial = cfg.replace(resampler={"spatial_embedding": "sincos2d"})
    with pytest.raises(ValueError, match="spatial_embedding"):
        from_open_flamingo(_checkpoint(tmp_path, perceiver, blocks), spatial, Flamingo(spatial))


# -- the whole model -------------------------------------------------------------------------------------------
def _open_flamingo_model(cfg, seed=0):
    flamingo_lm = importlib.import_module("of_src.flamingo_lm")
    of_flamingo = importlib.import_module("of_src.flamingo")
    of_utils = importlib.import_module("of_src.utils")
    torch.manual_seed(seed)
    lm_cfg = transformers.LlamaConfig(vocab_size=BASE, hidden_size=cfg.lm.dim, intermediate_size=cfg.lm.ffn_dim,
                                      num_hidden_layers=cfg.lm.layers, num_attention_heads=cfg.lm.heads,
                                      num_key_value_heads=cfg.lm.n_kv_heads, rms_norm_eps=cfg.lm.norm_eps)
    lang = transformers.LlamaForCausalLM(lm_cfg)
    of_utils.extend_instance(lang, flamingo_lm.FlamingoLMMixin)
    lang.set_decoder_layers_attr_name("model.layers")
    lang.resize_token_embeddings(BASE + 3)  # <|endofchunk|>, <image>, <PAD> as the factory adds them
    vit = Flamingo(cfg).vision  # our ViT (with OpenFlamingo's feature choice) as the frozen encoder
    holder = torch.nn.Module()
    holder.visual = VisualTower(vit)
    model = of_flamingo.Flamingo(holder, lang, eoc_token_id=OF_EOC, media_token_id=OF_IMAGE, vis_dim=WIDTH,
                                 cross_attn_every_n_layers=cfg.xattn.every)
    model.perceiver = of_helpers.PerceiverResampler(dim=WIDTH, depth=2, num_latents=8)
    _randomise(model.perceiver, seed + 1)
    for k, block in enumerate(model.lang_encoder.gated_cross_attn_layers):
        if block is not None:
            _randomise(block, seed + 10 + k)
    # Larger random LM weights than HF's init (std 0.02), so that greedy decoding does not just repeat a token.
    _randomise(model.lang_encoder.model, seed + 2)
    _randomise(model.lang_encoder.lm_head, seed + 3)
    return model.eval(), vit


def _to_ours(of_ids):
    ours = of_ids.clone()
    ours[of_ids == OF_IMAGE], ours[of_ids == OF_EOC] = OURS_IMAGE, OURS_EOC
    return ours


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")  # raised inside open_flamingo's code
def test_whole_open_flamingo_model_logits_and_greedy(tmp_path):
    cfg = _cfg(layers=2)
    of_model, vit = _open_flamingo_model(cfg)
    state = {k: v for k, v in of_model.state_dict().items() if not k.startswith("vision_encoder.")}
    torch.save(state, tmp_path / "full.pt")
    model = Flamingo(cfg).eval()
    model.vision.load_state_dict(vit.state_dict())
    from_open_flamingo(tmp_path / "full.pt", cfg, model)

    g = torch.Generator().manual_seed(13)
    of_ids = torch.randint(3, BASE, (2, 12), generator=g)
    of_ids[:, 0] = OF_IMAGE
    of_ids[0, 5], of_ids[0, 6] = OF_EOC, OF_IMAGE
    of_ids[1, 7], of_ids[1, 8] = OF_EOC, OF_IMAGE
    images = torch.randn(2, 2, 1, 3, 16, 16, generator=g)
    with torch.no_grad():
        theirs = of_model(images, of_ids).logits
        ours = model(_to_ours(of_ids), images).logits
    torch.testing.assert_close(ours[..., :BASE], theirs[..., :BASE], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[..., OURS_IMAGE], theirs[..., OF_IMAGE], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[..., OURS_EOC], theirs[..., OF_EOC], atol=1e-4, rtol=0)

    # Greedy decoding with OpenFlamingo's media semantics: the images are encoded once (vis_x) and, once the
    # prompt is in the KV cache, every new token attends to the last image (use_cached_media). This is what
    # its `generate` sets up for HF's generate loop, written out (transformers 5's loop no longer passes the
    # attention_mask positionally, which FlamingoLMMixin.forward requires).
    with torch.no_grad():
        ours = generate(model, _to_ours(of_ids), images, max_new_tokens=6, eos_token_ids=[OURS_EOC], pad_token_id=0)
        lang = of_model.lang_encoder
        lang._use_cached_vision_x = True
        of_model._encode_vision_x(vision_x=images)
        mask = torch.ones_like(of_ids)
        out = lang(input_ids=of_ids, attention_mask=mask, use_cache=True)
        theirs = []
        for _ in range(6):
            logits = out.logits[:, -1].clone()
            logits[:, [OF_IMAGE, BASE + 2]] = float("-inf")  # ours never generates <image> and has no <PAD>
            next_ids = logits.argmax(-1)
            theirs.append(next_ids)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = lang(input_ids=next_ids[:, None], attention_mask=mask, cache=out.cache, use_cache=True)
        lang.clear_conditioned_layers()
        lang._use_cached_vision_x = False
    their_new = _to_ours(torch.stack(theirs, 1))
    for row in range(2):
        expected = their_new[row].tolist()
        if OURS_EOC in expected:
            expected = expected[: expected.index(OURS_EOC)]
        assert ours.tokens[row] == expected


def test_open_clip_vision_names_map_onto_our_vit(tmp_path):
    # OpenFlamingo state dicts that include the frozen encoder name it as open_clip's VisionTransformer.
    # open_clip is not a dependency, so the open_clip-named tensors are built from a reference ViT of ours
    # (in_proj = [q; k; v] stacked, as nn.MultiheadAttention stores it) and must come back unchanged.
    cfg = _cfg()
    reference = _randomise(Flamingo(cfg).vision, 21)
    ours = dict(reference.state_dict())
    state = {
        "vision_encoder.conv1.weight": ours["embeddings.patch_embedding.weight"],
        "vision_encoder.class_embedding": ours["embeddings.class_embedding"],
        "vision_encoder.positional_embedding": ours["embeddings.position_embedding.weight"],
        "vision_encoder.proj": torch.zeros(WIDTH, 8),  # CLIP's pooled projection: not used, skipped
    }
    for part, name in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            state[f"vision_encoder.{part}.{kind}"] = ours[f"{name}.{kind}"]
    for i in range(cfg.vision.layers):
        block, layer = f"vision_encoder.transformer.resblocks.{i}", f"encoder.layers.{i}"
        for kind in ("weight", "bias"):
            state[f"{block}.attn.in_proj_{kind}"] = torch.cat(
                [ours[f"{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for theirs, mine in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                state[f"{block}.{theirs}.{kind}"] = ours[f"{layer}.{mine}.{kind}"]
    perceiver, blocks = _of_blocks(cfg)
    state.update({f"perceiver.{k}": v for k, v in perceiver.state_dict().items()})
    for i, block in blocks.items():
        state.update({f"lang_encoder.gated_cross_attn_layers.{i}.{k}": v for k, v in block.state_dict().items()})
    torch.save(state, tmp_path / "with_vision.pt")
    model = from_open_flamingo(tmp_path / "with_vision.pt", cfg, Flamingo(cfg))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.vision.state_dict()[name], tensor), name
