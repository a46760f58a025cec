"""Bad inputs raise clear errors that name the argument (one test per case)."""

import pytest
import torch

from flamingo_fast import ops


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _good():
    """Valid attention inputs: q (2, 5, 4, 16), k/v (2, 6, 2, 16)."""
    return _t(2, 5, 4, 16), _t(2, 6, 2, 16), _t(2, 6, 2, 16)


def _good_media():
    """Valid media inputs: 3 images of 2 latents."""
    q, _, _ = _good()
    media_index = torch.tensor([[-1, 0, 0, 1, 2], [0, 0, 1, 1, 1]])
    return q, _t(2, 6, 2, 16), _t(2, 6, 2, 16), media_index


def _raises(error, words, fn, *args, **kwargs):
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_q_not_a_tensor():
    _, k, v = _good()
    _raises(TypeError, ["q", "torch.Tensor"], ops.attention, [[1.0]], k, v)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_rank_must_be_4(name):
    args = dict(zip("qkv", _good()))
    args[name] = args[name][0]
    _raises(ValueError, [name, "rank 4"], ops.attention, args["q"], args["k"], args["v"])


def test_batch_mismatch():
    q, k, v = _good()
    _raises(ValueError, ["k", "batch"], ops.attention, q, k[:1], v[:1])


def test_head_dim_mismatch():
    q, k, v = _good()
    _raises(ValueError, ["k", "head_dim"], ops.attention, q, k[..., :8], v[..., :8])


def test_query_heads_not_multiple_of_kv_heads():
    q, _, _ = _good()
    k, v = _t(2, 6, 3, 16), _t(2, 6, 3, 16)
    _raises(ValueError, ["q heads", "multiple", "k/v heads"], ops.attention, q, k, v)


def test_k_v_shape_mismatch():
    q, k, v = _good()
    _raises(ValueError, ["k and v", "same shape"], ops.attention, q, k, v[:, :5])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_unsupported_dtype(dtype):
    q, k, v = _good()
    _raises(TypeError, ["q", "dtype", "float32"], ops.attention, q.to(dtype), k, v)


def test_dtype_mismatch():
    q, k, v = _good()
    _raises(TypeError, ["v", "dtype"], ops.attention, q, k, v.double())


def test_different_devices():
    q, k, v = _good()
    _raises(ValueError, ["k", "device", "meta"], ops.attention, q, k.to("meta"), v.to("meta"))


def test_attention_without_keys():
    q, k, v = _good()
    _raises(ValueError, ["k and v", "at least one key"], ops.attention, q, k[:, :0], v[:, :0])


def test_causal_must_be_bool():
    _raises(TypeError, ["causal", "bool"], ops.attention, *_good(), causal="yes")


def test_scale_must_be_a_number():
    _raises(TypeError, ["scale", "float"], ops.attention, *_good(), scale=torch.tensor(0.5))


def test_perceiver_heads_mismatch():
    q, k, v = _good()
    _raises(ValueError, ["k has 2 heads", "q has 4"], ops.perceiver_attention, q, k, v)


def test_media_index_wrong_rank():
    q, k, v, media_index = _good_media()
    _raises(ValueError, ["media_index", "rank 2"], ops.media_cross_attention, q, k, v, media_index[0], 2)


def test_media_index_wrong_shape():
    q, k, v, media_index = _good_media()
    _raises(ValueError, ["media_index", "shape"], ops.media_cross_attention, q, k, v, media_index[:, :4], 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.bool])
def test_media_index_wrong_dtype(dtype):
    q, k, v, media_index = _good_media()
    _raises(TypeError, ["media_index", "int32", "int64"], ops.media_cross_attention, q, k, v, media_index.to(dtype), 2)


def test_media_index_other_device():
    q, k, v, media_index = _good_media()
    _raises(ValueError, ["media_index", "device"], ops.media_cross_attention, q, k, v, media_index.to("meta"), 2)


def test_media_index_decreasing():
    q, k, v, media_index = _good_media()
    media_index[1, 3] = 0
    _raises(ValueError, ["media_index", "non-decreasing", "row 1"], ops.media_cross_attention, q, k, v, media_index, 2)


def test_media_index_below_minus_one():
    q, k, v, media_index = _good_media()
    media_index[0, 0] = -2
    _raises(ValueError, ["media_index", ">= -1"], ops.media_cross_attention, q, k, v, media_index, 2)


def test_media_index_past_the_images():
    q, k, v, media_index = _good_media()
    media_index[1, 4] = 3  # only images 0..2 are supplied (6 keys / 2 latents)
    _raises(ValueError, ["media_index", "image 3", "only 3 images"], ops.media_cross_attention, q, k, v, media_index, 2)


def test_keys_not_multiple_of_latents_per_media():
    q, k, v, media_index = _good_media()
    _raises(ValueError, ["latents_per_media=4", "multiple"], ops.media_cross_attention, q, k, v, media_index, 4)


@pytest.mark.parametrize("latents", [0, -2, 2.0, True])
def test_latents_per_media_must_be_positive_int(latents):
    q, k, v, media_index = _good_media()
    _raises(ValueError, ["latents_per_media", "positive int"], ops.media_cross_attention, q, k, v, media_index, latents)


def test_only_immediate_must_be_bool():
    q, k, v, media_index = _good_media()
    _raises(TypeError, ["only_immediate", "bool"], ops.media_cross_attention, q, k, v, media_index, 2, only_immediate=1)


def test_check_media_index_values_helper():
    # The exported helper lets a model check media_index once per batch (e.g. on CUDA, where the op skips it).
    media_index = torch.tensor([[0, 1, 0]])
    _raises(ValueError, ["non-decreasing"], ops.check_media_index_values, media_index, 2)
    ops.check_media_index_values(torch.tensor([[-1, 0, 1, 1]]), 2)
