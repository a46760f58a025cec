"""Model configuration: one dataclass per component and the named presets.

Parameter budget of the presets (Flamingo paper, Tables 4/5; totals checked by tests/test_models_config.py):

* LM: a Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA, untied head) with a 32000-token base vocabulary
  (the Llama tokenizer) plus the two Flamingo tokens. Its SwiGLU width is chosen so the frozen LM lands on
  the paper's size: 3b 1.37B (paper 1.4B), 9b 7.10B (paper 7.1B), xl 68.98B (= Llama-2-70B; paper ~70B).
* Vision: CLIP ViT-L/14 at 224 px (24 layers, width 1024, 16 heads, quick-GELU; 303M). The paper's
  NFNet-F6 has 435M; we use the ViT whose released CLIP weights OpenFlamingo uses, so real weights load
  (flamingo_fast.convert.from_hf_clip_vision). It costs ~130M params against the paper's totals (< 5%).
* Resampler: 6 layers, width 1536, 16 heads of 96, 64 latents, FFW 4x (GELU). The ViT's 1024-wide
  features are projected to 1536 once (`media_proj`); 172M in all (paper 194M; the remainder is NFNet's
  wider feature map).
* Gated xattn-dense: FFW 4x with squared ReLU. Per layer: FFW 8 D^2, attention 2 D*I (q, out) +
  2 * 1536 * I (k, v from the resampler's latents), where I = heads * head_dim.
  With I = D (3b: 16 x 128, 9b: 32 x 128) this gives 1.16B and 1.80B (paper 1.2B / 1.6B). For xl, I = D
  (64 x 128) gives only 8.36B for 12 layers against the paper's 10B: the paper's 80B model must have a
  wider attention than its D. We double the attention width to I = 2D = 16384 as 128 heads of 128
  (rather than 64 heads of 256: the fused kernels are built for head dims 64/96/128): 855.6M per layer,
  10.27B for 12 layers (paper: 10B), total 79.9B (paper: 80B).

Token ids: the LM's base vocabulary has `lm.vocab_size` entries; `<image>` = lm.vocab_size and
`<|endofchunk|>` = lm.vocab_size + 1, so `FlamingoConfig.vocab_size` = lm.vocab_size + 2.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

# Which parameters train (`Flamingo.set_trainable`, the trainer's model.trainable): see flamingo.py.
TRAINABLE_MODES = ("flamingo", "all", "lm", "vision")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_numbers(section: str, config: Any, may_be_zero: tuple[str, ...] = ()) -> None:
    """Every int field is an int (not a bool) >= 1 (>= 0 if named in `may_be_zero`; None where the field is
    Optional), every float field a finite number > 0: a zero, negative or wrong-typed size fails here, naming the
    field, instead of building a broken model or failing inside torch."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type in ("int", "Optional[int]"):
            if value is None and f.type == "Optional[int]":
                continue
            low = 0 if f.name in may_be_zero else 1
            if not _is_int(value) or value < low:
                raise ValueError(f"{section}.{f.name} must be an int >= {low}, got {value!r}")
        elif f.type == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{section}.{f.name} must be a finite number > 0, got {value!r}")


@dataclass
class VisionConfig:
    """A CLIP-structured ViT (pre-LN). Features are the patch tokens (and the class token if asked)."""

    image_size: int = 224
    patch_size: int = 14
    channels: int = 3
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    activation: str = "quick_gelu"  # CLIP (OpenAI) uses quick_gelu; "gelu" for others
    layer_norm_eps: float = 1e-5
    class_token: bool = True  # CLIP has one; it takes a position embedding slot
    output_class_token: bool = False  # include the class token in the features given to the resampler
    output_norm: bool = True  # apply post_layernorm to the output features
    # Convolutional stem (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"): 3x3 convs given
    # as (out_channels, stride) pairs with stride 1 or 2, each followed by GELU, then a 1x1 projection to `width`,
    # instead of the p x p patchify conv. The strides must multiply to patch_size. Empty (CLIP's layout): the
    # plain patch embedding. The CPU demo uses one (the measurement is in train/configs/demo.toml).
    stem: tuple[tuple[int, int], ...] = ()
    # "clip": the ViT above. "tiled": Llama 3.2 Vision's encoder (tiled_vision.py): each image is up to
    # `max_tiles` tiles of image_size px with gated tile / position embeddings, a local encoder of `layers`
    # layers, a gated global encoder of `global_layers` layers, and the outputs of `intermediate_layers` (local
    # layer indices) concatenated to the final features: width * (1 + len(intermediate_layers)) per token.
    kind: str = "clip"
    max_tiles: int = 1
    global_layers: int = 0
    intermediate_layers: tuple[int, ...] = ()
    # Tiles (rows, cols) of each aspect ratio id 1, 2, ... (id 0 = a padding image); "tiled" only.
    aspect_ratios: tuple[tuple[int, int], ...] = ()

    @property
    def tokens_per_tile(self) -> int:
        """Tokens of one tile of the tiled encoder: patches + class token."""
        return self.num_patches + 1

    @property
    def tiles_per_aspect_ratio(self) -> tuple[int, ...]:
        """Real tiles of an image by its aspect ratio id: 0 for id 0 (a padding image), then rows * cols."""
        return (0, *(rows * cols for rows, cols in self.aspect_ratios))

    @property
    def output_dim(self) -> int:
        """Feature width handed to the resampler / projector."""
        return self.width * (1 + len(self.intermediate_layers)) if self.kind == "tiled" else self.width

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_features(self) -> int:
        """v: the number of feature vectors per image handed to the resampler."""
        return self.num_patches + int(self.class_token and self.output_class_token)

    def validate(self) -> None:
        _check_numbers("vision", self, may_be_zero=("global_layers",))
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"vision.width {self.width} must be divisible by heads {self.heads}")
        if self.activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"vision.activation must be 'gelu' or 'quick_gelu', got {self.activation!r}")
        if self.output_class_token and not self.class_token:
            raise ValueError("vision.output_class_token needs vision.class_token")
        if isinstance(self.stem, (str, bytes)) or not all(
                isinstance(layer, (list, tuple)) and len(layer) == 2 and all(map(_is_int, layer)) for layer in self.stem):
            raise ValueError(f"vision.stem must be a list of [out_channels, stride] int pairs, got {self.stem!r}")
        self.stem = tuple((c, st) for c, st in self.stem)
        if self.kind not in ("clip", "tiled"):
            raise ValueError(f"vision.kind must be 'clip' or 'tiled', got {self.kind!r}")
        self.intermediate_layers = tuple(self.intermediate_layers)
        self.aspect_ratios = tuple(tuple(r) for r in self.aspect_ratios)
        if self.kind == "tiled":
            if self.stem or not self.class_token:
                raise ValueError("vision.kind='tiled' has a plain patch embedding and a class token per tile "
                                 "(no stem, class_token true)")
            if not all(_is_int(i) and 0 <= i < self.layers for i in self.intermediate_layers):
                raise ValueError(f"vision.intermediate_layers must be local layer indices in [0, {self.layers}), "
                                 f"got {list(self.intermediate_layers)}")
            if not self.aspect_ratios or not all(
                    len(r) == 2 and all(_is_int(n) and n >= 1 for n in r) and r[0] * r[1] <= self.max_tiles
                    for r in self.aspect_ratios):
                raise ValueError(f"vision.aspect_ratios must be (rows, cols) pairs of at most max_tiles="
                                 f"{self.max_tiles} tiles, got {[list(r) for r in self.aspect_ratios]}")
        elif self.max_tiles != 1 or self.global_layers or self.intermediate_layers or self.aspect_ratios:
            raise ValueError("vision.max_tiles / global_layers / intermediate_layers / aspect_ratios need "
                             "vision.kind='tiled'")
        if self.stem and (math.prod(st for _, st in self.stem) != self.patch_size
                          or not all(c > 0 and st in (1, 2) for c, st in self.stem)):
            raise ValueError(f"vision.stem must be [out_channels > 0, stride 1 or 2] pairs whose strides multiply to "
                             f"patch_size {self.patch_size}, got {[list(layer) for layer in self.stem]}")


SPATIAL_EMBEDDINGS = ("none", "sincos2d")


@dataclass
class PerceiverConfig:
    """Perceiver Resampler: `n_latents` learned queries per image, `depth` layers."""

    dim: int = 1536
    depth: int = 6
    heads: int = 16
    head_dim: int = 96
    n_latents: int = 64
    ffw_mult: int = 4
    max_frames: int = 8  # temporal embeddings: frames F of one media item (video); 1 for still images
    # "none" (the paper, OpenFlamingo): the features' own position information only. "sincos2d": fixed 2-D
    # sine-cosine features of each patch's grid position are added to the media (as the Perceiver adds
    # Fourier position features to its inputs); needs a square patch grid, no class token.
    spatial_embedding: str = "none"
    layer_norm_eps: float = 1e-5

    def validate(self) -> None:
        _check_numbers("resampler", self)
        if self.max_frames < 1:
            raise ValueError(f"resampler.max_frames must be >= 1, got {self.max_frames}")
        if self.spatial_embedding not in SPATIAL_EMBEDDINGS:
            raise ValueError(f"resampler.spatial_embedding must be one of {SPATIAL_EMBEDDINGS}, "
                             f"got {self.spatial_embedding!r}")
        if min(self.dim, self.depth, self.heads, self.head_dim, self.n_latents, self.ffw_mult) < 1:
            raise ValueError(f"resampler dimensions must be positive, got {self}")


@dataclass
class XAttnConfig:
    """GATED XATTN-DENSE layers, inserted before LM block i when i >= first_layer and (i - first_layer) % every == 0.

    first_layer is 0 in the paper; OpenFlamingo starts at every - 1 (its blocks sit at n-1, 2n-1, ...).
    """

    every: int = 1
    first_layer: int = 0
    heads: int = 16
    head_dim: int = 128
    kv_heads: Optional[int] = None  # None = heads (no GQA)
    ffw_mult: int = 4
    activation: str = "sqrelu"  # paper: squared ReLU; "gelu" reproduces OpenFlamingo's layers; "swiglu": Mllama
    only_immediate: bool = True  # False: each token attends to all images up to its latest one
    layer_norm_eps: float = 1e-5
    # -- the Llama 3.2 Vision (Mllama) variant of the same layer; the defaults are Flamingo's --
    # Explicit LM block indices (the layer runs right before each); None: first_layer / every. Mllama's
    # "cross-attention decoder layer at index i" is the layer before LM block i - (cross layers before i).
    layer_ids: Optional[tuple[int, ...]] = None
    norm: str = "layernorm"  # "rmsnorm" (Mllama) for the pre-attention and pre-FFW norms
    qk_norm: bool = False  # RMSNorm over each head's q and k (Mllama)
    ffw_dim: Optional[int] = None  # FFW hidden width; None: ffw_mult * dim
    # "index": a token sees its latest image (or all up to it, only_immediate=False); "groups": Mllama's rule, a
    # token sees the images of the latest group of consecutive <image> tokens (ops.MediaSpans.from_image_groups).
    media_span: str = "index"
    zero_ffw_without_media: bool = False  # Mllama: the FFW adds nothing to tokens that see no image

    @property
    def n_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    def validate(self) -> None:
        _check_numbers("xattn", self, may_be_zero=("first_layer",))
        if self.every < 1:
            raise ValueError(f"xattn.every must be >= 1, got {self.every}")
        if self.first_layer < 0:
            raise ValueError(f"xattn.first_layer must be >= 0, got {self.first_layer}")
        if self.heads % self.n_kv_heads:
            raise ValueError(f"xattn.heads {self.heads} must be a multiple of kv_heads {self.n_kv_heads}")
        if self.activation not in ("sqrelu", "gelu", "swiglu"):
            raise ValueError(f"xattn.activation must be 'sqrelu', 'gelu' or 'swiglu', got {self.activation!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"xattn.norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.media_span not in ("index", "groups"):
            raise ValueError(f"xattn.media_span must be 'index' or 'groups', got {self.media_span!r}")
        if self.layer_ids is not None:
            ids = tuple(self.layer_ids)
            if not all(_is_int(i) and i >= 0 for i in ids) or list(ids) != sorted(set(ids)):
                raise ValueError(f"xattn.layer_ids must be increasing LM block indices >= 0, got {list(ids)}")
            self.layer_ids = ids


@dataclass
class LMConfig:
    """Llama-style decoder. `vocab_size` is the BASE vocabulary (without the 2 Flamingo tokens)."""

    vocab_size: int = 32000
    dim: int = 2048
    layers: int = 24
    heads: int = 16
    kv_heads: Optional[int] = None  # None = heads (MHA)
    ffn_dim: int = 5632
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 4096  # default KV-cache length; RoPE itself has no table limit
    # Llama 3.1's RoPE frequency scaling ("rope_type": "llama3"): (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); None: plain RoPE.
    rope_llama3: Optional[tuple[float, float, float, int]] = None
    # False: the 2 special tokens are input-only (Mllama: `<|image|>` has an embedding row, no output row), so
    # logits cover the base vocabulary only and there is no special_head.
    special_logits: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def n_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    def validate(self) -> None:
        _check_numbers("lm", self)
        if self.dim % self.heads:
            raise ValueError(f"lm.dim {self.dim} must be divisible by heads {self.heads}")
        if self.heads % self.n_kv_heads:
            raise ValueError(f"lm.heads {self.heads} must be a multiple of kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"lm head dim {self.head_dim} must be even for RoPE")
        if self.vocab_size < 1:
            raise ValueError(f"lm.vocab_size must be >= 1, got {self.vocab_size}")
        if self.rope_llama3 is not None:
            r = tuple(self.rope_llama3)
            if len(r) != 4 or not all(isinstance(x, (int, float)) and x > 0 for x in r) or r[2] <= r[1]:
                raise ValueError(f"lm.rope_llama3 must be (factor, low_freq_factor, high_freq_factor, "
                                 f"original_max_position_embeddings), all > 0, high > low; got {self.rope_llama3!r}")
            self.rope_llama3 = (float(r[0]), float(r[1]), float(r[2]), int(r[3]))


@dataclass
class FlamingoConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: PerceiverConfig = field(default_factory=PerceiverConfig)
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    # Labels equal to this id are ignored by the loss (None: the tokenizer has no pad token).
    pad_token_id: Optional[int] = None
    name: str = "custom"
    # How vision features become the xattn layers' keys/values: "resampler" (Flamingo: n_latents latents per
    # image, width resampler.dim) or "projector" (Mllama, with vision.kind "tiled": one Linear from
    # vision.output_dim to lm.dim per token; every tile token is a key).
    connector: str = "resampler"

    def __post_init__(self) -> None:
        self.validate()

    # -- token ids ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Full vocabulary: LM base vocabulary + `<image>` + `<|endofchunk|>`."""
        return self.lm.vocab_size + 2

    @property
    def image_token_id(self) -> int:
        return self.lm.vocab_size

    @property
    def eoc_token_id(self) -> int:
        return self.lm.vocab_size + 1

    @property
    def xattn_layer_ids(self) -> list[int]:
        """LM block indices that get a gated xattn-dense layer in front of them."""
        if self.xattn.layer_ids is not None:
            return list(self.xattn.layer_ids)
        first, every = self.xattn.first_layer, self.xattn.every
        return [i for i in range(first, self.lm.layers) if (i - first) % every == 0]

    @property
    def media_dim(self) -> int:
        """Width of the media tokens the xattn layers project to keys/values."""
        return self.resampler.dim if self.connector == "resampler" else self.lm.dim

    @property
    def keys_per_media(self) -> int:
        """Key slots per image: n_latents (resampler), or every token of every tile (projector)."""
        if self.connector == "resampler":
            return self.resampler.n_latents
        return self.vision.max_tiles * self.vision.tokens_per_tile

    def validate(self) -> None:
        for part in (self.vision, self.resampler, self.xattn, self.lm):
            part.validate()
        if self.connector not in ("resampler", "projector"):
            raise ValueError(f"connector must be 'resampler' or 'projector', got {self.connector!r}")
        # The Mllama parts come together: tiles give the key counts the groups' spans need, and the projector
        # is what turns tiles into keys.
        mllama = (self.vision.kind == "tiled", self.connector == "projector", self.xattn.media_span == "groups")
        if any(mllama) and not all(mllama):
            raise ValueError(f"vision.kind='tiled', connector='projector' and xattn.media_span='groups' (Llama 3.2 "
                             f"Vision) go together; got vision.kind={self.vision.kind!r}, connector={self.connector!r}, "
                             f"xattn.media_span={self.xattn.media_span!r}")
        if self.xattn.layer_ids is not None and self.xattn.layer_ids and self.xattn.layer_ids[-1] >= self.lm.layers:
            raise ValueError(f"xattn.layer_ids must be LM block indices < lm.layers={self.lm.layers}, got "
                             f"{list(self.xattn.layer_ids)}")
        if self.resampler.spatial_embedding != "none":
            if self.vision.num_features != self.vision.num_patches:
                raise ValueError("resampler.spatial_embedding needs patch features only: set vision.output_class_token "
                                 "to false")
            if self.vision.width % 4:
                raise ValueError(f"resampler.spatial_embedding='sincos2d' needs vision.width divisible by 4, got "
                                 f"{self.vision.width}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlamingoConfig":
        vision = d.get("vision")
        if isinstance(vision, dict) and "stem_channels" in vision:  # exports of 2026-11-28 (stride-2 convs only)
            vision = {k: v for k, v in vision.items() if k != "stem_channels"}
            vision["stem"] = [[c, 2] for c in d["vision"]["stem_channels"]]
            d = {**d, "vision": vision}
        return cls().replace(**d)

    def replace(self, **overrides: Any) -> "FlamingoConfig":
        """A copy with overrides applied (see `from_preset`)."""
        return _apply_overrides(copy.deepcopy(self), overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "FlamingoConfig":
        """Preset "demo" | "3b" | "9b" | "xl", then overrides.

        Overrides are top-level fields (`pad_token_id=0`), whole or partial sub-configs as dicts
        (`lm={"layers": 2}`, `vision={"image_size": 64}`), or `vocab_size=V`, the FULL vocabulary
        including the two Flamingo tokens (sets lm.vocab_size = V - 2), so that
        `from_preset(name, vocab_size=cfg.vocab_size)` round-trips.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name]().replace(**overrides)


def _apply_overrides(cfg: FlamingoConfig, overrides: dict[str, Any]) -> FlamingoConfig:
    sub_types = {f.name: f for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        if key == "vocab_size":
            if not isinstance(value, int) or value < 3:
                raise ValueError(f"vocab_size must be an int >= 3 (base vocabulary + 2), got {value!r}")
            cfg.lm.vocab_size = value - 2
        elif key not in sub_types:
            raise ValueError(f"unknown config field {key!r}; expected one of {sorted(sub_types) + ['vocab_size']}")
        elif key in ("vision", "resampler", "xattn", "lm"):
            current = getattr(cfg, key)
            if dataclasses.is_dataclass(value):
                setattr(cfg, key, copy.deepcopy(value))
            elif isinstance(value, dict):
                names = {f.name for f in dataclasses.fields(current)}
                unknown = set(value) - names
                if unknown:
                    raise ValueError(f"unknown {key} config field(s) {sorted(unknown)}; expected {sorted(names)}")
                setattr(cfg, key, dataclasses.replace(current, **value))
            else:
                raise TypeError(f"override {key} must be a dict or {type(current).__name__}, got {type(value).__name__}")
        else:
            setattr(cfg, key, value)
    cfg.validate()
    return cfg


# -- presets -------------------------------------------------------------------------------------------------
_CLIP_VIT_L14 = dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096)
_RESAMPLER = dict(dim=1536, depth=6, heads=16, head_dim=96, n_latents=64)


def _demo() -> FlamingoConfig:
    # Trains on a 2-core CPU in minutes: 2.8M parameters, 32x32 images as 4x4 patches of 8 px, 8 latents.
    return FlamingoConfig(
        name="demo",
        vision=VisionConfig(image_size=32, patch_size=8, width=128, layers=3, heads=4, mlp_dim=512,
                            activation="gelu"),
        resampler=PerceiverConfig(dim=128, depth=2, heads=4, head_dim=32, n_latents=8, max_frames=4),
        xattn=XAttnConfig(every=1, heads=4, head_dim=32),
        lm=LMConfig(vocab_size=1022, dim=128, layers=4, heads=4, kv_heads=2, ffn_dim=384, max_seq_len=512),
        pad_token_id=0,
    )


def _3b() -> FlamingoConfig:
    return FlamingoConfig(
        name="3b",
        vision=VisionConfig(**_CLIP_VIT_L14),
        resampler=PerceiverConfig(**_RESAMPLER),
        xattn=XAttnConfig(every=1, heads=16, head_dim=128),
        lm=LMConfig(vocab_size=32000, dim=2048, layers=24, heads=16, ffn_dim=5632),
    )


def _9b() -> FlamingoConfig:
    return FlamingoConfig(
        name="9b",
        vision=VisionConfig(**_CLIP_VIT_L14),
        resampler=PerceiverConfig(**_RESAMPLER),
        xattn=XAttnConfig(every=4, heads=32, head_dim=128),
        lm=LMConfig(vocab_size=32000, dim=4096, layers=40, heads=32, ffn_dim=8448),
    )


def _xl() -> FlamingoConfig:
    # LM = Llama-2-70B dims. xattn: 128 heads of 128, attention width 2D (module docstring: matches 10B).
    return FlamingoConfig(
        name="xl",
        vision=VisionConfig(**_CLIP_VIT_L14),
        resampler=PerceiverConfig(**_RESAMPLER),
        xattn=XAttnConfig(every=7, heads=128, head_dim=128),
        lm=LMConfig(vocab_size=32000, dim=8192, layers=80, heads=64, kv_heads=8, ffn_dim=28672),
    )


# -- Llama 3.2 Vision (Mllama), the same model family configured (transformers' MllamaConfig defaults) --------
# Tiled ViT-H/14 at 560 px: 32 local + 8 global layers of width 1280, features of local layers 3, 7, 15, 23, 30
# concatenated (7680 wide), up to 4 tiles of 1601 tokens per image. The cross-attention layers sit at HF decoder
# indices 3, 8, 13, ... = before LM blocks 3, 7, 11, ... of the Llama 3.1 text model (every 4 from 3).
MLLAMA_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
_MLLAMA_VISION = dict(kind="tiled", image_size=560, patch_size=14, width=1280, layers=32, heads=16, mlp_dim=5120,
                      activation="gelu", max_tiles=4, global_layers=8, intermediate_layers=(3, 7, 15, 23, 30),
                      aspect_ratios=MLLAMA_ASPECT_RATIOS)
_LLAMA3_ROPE = (8.0, 1.0, 4.0, 8192)


def mllama_xattn(lm: LMConfig, layer_ids: tuple[int, ...]) -> XAttnConfig:
    """Mllama's cross-attention layer: the LM's heads / GQA / SwiGLU width, RMSNorms, q/k norms, image groups."""
    return XAttnConfig(layer_ids=layer_ids, heads=lm.heads, kv_heads=lm.kv_heads, head_dim=lm.head_dim,
                       ffw_dim=lm.ffn_dim, activation="swiglu", norm="rmsnorm", qk_norm=True, media_span="groups",
                       zero_ffw_without_media=True, layer_norm_eps=lm.norm_eps)


def _mllama(name: str, dim: int, blocks: int, heads: int, ffn_dim: int) -> FlamingoConfig:
    lm = LMConfig(vocab_size=128256, dim=dim, layers=blocks, heads=heads, kv_heads=8, ffn_dim=ffn_dim,
                  rope_theta=500000.0, rope_llama3=_LLAMA3_ROPE, special_logits=False, max_seq_len=8192)
    return FlamingoConfig(name=name, vision=VisionConfig(**_MLLAMA_VISION), connector="projector",
                          xattn=mllama_xattn(lm, tuple(range(3, blocks, 4))), lm=lm, pad_token_id=128004)


def _mllama_11b() -> FlamingoConfig:
    return _mllama("mllama-11b", dim=4096, blocks=32, heads=32, ffn_dim=14336)  # text: Llama 3.1 8B


def _mllama_90b() -> FlamingoConfig:
    return _mllama("mllama-90b", dim=8192, blocks=80, heads=64, ffn_dim=28672)  # text: Llama 3.1 70B


PRESETS = {"demo": _demo, "3b": _3b, "9b": _9b, "xl": _xl, "mllama-11b": _mllama_11b, "mllama-90b": _mllama_90b}
