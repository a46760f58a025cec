"""RICES (Retrieval-based In-Context Example Selection, Yang et al. 2022), as used in the Flamingo paper's
appendix and OpenFlamingo: the demonstrations of a query are the support samples whose images are most
similar to the query image.

Similarity is the cosine of image embeddings; the embedding is the model's own frozen vision encoder's
features averaged over patches (OpenFlamingo uses a separate CLIP's pooled embedding; with CLIP weights
loaded this encoder is that CLIP's vision tower). The chosen demonstrations are ordered least to most
similar, so the most similar one sits right before the query (as OpenFlamingo orders them).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from flamingo_fast.data.sample import Sample
from flamingo_fast.data.transforms import ImageTransform
from flamingo_fast.models.flamingo import Flamingo


class RicesRetriever:
    """Embeds every support image once; `find(query_images, k)` -> per query, k support indices."""

    def __init__(self, model: Flamingo, support: Sequence[Sample], transform: ImageTransform, batch_size: int = 32):
        if len(support) == 0:
            raise ValueError("RICES needs a non-empty support set")
        if model.cfg.vision.kind != "clip":
            raise ValueError("RICES retrieval embeds images with the CLIP vision encoder; the tiled (Llama 3.2 Vision) "
                             "encoder is not supported: use random demonstrations (rices=False)")
        self.model, self.transform, self.batch_size = model, transform, batch_size
        embeddings = []
        for start in range(0, len(support), batch_size):
            images = [support[i].images[0] for i in range(start, min(start + batch_size, len(support)))]
            embeddings.append(self.embed(images))
        self.support_embeddings = torch.cat(embeddings)  # (N, D), unit norm

    @torch.no_grad()
    def embed(self, images: Sequence[Any]) -> torch.Tensor:
        """Unit-norm embeddings (N, D) of images (first frame of videos)."""
        weight = self.model.vision.embeddings.patch_embedding.weight
        pixels = torch.stack([self.transform(image)[0] for image in images]).to(weight.device, weight.dtype)
        features = self.model.vision(pixels).float().mean(dim=1)
        return torch.nn.functional.normalize(features, dim=-1).cpu()

    def find(self, query_images: Sequence[Any], k: int) -> list[list[int]]:
        if k > self.support_embeddings.shape[0]:
            raise ValueError(f"{k} demonstrations requested but the support set has {self.support_embeddings.shape[0]}")
        if k == 0:
            return [[] for _ in query_images]
        similarity = self.embed(query_images) @ self.support_embeddings.T  # (Q, N)
        best = similarity.topk(k, dim=1).indices  # most similar first
        return [list(reversed(row)) for row in best.tolist()]
