"""Public attention ops (BSHD layout) as torch.library custom ops with cuda / torch / reference backends.

    attention(q, k, v, causal=True, scale=None, backend=None)
    media_cross_attention(q, k, v, media_index, latents_per_media=64, only_immediate=True, backend=None)
    media_span_attention(q, k, v, spans: MediaSpans, scale=None, backend=None)
    perceiver_attention(q, k, v, scale=None, backend=None)

backend None picks automatically ("cuda" where the fused kernels support the tensors, else "torch");
the environment variable FLAMINGO_FAST_BACKEND overrides the automatic choice.
"""

from flamingo_fast.ops.attention_op import attention
from flamingo_fast.ops.backends import BACKENDS, ENV_VAR, available_backends, resolve_backend
from flamingo_fast.ops.cuda_backend import unsupported_reason as cuda_unsupported_reason
from flamingo_fast.ops.media_cross_attention_op import media_cross_attention
from flamingo_fast.ops.media_span_op import media_span_attention
from flamingo_fast.ops.media_spans import ImageGroupState, MediaSpans, continue_image_groups
from flamingo_fast.ops.perceiver_attention_op import perceiver_attention
from flamingo_fast.ops.validation import check_media_index_values

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "ImageGroupState",
    "MediaSpans",
    "attention",
    "available_backends",
    "check_media_index_values",
    "continue_image_groups",
    "cuda_unsupported_reason",
    "media_cross_attention",
    "media_span_attention",
    "perceiver_attention",
    "resolve_backend",
]
