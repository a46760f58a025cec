"""CPU checks of the CUDA kernels' Python entry points in flamingo_fast._C: they exist in a CUDA build and reject
bad arguments with errors that name the argument (the numerical checks need a GPU: test_kernels_gpu.py)."""

import re
import shutil

import pytest
import torch

from flamingo_fast import native

_C = native.load()
cuda_build = _C is not None and native.build_info()["cuda"]
pytestmark = pytest.mark.skipif(
    not cuda_build or shutil.which("nvcc") is None, reason="flamingo_fast._C is not a CUDA build"
)


def bshd(*shape, dtype=torch.bfloat16):
    return torch.zeros(*shape, dtype=dtype)


# The argument names and order that flamingo_fast/ops/cuda_backend.py relies on.
SIGNATURES = {
    "attention_fwd": ["q", "k", "v", "causal", "scale"],
    "attention_bwd": ["dout", "q", "k", "v", "out", "lse", "causal", "scale"],
    "media_cross_attention_fwd": ["q", "k", "v", "media_index", "latents_per_media", "only_immediate", "scale"],
    "media_cross_attention_bwd": ["dout", "q", "k", "v", "out", "lse", "media_index", "latents_per_media",
                                  "only_immediate", "scale"],
    "perceiver_attention_fwd": ["q", "k", "v", "scale"],
    "perceiver_attention_bwd": ["dout", "q", "k", "v", "out", "lse", "scale"],
    "perceiver_kv_input_fwd": ["media", "latents", "time_emb", "tokens_per_frame", "media_weight", "media_bias",
                               "latents_weight", "latents_bias", "eps"],
    "perceiver_kv_input_bwd": ["d_kv", "media", "latents", "time_emb", "tokens_per_frame", "media_weight",
                               "media_bias", "latents_weight", "latents_bias", "eps"],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_entry_point_signatures(name):
    first_line = getattr(_C, name).__doc__.splitlines()[0]
    assert first_line.startswith(name + "(")
    arguments = re.findall(r"(\w+): ", first_line[len(name) + 1:])
    assert arguments == SIGNATURES[name]


def test_rank_errors_name_the_argument():
    q = bshd(1, 8, 2, 64)
    with pytest.raises(ValueError, match=r"^q must be a 4-D tensor"):
        _C.attention_fwd(q[0], q, q, True, 0.1)
    with pytest.raises(ValueError, match=r"^media must be a 3-D tensor"):
        _C.perceiver_kv_input_fwd(q, q, None, 1, *(torch.zeros(64) for _ in range(4)), 1e-5)


def test_cpu_tensors_are_rejected():
    q = bshd(1, 8, 2, 64)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        _C.attention_fwd(q, q, q, True, 0.1)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        _C.media_cross_attention_bwd(q, q, q, q, q, torch.zeros(1, 2, 8), torch.zeros(1, 8, dtype=torch.int32),
                                     64, True, 0.1)
    media = torch.zeros(2, 10, 64)
    with pytest.raises(ValueError, match="media must be a CUDA tensor"):
        _C.perceiver_kv_input_fwd(media, media, None, 1, *(torch.zeros(64) for _ in range(4)), 1e-5)
