"""FLOP and byte counters of bench/ against hand-computed cases."""

import pytest
import torch

from bench import flops
from bench.cases import Case, attention_case, media_case, perceiver_case


def brute_force_causal_pairs(sq: int, sk: int) -> int:
    mask = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
    return int(mask.sum())


@pytest.mark.parametrize(
    "sq, sk, expected",
    [
        (4, 4, 10),  # 1 + 2 + 3 + 4, not 4 * 4 / 2 = 8
        (1, 1, 1),
        (2, 4, 7),  # bottom-right aligned: rows see 3 and 4 keys (KV-cache decoding)
        (1, 5, 5),  # one new token sees the whole cache
        (4, 2, 3),  # more queries than keys: rows 0 and 1 see nothing, then 1 and 2 keys
        (0, 3, 0),
        (3, 0, 0),
    ],
)
def test_causal_pairs_hand_computed(sq, sk, expected):
    assert flops.causal_pairs(sq, sk) == expected


def test_causal_pairs_match_the_mask_for_all_small_shapes():
    for sq in range(0, 13):
        for sk in range(0, 13):
            assert flops.causal_pairs(sq, sk) == brute_force_causal_pairs(sq, sk), (sq, sk)


def test_causal_pairs_large_even_length_is_exactly_half_plus_diagonal():
    s = 16384
    assert flops.causal_pairs(s, s) == s * (s + 1) // 2


def test_attention_flops_causal_fwd_and_fwd_bwd():
    # B=2, S=4 causal: 2 * 10 pairs; 8 heads of 16: 4 * 16 FLOPs per pair and head.
    case = attention_case(4, batch=2, heads_q=8, heads_kv=8, head_dim=16)
    assert case.pairs() == 20
    assert case.flops("fwd") == 4 * 16 * 20 * 8 == 10240
    assert case.flops("fwd+bwd") == 3.5 * 10240  # backward = 2.5 x forward (5 matmuls vs 2)
    assert flops.attention_flops(20, 8, 16, "bwd") == 2.5 * 10240


def test_gqa_changes_bytes_not_flops():
    mha = attention_case(8, batch=1, heads_q=4, heads_kv=4, head_dim=2)
    gqa = attention_case(8, batch=1, heads_q=4, heads_kv=1, head_dim=2)
    assert mha.flops("fwd") == gqa.flops("fwd") == 4 * 2 * 36 * 4  # 36 = 1 + ... + 8 pairs, 4 query heads
    # q/out: 8 * 4 * 2 = 64 elements; k/v: 8 * Hkv * 2 elements; lse: 4 * 8 rows of 4 bytes; fp32.
    assert gqa.bytes("fwd", 4) == (2 * 64 + 2 * 16) * 4 + 32 * 4 == 768
    assert mha.bytes("fwd", 4) == (2 * 64 + 2 * 64) * 4 + 32 * 4 == 1152


def test_media_pairs_immediate_and_all_previous():
    index = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1]])
    assert flops.media_pairs(index, 64, only_immediate=True) == 6 * 64  # S * L over tokens with an image
    assert flops.media_pairs(index, 64, only_immediate=False) == (3 * 1 + 3 * 2) * 64
    assert flops.media_pairs(index.int(), 64) == 384
    assert flops.attention_flops(384, 2, 8, "fwd") == 4 * 8 * 384 * 2 == 24576


def test_media_case_work_is_s_times_l_independent_of_image_count():
    # 32 tokens of text before the first image do no work; every other token sees exactly L = 64 keys.
    few, many = media_case(2048, 8), media_case(2048, 32)
    assert few.pairs() == many.pairs() == (2048 - 32) * 64
    assert few.flops("fwd") == many.flops("fwd") == 4 * 128 * (2048 - 32) * 64 * 16
    assert many.score_elements == 4 * few.score_elements  # what a dense mask scores instead


def test_media_case_index_is_monotone_with_leading_text():
    index = media_case(512, 4).media_index()
    assert index.shape == (1, 512)
    assert (index[0, :32] == -1).all() and index[0, 32] == 0 and index[0, -1] == 3
    assert (index[0, 1:] >= index[0, :-1]).all()


def test_perceiver_flops_and_bytes():
    case = perceiver_case(256, images=4, head_dim=96, width=768)  # 8 heads, 64 latents over 256 + 64 keys
    assert (case.heads_q, case.seq_q, case.seq_k) == (8, 64, 320)
    assert case.pairs() == 4 * 64 * 320
    assert case.flops("fwd") == 4 * 96 * 4 * 64 * 320 * 8
    q = 4 * 64 * 8 * 96
    kv = 4 * 320 * 8 * 96
    lse = 4 * 8 * 64
    assert case.bytes("fwd", 2) == (2 * q + 2 * kv) * 2 + 4 * lse
    assert case.bytes("fwd+bwd", 2) == (2 * q + 2 * kv) * 2 + 4 * lse + (4 * q + 4 * kv) * 2 + 4 * lse


def test_attention_bytes_by_direction():
    assert flops.attention_bytes(10, 4, 3, 2, "fwd") == (20 + 8) * 2 + 12 == 68
    assert flops.attention_bytes(10, 4, 3, 2, "bwd") == (40 + 16) * 2 + 12 == 124
    assert flops.attention_bytes(10, 4, 3, 2, "fwd+bwd") == 192
    assert flops.attention_bytes(10, 4, 3, 2, "fwd", extra_bytes=5) == 73


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="direction"):
        flops.attention_flops(1, 1, 1, "backward")
    with pytest.raises(ValueError, match="media_index"):
        flops.media_pairs(torch.zeros(4), 64)
    with pytest.raises(ValueError, match="heads_q"):
        Case("attention", 1, 4, 4, 3, 2, 8)
    with pytest.raises(ValueError, match="seq_k"):
        Case("media_cross_attention", 1, 4, 100, 2, 2, 8, num_images=2, latents_per_media=64)
