"""Vision encoder: a pre-LN ViT laid out like Hugging Face's `CLIPVisionTransformer`.

Parameter names match CLIP's vision tower (minus the `vision_model.` prefix) so CLIP-format weights map
one-to-one:

    embeddings.class_embedding            (D,)
    embeddings.patch_embedding.weight     (D, C, p, p)      conv, no bias
    (with VisionConfig.stem, not in CLIP: embeddings.stem.{0,2,..} 3x3 stride-1/2 convs and a 1x1
    patch_embedding (D, C_stem, 1, 1))
    embeddings.position_embedding.weight  (n_patches + 1, D)
    pre_layrnorm.{weight,bias}            (CLIP's spelling)
    encoder.layers.i.layer_norm1 / self_attn.{q,k,v,out}_proj / layer_norm2 / mlp.{fc1,fc2}
    post_layernorm.{weight,bias}

Input (N, C, H, W) -> features (N, v, D): the patch tokens (optionally with the class token first),
after `post_layernorm` when `output_norm` (CLIP applies it only to the pooled token; OpenFlamingo feeds the
un-normalised patch tokens, hence the switch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flamingo_fast.models.config import VisionConfig
from flamingo_fast.ops import attention


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    return F.gelu


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.stem:  # 3x3 convs + GELU, then a 1x1 projection (VisionConfig.stem)
            layers, c_in = [], cfg.channels
            for c_out, stride in cfg.stem:
                layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GELU()]
                c_in = c_out
            self.stem = nn.Sequential(*layers)
            self.patch_embedding = nn.Conv2d(c_in, cfg.width, 1, bias=False)
        else:
            self.stem = None
            self.patch_embedding = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size,
                                             bias=False)
        if cfg.class_token:
            self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.position_embedding = nn.Embedding(cfg.num_patches + int(cfg.class_token), cfg.width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.width**-0.5
        if self.cfg.class_token:
            nn.init.normal_(self.class_embedding, std=std)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        if self.stem is None:
            nn.init.normal_(self.patch_embedding.weight, std=0.02)
        else:  # behind GELU convs: PyTorch's fan-in init, like the stem's own convs
            self.patch_embedding.reset_parameters()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.patch_embedding.weight.dtype)
        if self.stem is not None:
            x = self.stem(x)
        x = self.patch_embedding(x)  # (N, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (N, h*w, D), row-major patches like CLIP
        if self.cfg.class_token:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        return x + self.position_embedding.weight.to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        shape = (n, s, self.heads, d // self.heads)
        q = self.q_proj(x).view(shape)
        k = self.k_proj(x).view(shape)
        v = self.v_proj(x).view(shape)
        return self.out_proj(attention(q, k, v, causal=False).reshape(n, s, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.act = _activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def check_images(self, images: torch.Tensor, name: str = "images") -> None:
        """Shape/dtype checks shared with Flamingo.forward; `images` (..., C, H, W)."""
        cfg = self.cfg
        if not torch.is_tensor(images) or not images.is_floating_point():
            got = images.dtype if torch.is_tensor(images) else type(images).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
        if images.dim() < 3 or images.shape[-3] != cfg.channels:
            raise ValueError(
                f"{name} must have {cfg.channels} channels in dim -3 (N, C, H, W), got shape {tuple(images.shape)}"
            )
        if tuple(images.shape[-2:]) != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"{name} must be {cfg.image_size}x{cfg.image_size} pixels (H, W), got {tuple(images.shape[-2:])}"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"images must be 4-D (N, C, H, W), got shape {tuple(images.shape)}")
        self.check_images(images)
        x = self.pre_layrnorm(self.embeddings(images))
        x = self.encoder(x)
        if self.cfg.class_token and not self.cfg.output_class_token:
            x = x[:, 1:]
        if self.cfg.output_norm:
            x = self.post_layernorm(x)
        return x
