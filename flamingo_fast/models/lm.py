"""Language model: a Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA, untied head) plus the 2 Flamingo tokens.

Parameter names follow Hugging Face's `LlamaForCausalLM` with the `model.` prefix dropped, so Llama
safetensors map one-to-one:

    embed_tokens.weight                     (V, D)    base vocabulary, frozen in Flamingo training
    layers.i.input_layernorm.weight
    layers.i.self_attn.{q,k,v,o}_proj.weight
    layers.i.post_attention_layernorm.weight
    layers.i.mlp.{gate,up,down}_proj.weight
    norm.weight
    lm_head.weight                          (V, D)
    special_embed.weight                    (2, D)    `<image>` (id V) and `<|endofchunk|>` (id V + 1)
    special_head.weight                     (2, D)    their output rows; logits = [lm_head(h), special_head(h)]
                                                      (absent with LMConfig.special_logits=False: logits (V))

The two special rows live in their own modules (as OpenFlamingo's decoupled embedding / linear) so that
exactly they train while the base rows stay frozen, without masking gradients.

RoPE uses the Hugging Face `rotate_half` convention (the layout of HF Llama q/k weights). Self-attention
goes through `flamingo_fast.ops.attention(causal=True)`; with a `KVCache`, new queries attend to all
cached keys (bottom-right aligned causal mask). `before_block(i, x) -> x` runs before block i: Flamingo
inserts its gated cross-attention layers there.

Left-padded batches (generation with prompts of different lengths): `key_padding_mask` (B, K) marks the
padding keys (True, as in torch.nn.MultiheadAttention), K = cached length + new tokens, and every row's
RoPE positions start at 0 at its first real token (or pass `positions`), so a row's result is the same as
running it alone. Self-attention then runs SDPA with an explicit mask; without a mask (training
right-pads, where causal masking suffices) it keeps the `ops.attention` path.

Packed rows (training with sequence packing): `document_ids` (B, S), non-decreasing along each row, makes
each token attend only to earlier tokens of its own document (`ops.attention(document_ids=...)`), and RoPE
positions restart at 0 at every document's first token unless `positions` are passed.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from flamingo_fast.models.config import LMConfig
from flamingo_fast.ops import attention

BeforeBlock = Callable[[int, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before scaling, as HF Llama does (bit-compatible in bf16).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_positions: int) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    low_freq_wavelen = original_max_positions / low_freq_factor
    high_freq_wavelen = original_max_positions / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 llama3: Optional[tuple[float, float, float, int]] = None):
    """positions (S,) or per row (B, S) -> cos, sin (1 or B, S, 1, head_dim) for BSHD tensors.
    `llama3`: LMConfig.rope_llama3 (Llama 3.1 frequency scaling), None for plain RoPE.

    Computed on the fly rather than stored as buffers: no buffer to re-initialise after building on the
    meta device, and torch.compile folds it into the graph."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    if llama3 is not None:
        inv_freq = llama3_inv_freq(inv_freq, *llama3)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    if emb.dim() == 2:
        emb = emb[None]
    return emb.cos().to(dtype)[:, :, None, :], emb.sin().to(dtype)[:, :, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Keep x's dtype: under autocast cos/sin may be fp32 while the projections are bf16, and the attention
    # op (not an autocast op) needs q, k and v in one dtype.
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer, (B, max_length, Hkv, d), and how many positions are filled.

    Each layer's `update` writes its new k/v at positions [length, length + S) and returns the filled prefix;
    the LM calls `advance(S)` once all layers have run."""

    def __init__(self, layers: int, batch_size: int, max_length: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        shape = (batch_size, max_length, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.batch_size, self.max_length = batch_size, max_length
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[1]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} positions needed, cache holds max_length={self.max_length}")
        self.keys[layer][:, self.length:end] = k
        self.values[layer][:, self.length:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (B',) in that order, e.g. the surviving beams of beam search."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.batch_size = rows.shape[0]


def padding_attention_mask(key_padding_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """key_padding_mask (B, K) bool, True = padding -> (B, 1, S, K) bool, True = may attend, for the
    S = num_queries newest positions: causal, no padding keys, and each query always sees itself, so that
    a padding query never has an empty row (its NaN would leak through 0-weighted values)."""
    k = key_padding_mask.shape[1]
    key = torch.arange(k, device=key_padding_mask.device)
    query = torch.arange(k - num_queries, k, device=key_padding_mask.device)[:, None]
    mask = (key <= query) & ~key_padding_mask[:, None, :]
    return (mask | (key == query))[:, None]


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) ids of packed rows -> (B, S) RoPE positions restarting at 0 at each document's first token."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def padded_positions(key_padding_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """(B, S) RoPE positions of the S newest tokens: each row counts only its real tokens, from 0."""
    count = (~key_padding_mask).long().cumsum(1)[:, -num_queries:]
    return (count - 1).clamp(min=0)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache: Optional[KVCache] = None, mask: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mask: None (causal) or (B, 1, S, K) bool from `padding_attention_mask`; document_ids: packed rows."""
        b, s, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, s, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, s, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if mask is None:
            out = attention(q, k, v, causal=True, document_ids=document_ids)
        else:  # the ops take no arbitrary mask; padded batches are an inference-only case
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, enable_gqa=self.heads != self.kv_heads).transpose(1, 2)
        return self.o_proj(out.reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache: Optional[KVCache] = None, mask: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask, document_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.special_embed = nn.Embedding(2, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # None when the special tokens are input-only (LMConfig.special_logits).
        self.special_head = nn.Linear(cfg.dim, 2, bias=False) if cfg.special_logits else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Llama's initialiser: N(0, 0.02) for every matrix, ones for the norms.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    @property
    def vocab_size(self) -> int:
        """Full vocabulary including the 2 special tokens."""
        return self.cfg.vocab_size + 2

    def new_cache(self, batch_size: int, max_length: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                  device: Optional[torch.device] = None) -> KVCache:
        weight = self.embed_tokens.weight
        return KVCache(self.cfg.layers, batch_size, max_length or self.cfg.max_seq_len, self.cfg.n_kv_heads,
                       self.cfg.head_dim, dtype or weight.dtype, device or weight.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) ids in [0, V + 2) -> (B, S, D); ids >= V read the trainable special rows."""
        base = self.cfg.vocab_size
        is_special = (input_ids >= base).unsqueeze(-1)
        x_base = self.embed_tokens(input_ids.clamp(max=base - 1))
        x_special = self.special_embed((input_ids - base).clamp(min=0, max=1))
        return torch.where(is_special, x_special.to(x_base.dtype), x_base)

    def hidden_states(
        self,
        x: torch.Tensor,
        cache: Optional[KVCache] = None,
        before_block: Optional[BeforeBlock] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Embeddings (B, S, D) -> final-normed hidden states (B, S, D). key_padding_mask (B, cached + S),
        positions (S,) or (B, S) and document_ids (B, S): see the module docstring."""
        b, s = x.shape[:2]
        start = 0 if cache is None else cache.length
        self._check_padding(b, s, start + s, key_padding_mask, positions, x.device)
        if document_ids is not None:
            self._check_documents(b, s, document_ids, cache, key_padding_mask, x.device)
        if positions is None:
            if document_ids is not None:
                positions = document_positions(document_ids)
            else:
                positions = (torch.arange(start, start + s, device=x.device) if key_padding_mask is None
                             else padded_positions(key_padding_mask, s))
        mask = None if key_padding_mask is None else padding_attention_mask(key_padding_mask, s)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype, self.cfg.rope_llama3)
        for i, layer in enumerate(self.layers):
            if before_block is not None:
                x = before_block(i, x)
            x = layer(x, cos, sin, cache, mask, document_ids)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    @staticmethod
    def _check_padding(b: int, s: int, keys: int, key_padding_mask, positions, device) -> None:
        if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (b, keys)
                                             or key_padding_mask.device != device):
            raise ValueError(f"key_padding_mask must be a bool ({b}, {keys}) tensor (cached + new positions) on "
                             f"{device}, got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)} on "
                             f"{key_padding_mask.device}")
        if positions is not None and (positions.is_floating_point() or positions.shape not in ((s,), (b, s))
                                      or positions.device != device):
            raise ValueError(f"positions must be an integer ({s},) or ({b}, {s}) tensor on {device}, got "
                             f"{positions.dtype} {tuple(positions.shape)} on {positions.device}")

    @staticmethod
    def _check_documents(b: int, s: int, document_ids, cache, key_padding_mask, device) -> None:
        if not torch.is_tensor(document_ids) or document_ids.dtype not in (torch.int32, torch.int64):
            got = document_ids.dtype if torch.is_tensor(document_ids) else type(document_ids).__name__
            raise TypeError(f"document_ids must be an int32/int64 tensor ({b}, {s}), got {got}")
        if document_ids.shape != (b, s) or document_ids.device != device:
            raise ValueError(f"document_ids must be ({b}, {s}) on {device}, got {tuple(document_ids.shape)} on "
                             f"{document_ids.device}")
        if cache is not None or key_padding_mask is not None:
            raise ValueError("document_ids (packed training rows) cannot be combined with a KV cache or "
                             "key_padding_mask (generation)")

    @property
    def output_size(self) -> int:
        """Width of the logits: V + 2, or V when the special tokens are input-only."""
        return self.cfg.vocab_size + 2 * int(self.special_head is not None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.special_head is None:
            return self.lm_head(h)
        return torch.cat([self.lm_head(h), self.special_head(h)], dim=-1)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        before_block: Optional[BeforeBlock] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """input_ids (B, S) long or inputs_embeds (B, S, D) -> logits (B, S, V + 2); key_padding_mask and
        positions for left-padded rows, document_ids for packed rows (module docstring)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, S) and inputs_embeds (B, S, D)")
        if input_ids is not None:
            if not torch.is_tensor(input_ids) or input_ids.dtype != torch.long:
                got = input_ids.dtype if torch.is_tensor(input_ids) else type(input_ids).__name__
                raise TypeError(f"input_ids must be a torch.long tensor, got {got}")
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be 2-D (B, S), got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.embed(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.dim:
            raise ValueError(f"inputs_embeds must be (B, S, {self.cfg.dim}), got shape {tuple(inputs_embeds.shape)}")
        if cache is not None and cache.batch_size != inputs_embeds.shape[0]:
            raise ValueError(f"cache was made for batch size {cache.batch_size}, got a batch of {inputs_embeds.shape[0]}")
        return self.logits(self.hidden_states(inputs_embeds, cache, before_block, key_padding_mask, positions,
                                              document_ids))
