"""Generation: the cached decoder against Flamingo.forward, left padding, greedy / sampling / beam search
(checked against a cache-free loop and against Hugging Face's generate), stopping, media caching."""

import pytest
import torch
import transformers  # dev extra (oracle for greedy and beam search); runs in CI, no importorskip

from flamingo_fast.convert import from_hf_llama, llama_config
from flamingo_fast.models import Flamingo, FlamingoConfig
from flamingo_fast.models.generate import _Decoder, generate, sample_next

TINY = dict(
    vision={"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
    resampler={"dim": 32, "depth": 1, "heads": 2, "head_dim": 16, "n_latents": 4, "max_frames": 1},
    xattn={"heads": 4, "head_dim": 8, "kv_heads": 2, "every": 2},
    lm={"vocab_size": 30, "dim": 32, "layers": 3, "heads": 4, "kv_heads": 2, "ffn_dim": 64, "max_seq_len": 64},
    pad_token_id=0,
)
IMG, EOC = 30, 31


def make_model(seed=2) -> Flamingo:
    """Random weights scaled so that context and images matter (HF-style std 0.02 makes a tiny LM repeat
    one token): matrices ~ N(0, 4 / fan_in), vectors (norms, gates) ~ 1 + N(0, 0.2^2)."""
    torch.manual_seed(seed)
    model = Flamingo(FlamingoConfig.from_preset("demo", **TINY)).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("vision."):
                noise = torch.randn(p.shape, generator=g)
                p.copy_(2 * noise / p.shape[-1] ** 0.5 if p.dim() > 1 else 1 + 0.2 * noise)
    return model


def images(b, t, seed=1):
    return torch.randn(b, t, 1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def ids_from(rows):
    """Rows of ints; 'I' marks <image>."""
    return [[IMG if tok == "I" else tok for tok in row] for row in rows]


def left_pad(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return ids, mask


PROMPTS = ids_from([[1, "I", 5, 6, 7, "I", 8], ["I", 9, 4], [3, 4, 5, 6, 2, 2, 7, 8, 9, 10]])
NUM_IMAGES = [2, 1, 0]


def prompt_images(seed=1):
    """(3, 2, 1, C, H, W): row r's first NUM_IMAGES[r] images are real, the rest zero padding."""
    imgs = images(3, 2, seed)
    for r, n in enumerate(NUM_IMAGES):
        imgs[r, n:] = 0
    return imgs


def test_decoder_matches_forward_prefill_and_steps():
    model = make_model()
    ids = torch.tensor([ids_from([[1, "I", 5, 6, "I", 8, 9]])[0]] * 2)
    ids[1, 2] = 11
    imgs = images(2, 2)
    latents = model.encode_images(imgs)
    with torch.no_grad():
        decoder = _Decoder(model, 2, 12, padded=False, media_cache="kv", images=None, latents=latents)
        torch.testing.assert_close(decoder.step(ids, torch.ones_like(ids, dtype=torch.bool)),
                                   model(ids, imgs).logits[:, -1], atol=1e-5, rtol=0)
        for token in (12, 13, 14):
            new = torch.full((2, 1), token)
            got = decoder.step(new, torch.ones_like(new, dtype=torch.bool))
            ids = torch.cat([ids, new], 1)
            torch.testing.assert_close(got, model(ids, imgs).logits[:, -1], atol=1e-5, rtol=0)


def naive_greedy(model, ids, imgs, steps):
    """Argmax of a full forward over the whole sequence at every step: no cache of any kind."""
    out = []
    for _ in range(steps):
        logits = model(ids, imgs).logits[:, -1]
        logits[:, IMG] = float("-inf")
        token = int(logits.argmax(-1))
        out.append(token)
        if token == EOC:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return out[:-1] if out and out[-1] == EOC else out


def test_greedy_equals_cache_free_loop_and_batched_equals_alone():
    model = make_model()
    imgs = prompt_images()
    alone = []
    with torch.no_grad():
        for r, row in enumerate(PROMPTS):
            ids = torch.tensor([row])
            row_images = imgs[r: r + 1, : max(NUM_IMAGES[r], 1)] if NUM_IMAGES[r] else None
            out = generate(model, ids, row_images, max_new_tokens=8)
            assert out.tokens[0] == naive_greedy(model, ids, row_images, 8)
            alone.append(out.tokens[0])
        ids, mask = left_pad(PROMPTS)
        batched = generate(model, ids, imgs, attention_mask=mask, max_new_tokens=8)
    assert batched.tokens == alone
    table = batched.padded(pad_token_id=-1)
    assert table.shape == (3, max(map(len, alone))) and table[0, : len(alone[0])].tolist() == alone[0]
    assert len({len(t) for t in alone}) > 1 or len(set(map(tuple, alone))) > 1  # the rows do differ


def test_media_cache_modes_agree():
    model = make_model()
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        outs = [generate(model, ids, prompt_images(), attention_mask=mask, max_new_tokens=6, media_cache=mode).tokens
                for mode in ("kv", "latents", "none")]
    assert outs[0] == outs[1] == outs[2]


def test_stopping_min_tokens_and_no_image_token():
    model = make_model()
    ids = torch.tensor([ids_from([["I", 3, 4]])[0]])
    with torch.no_grad():
        free = generate(model, ids, images(1, 1), max_new_tokens=6, eos_token_ids=[])
        t = free.tokens[0]
        assert len(t) == 6 and free.finished == [False]
        stop_at = next(i for i in range(1, 6) if t[i] not in t[:i])  # first position with a new token
        stopped = generate(model, ids, images(1, 1), max_new_tokens=6, eos_token_ids=[t[stop_at]])
        assert stopped.tokens == [t[:stop_at]] and stopped.finished == [True]
        # min_new_tokens: the stop token cannot come first.
        late = generate(model, ids, images(1, 1), max_new_tokens=6, eos_token_ids=[t[0]], min_new_tokens=2)
        assert late.tokens[0][0] != t[0] and len(late.tokens[0]) >= 2
        # An <image> row that would win the argmax is never generated: the runner-up comes instead.
        model.lm.special_head.weight[0] = 10 * model.lm.lm_head.weight[t[0]]
        logits = model(ids, images(1, 1)).logits[0, -1]
        assert int(logits.argmax()) == IMG
        assert generate(model, ids, images(1, 1), max_new_tokens=6, eos_token_ids=[]).tokens == [t]


def test_sampling():
    model = make_model()
    ids, mask = left_pad(PROMPTS)
    imgs = prompt_images()
    with torch.no_grad():
        greedy = generate(model, ids, imgs, attention_mask=mask, max_new_tokens=6)
        # A nucleus too small for a second token is greedy.
        nucleus = generate(model, ids, imgs, attention_mask=mask, max_new_tokens=6, do_sample=True, top_p=1e-6,
                           generator=torch.Generator().manual_seed(0))
        assert nucleus.tokens == greedy.tokens
        runs = [generate(model, ids, imgs, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=2.0,
                         generator=torch.Generator().manual_seed(s)).tokens for s in (5, 5, 6)]
        assert runs[0] == runs[1] and runs[0] != runs[2]
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(400, 1)
    picks = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1, 2}
    # top_p=0.5: p(1) = 0.46 < 0.5, so token 2 (p 0.42) is needed too, and nothing else.
    picks = sample_next(logits, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1, 2}


def test_bad_inputs():
    model = make_model()
    ids = torch.tensor([[1, IMG, 3]])
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, images(1, 1), attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="images or latents"):
        generate(model, ids, images(1, 1), latents=torch.zeros(1, 1, 4, 32))
    with pytest.raises(ValueError, match="no images were given"):
        generate(model, ids)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, images(1, 1), do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="not both"):
        generate(model, ids, images(1, 1), do_sample=True, num_beams=2)


# -- against Hugging Face's generate (text only: a Flamingo whose LM is an imported HF Llama) --------------------
@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   initializer_range=0.5)  # wide init: peaked, varied next-token distributions
    hf = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    model = Flamingo(FlamingoConfig.from_preset("demo", lm=dict(vars(llama_config(folder))))).eval()
    from_hf_llama(folder, into=model.lm)
    return hf, model


HF_PROMPTS = [[5, 9, 13, 2, 40, 7], [11, 3], [30, 31, 32, 33]]
SPECIALS = [48, 49]  # ours only (<image>, <|endofchunk|>): HF cannot produce them


@pytest.mark.parametrize("beams,length_penalty", [(1, 1.0), (3, 0.0), (3, 1.0)])
def test_matches_hf_generate_with_left_padding(hf_and_ours, beams, length_penalty):
    hf, model = hf_and_ours
    ids, mask = left_pad(HF_PROMPTS)
    eos = 7
    with torch.no_grad():
        ours = generate(model, ids, attention_mask=mask, max_new_tokens=7, num_beams=beams,
                        length_penalty=length_penalty, eos_token_ids=[eos], suppress_token_ids=SPECIALS)
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=7, num_beams=beams, do_sample=False,
                             length_penalty=length_penalty, early_stopping=False, eos_token_id=eos, pad_token_id=0)
    for row in range(len(HF_PROMPTS)):
        expected = theirs[row, ids.shape[1]:].tolist()
        if eos in expected:
            expected = expected[: expected.index(eos)]
        assert ours.tokens[row] == expected, (row, ours.tokens, theirs)
