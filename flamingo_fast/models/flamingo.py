"""Flamingo: frozen ViT -> Perceiver Resampler -> gated cross-attention layers inside a frozen Llama-style LM.

Module tree (names the trainer and the checkpoint converters rely on):

    vision          VisionTransformer (vision.py; CLIP names: embeddings, pre_layrnorm,
                    encoder.layers.i, post_layernorm)                                       frozen
    resampler       PerceiverResampler (perceiver.py: latents, frame_embs, media_proj,
                    layers.i.{attn,ffw}, norm)                                              trainable
    lm              LanguageModel (lm.py; Llama names: embed_tokens, layers.i, norm, lm_head)  frozen,
                    except lm.special_embed and lm.special_head (the 2 rows of `<image>`,
                    `<|endofchunk|>`)                                                       trainable
    xattn_layers    ModuleDict {str(i): GatedXAttnDense} for LM block i in cfg.xattn_layer_ids (i % every == 0),
                    run right before lm.layers[i] (xattn.py: attn.{norm,to_q,to_kv,to_out},
                    attn_gate, ffw.{norm,fc1,fc2}, ffw_gate)                                trainable

FSDP / activation-checkpoint units (`shard_units()`): each vision block, the resampler, each LM block
together with the xattn layer in front of it (one list, for `fully_shard([block, xattn])`), then the root.

Forward (one training step):
    latents = resampler(vision(images))                         (B, T_img, n_latents, Dm)
    media_index = cumsum(input_ids == <image>) - 1              (B, S), -1 before a row's first image
    logits = lm(input_ids, before_block=xattn_layers[i](x, media_index, latents))

Label convention: `labels` (B, S) are aligned with `input_ids` (usually a copy with -100 at ignored
positions); the shift happens inside: the logits at position t are scored against labels[t + 1]. Positions
whose label is -100, the `<image>` token, or `cfg.pad_token_id` are ignored; the loss is the mean over the
remaining positions (0 when there are none).

Freezing (`set_trainable`): "flamingo" (default; paper): resampler + xattn + the 2 special-token rows;
"all": everything; "lm": the whole LM only (text pretraining); "vision": the vision encoder only
(pretraining it with an external head).

Generation: `encode_images(images)` -> latents, `forward(..., latents=latents)` skips the vision encoder;
`new_cache(batch, max_length)` -> FlamingoCache. Pass the images (or latents) with the prompt on the first
cached call: each xattn layer's keys/values are computed once and kept in `cache.media_kv` ({layer name:
(k, v)}), the LM's keys/values in `cache.lm` (KVCache), and `cache.media_state` continues the media spans, so
later calls pass only the new token ids. Left-padded rows (prompts of different lengths) pass
`key_padding_mask` (B, cached + S), True at padding, to the LM (lm.py); media cross-attention needs nothing
more, since a padding token is no `<image>` and so never moves a row's media_index.

Packed rows (sequence packing, training): pass `document_ids` (B, S), non-decreasing per row (a document is a
run of one id), `images` as the batch's flat list (N, F, C, H, W) (or `latents` (N, n_latents, Dm)) and
`media_index` (B, S) indexing that flat list, -1 before a token's own document's first image. Self-attention
stays within each document, RoPE positions restart per document (unless `positions` are given), and each
xattn layer sees the batch as one long row of B * S queries over the N images, so the media op needs no
per-row image padding.

Llama 3.2 Vision (Mllama) is this model configured (config.py's `mllama-11b` / `mllama-90b`): `vision` is the
tiled encoder (tiled_vision.py; images (B, T_img, max_tiles, C, H, W) with `aspect_ratio_ids` (B, T_img), 0 for a
padding image), `projector` (Linear, transformers' multi_modal_projector) replaces the resampler and maps every
tile token to the LM width, each image's valid keys are its real tiles' tokens, and tokens see the images of
their latest group of consecutive `<image>` tokens (ops.MediaSpans). The LM blocks and xattn layers are the same
classes (xattn.py says which switches differ).

Input checks: shapes, dtypes and devices are checked on every call; checks that read tensor values (token
ids in range, `<image>` count vs T_img, media_index range) run in eager mode only, so that
`torch.compile(fullgraph=True)` traces without graph breaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from flamingo_fast.models.config import TRAINABLE_MODES, FlamingoConfig
from flamingo_fast.models.lm import BeforeBlock, KVCache, LanguageModel
from flamingo_fast.models.perceiver import PerceiverResampler
from flamingo_fast.models.tiled_vision import TiledVisionTransformer
from flamingo_fast.models.vision import VisionTransformer
from flamingo_fast.models.xattn import GatedXAttnDense, Media
from flamingo_fast.ops.media_spans import ImageGroupState, MediaSpans, continue_image_groups
from flamingo_fast.ops.validation import holds_values


@dataclass
class FlamingoOutput:
    logits: torch.Tensor  # (B, S, vocab_size)
    loss: Optional[torch.Tensor] = None  # scalar fp32, None without labels


# A pytree node, so FSDP's root hooks and torch.compile see the tensors inside (as with HF's ModelOutput).
pytree.register_dataclass(FlamingoOutput)


@dataclass
class FlamingoCache:
    """Decoding state: the LM's KV cache, each xattn layer's media keys/values (computed once from the
    images), and per row how many `<image>` tokens have been consumed (so media_index continues)."""

    lm: KVCache
    media_kv: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None
    num_media: int = 0  # T_img of the cached media
    # Where the media spans continue (Flamingo.media_for_tokens): (B,) images seen, or Mllama's ImageGroupState.
    media_state: Optional[torch.Tensor | ImageGroupState] = None
    key_count: Optional[torch.Tensor] = None  # (B, T_img) valid keys per cached image (tiled vision)

    @property
    def length(self) -> int:
        return self.lm.length


class Flamingo(nn.Module):
    def __init__(self, cfg: FlamingoConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vision = TiledVisionTransformer(cfg.vision) if cfg.vision.kind == "tiled" else VisionTransformer(cfg.vision)
        # The connector: exactly one of resampler (Flamingo) and projector (Mllama) exists.
        self.resampler = (PerceiverResampler(cfg.resampler, media_dim=cfg.vision.width)
                          if cfg.connector == "resampler" else None)
        self.projector = nn.Linear(cfg.vision.output_dim, cfg.lm.dim) if cfg.connector == "projector" else None
        self.lm = LanguageModel(cfg.lm)
        self.xattn_layers = nn.ModuleDict(
            {
                str(i): GatedXAttnDense(cfg.xattn, cfg.lm.dim, cfg.media_dim, cfg.keys_per_media)
                for i in cfg.xattn_layer_ids
            }
        )
        self.set_trainable("flamingo")

    # -- structure --------------------------------------------------------------------------------------------
    def set_trainable(self, mode: str = "flamingo") -> "Flamingo":
        """Choose which parameters require grad: "flamingo" | "all" | "lm" | "vision" (module docstring)."""
        if mode not in TRAINABLE_MODES:
            raise ValueError(f"mode must be one of {TRAINABLE_MODES}, got {mode!r}")
        self.requires_grad_(mode == "all")
        if mode == "flamingo":
            for module in (self.connector, self.xattn_layers, self.lm.special_embed, self.lm.special_head):
                if module is not None:
                    module.requires_grad_(True)
        elif mode == "lm":
            self.lm.requires_grad_(True)
        elif mode == "vision":
            self.vision.requires_grad_(True)
        return self

    @torch.no_grad()
    def init_weights(self) -> "Flamingo":
        """Initialise every parameter again, e.g. after building on the meta device and `to_empty(...)`.

        Children are reset before their parents, so a parent's own scheme (the LM's N(0, 0.02)) wins
        over the PyTorch defaults of its nn.Linear children."""
        for module in reversed(list(self.modules())):
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return self

    def shard_units(self) -> list[list[nn.Module]]:
        """Groups of modules to wrap as one FSDP unit each (then wrap the root): vision blocks, the connector
        (resampler or projector), and each LM block with the xattn layer that runs before it."""
        units: list[list[nn.Module]] = [[layer] for layer in self.vision_blocks]
        units.append([self.connector])
        for i, block in enumerate(self.lm.layers):
            units.append([self.xattn_layers[str(i)], block] if str(i) in self.xattn_layers else [block])
        return units

    @property
    def connector(self) -> nn.Module:
        """The resampler (Flamingo) or the projector (Mllama)."""
        return self.resampler if self.resampler is not None else self.projector

    @property
    def vision_blocks(self) -> list[nn.Module]:
        """The vision encoder's layers (local then global for the tiled encoder)."""
        if isinstance(self.vision, TiledVisionTransformer):
            return [*self.vision.transformer.layers, *self.vision.global_transformer.layers]
        return list(self.vision.encoder.layers)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part; "resampler" / "projector": the connector that exists (the other is 0)."""
        def count(module: Optional[nn.Module], trainable_only: bool = False) -> int:
            if module is None:
                return 0
            return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

        return {
            "total": count(self),
            "trainable": count(self, trainable_only=True),
            "lm": count(self.lm),
            "vision": count(self.vision),
            "resampler": count(self.resampler),
            "projector": count(self.projector),
            "xattn": count(self.xattn_layers),
        }

    # -- media ------------------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor, aspect_ratio_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images (B, T_img, F, C, H, W) -> latents (B, T_img, n_latents, Dm). Tiled vision: F = max_tiles and
        aspect_ratio_ids (B, T_img) -> media tokens (B, T_img, max_tiles * tokens_per_tile, lm.dim), zero for
        padding images (id 0)."""
        self._check_images(images, aspect_ratio_ids=aspect_ratio_ids)
        b, t, f = images.shape[:3]
        if isinstance(self.vision, TiledVisionTransformer):
            ids = aspect_ratio_ids.reshape(b * t)
            features = self.vision(images.reshape(b * t, *images.shape[2:]), ids)
            tokens = self.projector(features).view(b, t, -1, self.cfg.lm.dim)
            return tokens * (aspect_ratio_ids > 0)[:, :, None, None].to(tokens.dtype)
        features = self.vision(images.reshape(b * t * f, *images.shape[3:]))
        return self.resampler(features.view(b, t, f, *features.shape[1:]))

    def key_count(self, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """(B, T_img) valid keys per image of the tiled encoder: real tiles x tokens per tile."""
        return self.vision.tile_counts(aspect_ratio_ids) * self.cfg.vision.tokens_per_tile

    def media_for_tokens(self, input_ids: torch.Tensor, state=None, key_count: Optional[torch.Tensor] = None):
        """What each token of `input_ids` sees, for the xattn layers, continuing `state` (None at a sequence's
        start; FlamingoCache.media_state) -> (media, state after these tokens).

        media_span "index": media_index (B, S) (module docstring), state = images seen (B,). "groups" (Mllama):
        MediaSpans over images at a stride of keys_per_media with `key_count` (B, T_img) valid keys each."""
        is_image = input_ids == self.cfg.image_token_id
        if self.cfg.xattn.media_span == "index":
            media_index = self.compute_media_index(input_ids, state)
            return media_index, media_index[:, -1] + 1
        start, end, state = continue_image_groups(is_image, state if state is not None else ImageGroupState.initial(input_ids))
        if key_count is None:  # no images: every span is empty
            key_count = input_ids.new_zeros(input_ids.shape[0], 0)
        return MediaSpans.strided(start, end, key_count, self.cfg.keys_per_media), state

    def media_kv(self, latents: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each xattn layer's keys/values for these latents, keyed like `xattn_layers`."""
        return {name: layer.media_kv(latents) for name, layer in self.xattn_layers.items()}

    def new_cache(self, batch_size: int, max_length: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                  device: Optional[torch.device] = None) -> FlamingoCache:
        return FlamingoCache(lm=self.lm.new_cache(batch_size, max_length, dtype, device))

    def compute_media_index(self, input_ids: torch.Tensor, start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """cumsum(input_ids == <image>) - 1 per row (+ `start`, images already seen, (B,))."""
        count = torch.cumsum(input_ids == self.cfg.image_token_id, dim=1)
        if start is not None:
            count = count + start[:, None]
        return count - 1

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        images: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        media_index: Optional[torch.Tensor] = None,
        *,
        latents: Optional[torch.Tensor] = None,
        cache: Optional[FlamingoCache] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
        aspect_ratio_ids: Optional[torch.Tensor] = None,
    ) -> FlamingoOutput:
        """input_ids (B, S) long; images (B, T_img, F, C, H, W) or None; or precomputed `latents`
        (B, T_img, n_latents, Dm) from `encode_images`. With a `cache`, media given on the first call are
        kept (as per-layer keys/values) for the following calls, and media_index continues across calls.
        key_padding_mask / positions: left-padded rows, passed to the LM; document_ids: packed rows, with
        images / latents as the batch's flat list (module docstring). Tiled vision (Mllama): images
        (B, T_img, max_tiles, C, H, W) with aspect_ratio_ids (B, T_img), also with `latents` (for the key
        counts); the key counts are kept in the cache."""
        self._check_ids(input_ids)
        b = input_ids.shape[0]
        if images is not None and latents is not None:
            raise ValueError("pass images or latents, not both")
        tiled = isinstance(self.vision, TiledVisionTransformer)
        if document_ids is not None:  # packed: the flat media list is one row of N images for the checks below
            if tiled or self.cfg.xattn.media_span != "index":
                raise ValueError("document_ids (packed rows) need media_span='index' and the CLIP vision encoder; "
                                 "packing Mllama rows is not supported")
            images, latents = self._packed_media(input_ids, images, latents, media_index, cache)
        self._check_tiled_media(images, latents, aspect_ratio_ids)
        if media_index is not None and self.cfg.xattn.media_span != "index":
            raise ValueError("media_index is for xattn.media_span='index'; Mllama's spans come from the <image> "
                             "tokens")
        if images is not None:
            self._check_images(images, None if document_ids is not None else input_ids, aspect_ratio_ids)
        elif latents is not None:
            self._check_latents(latents, None if document_ids is not None else input_ids)
        if labels is not None:
            self._check_labels(labels, input_ids)
        if media_index is not None:
            self._check_media_index(media_index, input_ids)
        new_media = images is not None or latents is not None
        if cache is not None:
            if cache.lm.batch_size != b:
                raise ValueError(f"cache was made for batch size {cache.lm.batch_size}, input_ids has {b} rows")
            if new_media and cache.media_kv is not None:
                raise ValueError("cache already holds media; pass images/latents only on the first call")
            if cache.lm.length + input_ids.shape[1] > cache.lm.max_length:
                raise ValueError(
                    f"input_ids: {input_ids.shape[1]} more tokens overflow the cache "
                    f"({cache.lm.length} of max_length={cache.lm.max_length} used)"
                )
        if images is not None:
            latents = self.encode_images(images, aspect_ratio_ids)

        # The media state of earlier calls (decoding), so the spans continue where the cache left off.
        state = None if cache is None else cache.media_state
        num_media = latents.shape[1] if latents is not None else (cache.num_media if cache is not None else 0)
        key_count = None
        if aspect_ratio_ids is not None:
            key_count = self.key_count(aspect_ratio_ids)
        elif cache is not None:
            key_count = cache.key_count
        media_index_given = media_index is not None
        media, new_state = self.media_for_tokens(input_ids, state, key_count)
        if media_index_given:
            media = media_index
        if not torch.compiler.is_compiling():
            self._check_values(input_ids, media, num_media, media_index_given, labels)

        # All checks passed: only now update the cache.
        media_kv = None
        if cache is not None:
            if latents is not None:
                cache.media_kv, cache.num_media, cache.key_count = self.media_kv(latents), latents.shape[1], key_count
            cache.media_state = new_state
            media_kv = cache.media_kv

        logits = self.lm(input_ids, cache=None if cache is None else cache.lm,
                         before_block=self.xattn_before_block(media, latents, media_kv,
                                                              packed=document_ids is not None),
                         key_padding_mask=key_padding_mask, positions=positions, document_ids=document_ids)
        loss = None if labels is None else self.loss(logits, labels)
        return FlamingoOutput(logits=logits, loss=loss)

    def xattn_before_block(self, media: Media, latents: Optional[torch.Tensor] = None,
                           media_kv: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None,
                           packed: bool = False) -> BeforeBlock:
        """The LM's `before_block` hook: xattn layer i on these media right before LM block i. Cached
        `media_kv` wins over `latents`; with neither (no images) only the layers' gated FFW acts.
        `media`: media_index (B, S), or MediaSpans (Mllama; `media_for_tokens` gives either).

        `packed`: latents are the batch's flat list (1, N, n, Dm) and `media` is a media_index (B, S) into it. The layer
        then runs on the batch as one row of B * S tokens, sorted by media index (stable): the media ops need
        a non-decreasing index along a row, and a packed row is not (a document's text before its own first
        image, -1, follows the previous document's images). Every other op of the layer is per token, so
        sorting its input and unsorting its output is exact."""
        order = None
        if packed:
            flat_index = media.reshape(-1)
            order = torch.argsort(flat_index, stable=True)
            media, unsort = flat_index[order][None], torch.argsort(order)

        def before_block(i: int, x: torch.Tensor) -> torch.Tensor:
            name = str(i)
            if name not in self.xattn_layers:
                return x
            kv = None if media_kv is None else media_kv[name]
            if order is None:
                return self.xattn_layers[name](x, media, latents=latents, media_kv=kv)
            flat = x.reshape(-1, x.shape[-1])[order][None]
            return self.xattn_layers[name](flat, media, latents=latents, media_kv=kv)[0][unsort].view(x.shape)

        return before_block

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; labels aligned with input_ids (see the module docstring)."""
        ignore = (labels == -100) | (labels == self.cfg.image_token_id)
        if self.cfg.pad_token_id is not None:
            ignore = ignore | (labels == self.cfg.pad_token_id)
        targets = labels.masked_fill(ignore, -100)[:, 1:]
        total = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
            reduction="sum",
        )
        return total / (targets != -100).sum().clamp(min=1)

    def _packed_media(self, input_ids, images, latents, media_index, cache):
        """Packed rows: checks, and the flat media list as one row, (1, N, ...), for the shared path."""
        if cache is not None:
            raise ValueError("document_ids (packed training rows) cannot be combined with a cache (generation)")
        if media_index is None:
            raise ValueError("packed rows (document_ids given) need media_index (B, S) into the flat image list")
        if not self.cfg.xattn.only_immediate:
            raise ValueError("packed rows need xattn.only_immediate=True: with 'all previous images' a token would "
                             "also see the images of the documents packed before its own")
        for name, media, dims, shape in (("images", images, 5, "(N, F, C, H, W)"),
                                         ("latents", latents, 3, "(N, n_latents, Dm)")):
            if media is None:
                continue
            if not torch.is_tensor(media) or media.dim() != dims:
                got = tuple(media.shape) if torch.is_tensor(media) else type(media).__name__
                raise ValueError(f"packed rows take {name} as the batch's flat list {shape}, got {got}")
            if media.device != input_ids.device:
                raise ValueError(f"{name} are on {media.device} but input_ids are on {input_ids.device}")
        if images is not None:  # no image in the whole batch: as without images
            return (images[None] if images.shape[0] else None), None
        return None, (None if latents is None else latents[None])

    # -- input checks -----------------------------------------------------------------------------------------
    def _check_ids(self, input_ids) -> None:
        if not torch.is_tensor(input_ids) or input_ids.dtype != torch.long:
            got = input_ids.dtype if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise TypeError(f"input_ids must be a torch.long tensor (B, S), got {got}")
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be 2-D (B, S) with B >= 1 and S >= 1, got shape {tuple(input_ids.shape)}")

    def _check_images(self, images, input_ids: Optional[torch.Tensor] = None,
                      aspect_ratio_ids: Optional[torch.Tensor] = None) -> None:
        if not torch.is_tensor(images):
            raise TypeError(f"images must be a tensor (B, T_img, F, C, H, W), got {type(images).__name__}")
        if images.dim() != 6:
            raise ValueError(f"images must be 6-D (B, T_img, F, C, H, W), got shape {tuple(images.shape)}")
        self.vision.check_images(images)
        if images.shape[1] < 1 or images.shape[2] < 1:
            raise ValueError(f"images must have T_img >= 1 and F >= 1, got shape {tuple(images.shape)}")
        if isinstance(self.vision, TiledVisionTransformer):
            if aspect_ratio_ids is None:
                raise ValueError("images of the tiled vision encoder need aspect_ratio_ids (B, T_img)")
        elif self.resampler is not None and images.shape[2] > self.cfg.resampler.max_frames:
            raise ValueError(
                f"images has F={images.shape[2]} frames; the resampler supports at most "
                f"resampler.max_frames={self.cfg.resampler.max_frames}"
            )
        if input_ids is not None:
            if images.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"images batch size {images.shape[0]} does not match input_ids batch size {input_ids.shape[0]}"
                )
            if images.device != input_ids.device:
                raise ValueError(f"images are on {images.device} but input_ids are on {input_ids.device}")

    def _check_latents(self, latents, input_ids: Optional[torch.Tensor]) -> None:
        n, dm = self.cfg.keys_per_media, self.cfg.media_dim
        if not torch.is_tensor(latents) or not latents.is_floating_point():
            raise TypeError("latents must be a floating-point tensor (B, T_img, n_latents, Dm)")
        rows = latents.shape[0] if input_ids is None else input_ids.shape[0]
        if latents.dim() != 4 or latents.shape[2:] != (n, dm) or latents.shape[0] != rows:
            raise ValueError(f"latents must be ({rows}, T_img, {n}, {dm}), got {tuple(latents.shape)}")
        if input_ids is not None and latents.device != input_ids.device:
            raise ValueError(f"latents are on {latents.device} but input_ids are on {input_ids.device}")

    def _check_tiled_media(self, images, latents, aspect_ratio_ids) -> None:
        """aspect_ratio_ids (B, T_img) come with the images / latents of the tiled vision encoder, and only then."""
        media = images if images is not None else latents
        if (aspect_ratio_ids is not None) != (isinstance(self.vision, TiledVisionTransformer) and media is not None):
            raise ValueError("aspect_ratio_ids (B, T_img) are needed with images / latents of the tiled vision "
                             "encoder (Mllama), and only then")
        if aspect_ratio_ids is not None:
            self._check_aspect_ratio_ids(aspect_ratio_ids, media)

    def _check_aspect_ratio_ids(self, aspect_ratio_ids, media: torch.Tensor) -> None:
        if not torch.is_tensor(aspect_ratio_ids) or aspect_ratio_ids.dtype not in (torch.int32, torch.int64):
            got = aspect_ratio_ids.dtype if torch.is_tensor(aspect_ratio_ids) else type(aspect_ratio_ids).__name__
            raise TypeError(f"aspect_ratio_ids must be an int32/int64 tensor (B, T_img), got {got}")
        if aspect_ratio_ids.shape != media.shape[:2] or aspect_ratio_ids.device != media.device:
            raise ValueError(f"aspect_ratio_ids must be (B, T_img) = {tuple(media.shape[:2])} on {media.device}, got "
                             f"{tuple(aspect_ratio_ids.shape)} on {aspect_ratio_ids.device}")
        if not torch.compiler.is_compiling() and holds_values(aspect_ratio_ids):
            low, high = int(aspect_ratio_ids.min()), int(aspect_ratio_ids.max())
            if low < 0 or high > len(self.cfg.vision.aspect_ratios):
                raise ValueError(f"aspect_ratio_ids must lie in [0, {len(self.cfg.vision.aspect_ratios)}] (0 = padding "
                                 f"image), got values in [{low}, {high}]")

    @staticmethod
    def _check_no_padding_image_seen(spans: MediaSpans) -> None:
        """An <image> token must stand for a real image, not a padding slot (aspect ratio id 0, no keys): its
        tokens would see no key and get no cross-attention, silently."""
        slots = spans.key_count.shape[1]
        seen = torch.arange(slots, device=spans.end.device) < spans.end.amax(dim=1, keepdim=True).clamp(max=slots)
        bad = (seen & (spans.key_count == 0)).nonzero()
        if bad.numel():
            row, slot = bad[0].tolist()
            raise ValueError(f"input_ids: row {row}'s <image> token number {slot + 1} stands for image slot {slot}, a "
                             "padding image (aspect_ratio_id 0)")

    def _check_media_index(self, media_index, input_ids: torch.Tensor) -> None:
        if not torch.is_tensor(media_index) or media_index.dtype not in (torch.int32, torch.int64):
            got = media_index.dtype if torch.is_tensor(media_index) else type(media_index).__name__
            raise TypeError(f"media_index must be an int32/int64 tensor (B, S), got {got}")
        if media_index.shape != input_ids.shape:
            raise ValueError(f"media_index must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(media_index.shape)}")
        if media_index.device != input_ids.device:
            raise ValueError(f"media_index is on {media_index.device} but input_ids are on {input_ids.device}")

    def _check_labels(self, labels, input_ids: torch.Tensor) -> None:
        if not torch.is_tensor(labels) or labels.dtype != torch.long:
            got = labels.dtype if torch.is_tensor(labels) else type(labels).__name__
            raise TypeError(f"labels must be a torch.long tensor (B, S), got {got}")
        if labels.shape != input_ids.shape or labels.device != input_ids.device:
            raise ValueError(
                f"labels must match input_ids' shape {tuple(input_ids.shape)} and device {input_ids.device}, "
                f"got {tuple(labels.shape)} on {labels.device}"
            )

    def _check_values(self, input_ids, media: Media, num_media: int, media_index_given: bool,
                      labels: Optional[torch.Tensor] = None) -> None:
        # Eager only: these read tensor values (one host sync).
        if not holds_values(input_ids):
            return
        if isinstance(media, MediaSpans):  # the highest image seen is end - 1; nothing below -1
            media_index = media.end - 1
            self._check_no_padding_image_seen(media)
        else:
            media_index = media
        values = [input_ids.min(), input_ids.max(), media_index.min().long(), media_index.max().long()]
        if labels is not None:  # -100 (ignored) aside, a label outside the vocabulary is a device-side assert on GPU
            kept = labels.masked_fill(labels == -100, 0)
            values += [kept.min(), kept.max()]
        stats = torch.stack(values).tolist()
        ids_min, ids_max, mi_min, mi_max = stats[:4]
        if ids_min < 0 or ids_max >= self.cfg.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.cfg.vocab_size}), got values in [{ids_min}, {ids_max}]")
        # Labels index the logits (V + 2 wide, or V when the special tokens are input-only); <image> is ignored.
        if labels is not None and (stats[4] < 0 or (stats[5] >= self.lm.output_size
                                                    and stats[5] != self.cfg.image_token_id)):
            raise ValueError(f"labels must lie in [0, {self.lm.output_size}) or be -100 (ignored), got values in "
                             f"[{stats[4]}, {stats[5]}] besides -100")
        if mi_min < -1:
            raise ValueError(f"media_index must be >= -1, got {mi_min}")
        if mi_max >= num_media and media_index_given:
            raise ValueError(
                f"media_index points at image {mi_max} but only T_img={num_media} images were given "
                "(valid: -1 .. T_img - 1)"
            )
        if mi_max >= num_media:
            if num_media == 0:
                raise ValueError(
                    f"input_ids contain <image> tokens (id {self.cfg.image_token_id}) or media_index points at an "
                    "image, but no images were given"
                )
            raise ValueError(
                f"input_ids: a row has {mi_max + 1} <image> tokens (id {self.cfg.image_token_id}) but images has "
                f"only T_img={num_media}"
            )
