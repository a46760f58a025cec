"""Import an OpenFlamingo checkpoint (a torch state dict) into `flamingo_fast.models.Flamingo`.

Layout differences, checked against open_flamingo 2.0.1 (`src/helpers.py`, `flamingo_lm.py`, `flamingo.py`):

* Resampler. `perceiver.layers.i.0` is PerceiverAttention (norm_media, norm_latents, to_q, to_kv = [k; v],
  to_out: same math and names as ours) and `perceiver.layers.i.1` is FeedForward = Sequential(LayerNorm,
  Linear, GELU, Linear), i.e. indices 0/1/3 -> our ffw.norm/fc1/fc2. OpenFlamingo builds it with
  `dim = vision width` (no projection: our `media_proj` must be Identity, resampler.dim = vision.width),
  heads 8 x 64, 64 latents, depth 6, and neither `frame_embs` nor `media_time_embs` (both optional
  there). Absent `frame_embs` load as zeros (ours always adds frame_embs[f]); `media_time_embs` (a
  learned embedding per image position) has no counterpart here and is rejected.
* Gated cross-attention. `GatedCrossAttentionBlock`: attn (MaskedCrossAttention: norm, to_q, to_kv =
  [k; v], to_out), attn_gate, ff = FeedForward (LayerNorm, Linear, GELU, Linear) and ff_gate, heads 8 x 64
  -> our attn.*, attn_gate, ffw.norm/fc1/fc2 (activation "gelu", not the paper's squared ReLU), ffw_gate.
  Masking is the same as ours: `media_locations.cumsum()` numbers the images, a token attends to the
  image of its number (only_attend_immediate_media), text before the first image gets exactly 0, and with
  `use_cached_media` every new token attends to the last image (our FlamingoCache continues media_index
  the same way). Known difference: with only_attend_immediate_media=False OpenFlamingo gives text
  before the first image a uniform average over all images (its mask leaves no key and it does not zero
  the row); ours gives 0, as in the immediate mode.
* Placement. OpenFlamingo puts a block before decoder layer i when (i + 1) % cross_attn_every_n_layers
  == 0 (layers n-1, 2n-1, ...); the paper (and our presets) start at layer 0. `open_flamingo_config` sets
  `xattn.first_layer = n - 1`, so the block found before OpenFlamingo layer i goes to our
  `xattn_layers[str(i)]`; a checkpoint whose blocks sit elsewhere than the config says is refused.
* Names. Blocks appear as `lang_encoder.gated_cross_attn_layers.i.*` and/or (the same tensors, through
  the FlamingoLayer wrappers) `lang_encoder.model.layers.i.gated_cross_attn_layer.*`; LM blocks as
  `lang_encoder.model.layers.i.decoder_layer.*` and/or `lang_encoder.old_decoder_blocks.i.*`. Duplicates
  are loaded once.
* Tokens. OpenFlamingo appends `<|endofchunk|>` then `<image>` (then `<PAD>` for tokenizers without one)
  to the LM vocabulary: ids base, base + 1 (, base + 2). Ours are `<image>` = base, `<|endofchunk|>` =
  base + 1. The rows of `lang_encoder.model.embed_tokens` / `lang_encoder.lm_head` are split into our
  base rows and the two special rows in our order; `<PAD>`'s row is dropped.
* Only Llama-family language models map onto our LM (`lang_encoder.model.*`); MPT / GPT-NeoX / OPT
  backbones are reported as unexpected keys. The vision encoder, when present (`vision_encoder.*`, an
  open_clip VisionTransformer: conv1, class_embedding, positional_embedding, ln_pre, transformer.
  resblocks.i.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj) is mapped
  onto our CLIP-named ViT (in_proj split into q/k/v; `proj`, used only for CLIP's pooled embedding, is
  skipped).

Released OpenFlamingo checkpoints hold only the trained parts (resampler, cross-attention, LM input
embeddings); load the frozen LM and vision encoder first (from_hf_llama / from_hf_clip_vision with
`into=model.lm` / `into=model.vision`), then this.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Optional

import torch

from flamingo_fast.convert.loading import CheckpointKeyError, TensorLoader, load_torch_state_dict
from flamingo_fast.models.config import FlamingoConfig, LMConfig, PerceiverConfig, VisionConfig, XAttnConfig
from flamingo_fast.models.flamingo import Flamingo

Transform = Callable[[torch.Tensor], torch.Tensor]
Target = tuple[str, Optional[Transform]]  # our name, optional slicing of the source tensor

OPEN_FLAMINGO_HEADS = 8
OPEN_FLAMINGO_HEAD_DIM = 64
OPEN_FLAMINGO_LATENTS = 64
OPEN_FLAMINGO_DEPTH = 6


def open_flamingo_layer_ids(layers: int, cross_attn_every_n_layers: int) -> list[int]:
    """LM layers that get a gated cross-attention block in OpenFlamingo: (i + 1) % n == 0."""
    return [i for i in range(layers) if (i + 1) % cross_attn_every_n_layers == 0]


def open_flamingo_config(lm: LMConfig, vision: VisionConfig, cross_attn_every_n_layers: int = 1,
                         only_attend_immediate_media: bool = True, **overrides) -> FlamingoConfig:
    """The FlamingoConfig of an OpenFlamingo model with this LM and vision encoder.

    OpenFlamingo's fixed choices: resampler at the vision width, 6 layers, 8 heads x 64, 64 latents;
    cross-attention 8 heads x 64 with a GELU FFW; the resampler reads the ViT's patch tokens without the
    class token and without ln_post (open_clip < 2.21 applied ln_post to the pooled token only).
    `overrides` go to FlamingoConfig.replace.
    """
    cfg = FlamingoConfig(
        name="open_flamingo",
        vision=dataclasses.replace(vision, output_class_token=False, output_norm=False),
        resampler=PerceiverConfig(dim=vision.width, depth=OPEN_FLAMINGO_DEPTH, heads=OPEN_FLAMINGO_HEADS,
                                  head_dim=OPEN_FLAMINGO_HEAD_DIM, n_latents=OPEN_FLAMINGO_LATENTS, max_frames=1),
        # OpenFlamingo's blocks sit before layers n-1, 2n-1, ...: start at n-1.
        xattn=XAttnConfig(every=cross_attn_every_n_layers, first_layer=cross_attn_every_n_layers - 1,
                          heads=OPEN_FLAMINGO_HEADS, head_dim=OPEN_FLAMINGO_HEAD_DIM, activation="gelu",
                          only_immediate=only_attend_immediate_media),
        lm=dataclasses.replace(lm),
    ).replace(**overrides)
    assert cfg.xattn_layer_ids == open_flamingo_layer_ids(lm.layers, cross_attn_every_n_layers)
    return cfg


# -- name mapping ------------------------------------------------------------------------------------------------
_PERCEIVER = [
    (re.compile(r"perceiver\.latents"), "resampler.latents"),
    (re.compile(r"perceiver\.layers\.(\d+)\.0\.(norm_media|norm_latents|to_q|to_kv|to_out)\.(weight|bias)"),
     r"resampler.layers.\1.attn.\2.\3"),
    (re.compile(r"perceiver\.layers\.(\d+)\.1\.0\.(weight|bias)"), r"resampler.layers.\1.ffw.norm.\2"),
    (re.compile(r"perceiver\.layers\.(\d+)\.1\.1\.weight"), r"resampler.layers.\1.ffw.fc1.weight"),
    (re.compile(r"perceiver\.layers\.(\d+)\.1\.3\.weight"), r"resampler.layers.\1.ffw.fc2.weight"),
    (re.compile(r"perceiver\.norm\.(weight|bias)"), r"resampler.norm.\1"),
]
_XATTN_PREFIX = re.compile(
    r"lang_encoder\.(?:gated_cross_attn_layers\.(\d+)|model\.layers\.(\d+)\.gated_cross_attn_layer)\.(.+)"
)
_XATTN_PARTS = [
    (re.compile(r"attn\.(norm|to_q|to_kv|to_out)\.(weight|bias)"), r"attn.\1.\2"),
    (re.compile(r"attn_gate"), "attn_gate"),
    (re.compile(r"ff_gate"), "ffw_gate"),
    (re.compile(r"ff\.0\.(weight|bias)"), r"ffw.norm.\1"),
    (re.compile(r"ff\.1\.weight"), "ffw.fc1.weight"),
    (re.compile(r"ff\.3\.weight"), "ffw.fc2.weight"),
]
_LM_BLOCK = re.compile(r"lang_encoder\.(?:model\.layers\.(\d+)\.decoder_layer|old_decoder_blocks\.(\d+))\.(.+)")
_VISION = [
    (re.compile(r"vision_encoder\.conv1\.weight"), "vision.embeddings.patch_embedding.weight"),
    (re.compile(r"vision_encoder\.class_embedding"), "vision.embeddings.class_embedding"),
    (re.compile(r"vision_encoder\.positional_embedding"), "vision.embeddings.position_embedding.weight"),
    (re.compile(r"vision_encoder\.ln_pre\.(weight|bias)"), r"vision.pre_layrnorm.\1"),
    (re.compile(r"vision_encoder\.ln_post\.(weight|bias)"), r"vision.post_layernorm.\1"),
    (re.compile(r"vision_encoder\.transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)"),
     r"vision.encoder.layers.\1.layer_norm1.\2"),
    (re.compile(r"vision_encoder\.transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)"),
     r"vision.encoder.layers.\1.layer_norm2.\2"),
    (re.compile(r"vision_encoder\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)"),
     r"vision.encoder.layers.\1.self_attn.out_proj.\2"),
    (re.compile(r"vision_encoder\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)"),
     r"vision.encoder.layers.\1.mlp.fc1.\2"),
    (re.compile(r"vision_encoder\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)"),
     r"vision.encoder.layers.\1.mlp.fc2.\2"),
]
_VISION_IN_PROJ = re.compile(r"vision_encoder\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
_SKIPPED = {"vision_encoder.proj"}


def _rows(index: list[int]) -> Transform:
    return lambda t: t[index]


class _TokenLayout:
    """Where OpenFlamingo's special rows sit in its resized vocabulary."""

    def __init__(self, base: int, eoc_token_id: Optional[int], image_token_id: Optional[int]):
        self.base = base
        self.eoc = base if eoc_token_id is None else eoc_token_id
        self.image = base + 1 if image_token_id is None else image_token_id

    def split(self, prefix: str) -> list[Target]:
        """Base rows + [<image>, <|endofchunk|>] rows (our order) of an embedding/output matrix."""
        base, special = (("embed_tokens", "special_embed") if prefix == "embed" else ("lm_head", "special_head"))
        return [(f"lm.{base}.weight", lambda t: t[: self.base]),
                (f"lm.{special}.weight", _rows([self.image, self.eoc]))]


def open_flamingo_targets(name: str, tokens: _TokenLayout) -> Optional[list[Target]]:
    """Our parameter name(s) for an OpenFlamingo state-dict name; [] = skip, None = unknown."""
    if name in _SKIPPED:
        return []
    for pattern, replacement in _PERCEIVER:
        if pattern.fullmatch(name):
            return [(pattern.sub(replacement, name), None)]
    match = _XATTN_PREFIX.fullmatch(name)
    if match:
        layer = match.group(1) or match.group(2)
        for pattern, replacement in _XATTN_PARTS:
            if pattern.fullmatch(match.group(3)):
                return [(f"xattn_layers.{layer}." + pattern.sub(replacement, match.group(3)), None)]
        return None
    match = _LM_BLOCK.fullmatch(name)
    if match:
        return [(f"lm.layers.{match.group(1) or match.group(2)}.{match.group(3)}", None)]
    if name == "lang_encoder.model.embed_tokens.weight":
        return tokens.split("embed")
    if name == "lang_encoder.lm_head.weight":
        return tokens.split("head")
    if name == "lang_encoder.model.norm.weight":
        return [("lm.norm.weight", None)]
    for pattern, replacement in _VISION:
        if pattern.fullmatch(name):
            return [(pattern.sub(replacement, name), None)]
    match = _VISION_IN_PROJ.fullmatch(name)
    if match:
        layer, kind = match.groups()
        return [(f"vision.encoder.layers.{layer}.self_attn.{p}_proj.{kind}", lambda t, i=i: t.chunk(3, dim=0)[i])
                for i, p in enumerate("qkv")]
    return None


def _check_config(cfg: FlamingoConfig) -> None:
    if cfg.resampler.dim != cfg.vision.width:
        raise ValueError(
            f"OpenFlamingo's resampler works at the vision width ({cfg.vision.width}) with no projection, but "
            f"cfg.resampler.dim is {cfg.resampler.dim}; build the config with open_flamingo_config"
        )
    if cfg.xattn.activation != "gelu":
        raise ValueError("OpenFlamingo's cross-attention FFW uses GELU; set xattn.activation='gelu' "
                         "(open_flamingo_config does)")
    if cfg.resampler.spatial_embedding != "none":
        raise ValueError(f"OpenFlamingo's resampler adds no spatial embedding, but cfg.resampler.spatial_embedding "
                         f"is {cfg.resampler.spatial_embedding!r}; set it to 'none' (open_flamingo_config does)")


def from_open_flamingo(
    path: str | os.PathLike,
    cfg: FlamingoConfig,
    model: Optional[Flamingo] = None,
    *,
    eoc_token_id: Optional[int] = None,
    image_token_id: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> Flamingo:
    """Load an OpenFlamingo state-dict file (torch.load with weights_only=True); returns the Flamingo.

    cfg:    the model's config (see `open_flamingo_config`); it must place cross-attention where the
            checkpoint has it.
    model:  a Flamingo(cfg) to fill, typically with its LM and vision encoder already loaded; None builds
            one on the meta device, which then needs every weight from this file.
    eoc_token_id / image_token_id: their ids in OpenFlamingo's vocabulary (default cfg.lm.vocab_size and
            cfg.lm.vocab_size + 1, the order open_flamingo's factory adds them in).
    Every resampler and cross-attention parameter must be in the file; LM and vision weights are loaded
    when present. Unknown names raise a CheckpointKeyError listing them.
    """
    source = str(path)
    _check_config(cfg)
    if model is None:
        with torch.device("meta"):
            model = Flamingo(cfg)
    elif not isinstance(model, Flamingo):
        raise TypeError(f"model must be a flamingo_fast Flamingo, got {type(model).__name__}")
    state = load_torch_state_dict(path)
    if "perceiver.media_time_embs" in state:
        raise ValueError(f"{source}: 'perceiver.media_time_embs' (OpenFlamingo's max_num_media option) has no "
                         "counterpart in this model's resampler")
    tokens = _TokenLayout(cfg.lm.vocab_size, eoc_token_id, image_token_id)

    plan: dict[str, tuple[str, Optional[Transform]]] = {}  # our name -> (source name, transform)
    unexpected = []
    ours = dict(model.named_parameters())
    for name in state:
        if name == "perceiver.frame_embs":
            continue  # padded to our max_frames below
        targets = open_flamingo_targets(name, tokens)
        if targets is None or any(t not in ours for t, _ in targets):
            unexpected.append(name)
            continue
        for target, transform in targets:
            plan.setdefault(target, (name, transform))  # duplicated views of one tensor: load once

    found_xattn = sorted({int(m.group(1) or m.group(2)) for m in map(_XATTN_PREFIX.fullmatch, state) if m})
    if found_xattn and found_xattn != cfg.xattn_layer_ids:
        raise ValueError(
            f"{source}: the checkpoint has gated cross-attention before LM layers {found_xattn}, the config "
            f"before {cfg.xattn_layer_ids}; OpenFlamingo places them where (i + 1) % cross_attn_every_n_layers "
            "== 0 (open_flamingo_config sets xattn.first_layer = n - 1 to match)"
        )
    required = {n for n in ours if n.startswith(("resampler.", "xattn_layers.")) and n != "resampler.frame_embs"}
    missing = required - set(plan)
    if missing or unexpected:
        raise CheckpointKeyError(source, missing, unexpected,
                                 "only Llama-family language models map onto this LM (lang_encoder.model.*)")
    if tokens.base + 2 > state.get("lang_encoder.model.embed_tokens.weight", torch.empty(tokens.base + 2)).shape[0]:
        raise ValueError(f"{source}: the embedding has fewer rows than base vocabulary {tokens.base} + 2 special")

    loader = TensorLoader(model, source, dtype, device)
    for target, (name, transform) in plan.items():
        tensor = state[name]
        loader.put(target, tensor if transform is None else transform(tensor), name)
    frames = state.get("perceiver.frame_embs")
    max_frames = cfg.resampler.max_frames
    if frames is not None and frames.shape[0] > max_frames:
        raise ValueError(f"{source}: perceiver.frame_embs has {frames.shape[0]} frames, cfg.resampler.max_frames "
                         f"is {max_frames}")

    def frame_embs(target: torch.Tensor) -> torch.Tensor:
        # No frame embeddings in OpenFlamingo = adding zeros; extra frames ours has stay zero too.
        like = frames if frames is not None else state[plan["resampler.latents"][0]]
        value = torch.zeros(target.shape, dtype=dtype or like.dtype)
        if frames is not None:
            value[: frames.shape[0]] = frames
        return value

    loader.fill("resampler.frame_embs", frame_embs)
    leftover = loader.still_meta()
    if leftover:
        raise CheckpointKeyError(source, leftover, hint="not in this checkpoint: load the LM and vision encoder "
                                 "first (from_hf_llama(..., into=model.lm), from_hf_clip_vision(..., "
                                 "into=model.vision)) and pass model=")
    return model
