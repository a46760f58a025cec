"""Stage 1 of the demo (train/pretrain.py): the multi-positive contrastive loss against a hand computation, the
hard-negative groups, the image tower's pooled and region embeddings, and the text tower's last-token read."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flamingo_fast.models.config import VisionConfig
from flamingo_fast.models.vision import VisionTransformer
from train.pretrain import ImageTower, TextTower, contrastive_loss, hard_negative_pairs, region_mask


def _log_softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    total = math.log(sum(math.exp(v - top) for v in row)) + top
    return [v - total for v in row]


def test_contrastive_loss_by_hand_with_a_duplicate_caption():
    # 3 images, 3 captions; captions 0 and 2 are identical, so image 0 has captions 0 and 2 as positives.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.8, 0.6]])  # row 1 is not unit length: it gets normalised
    same = torch.tensor([[True, False, True], [False, True, False], [True, False, True]])
    scale = torch.tensor(math.log(10.0))  # exp -> 10
    a = F.normalize(image, dim=-1)
    b = F.normalize(text, dim=-1)
    sims = (a @ b.t()).tolist()
    logits = [[10.0 * s for s in row] for row in sims]
    targets = [[1 / 2, 0, 1 / 2], [0, 1, 0], [1 / 2, 0, 1 / 2]]

    def soft_ce(rows, target_rows):
        return sum(-sum(t * lp for t, lp in zip(trow, _log_softmax_row(row))) for row, trow in zip(rows, target_rows)) / 3

    columns = [list(c) for c in zip(*logits)]
    expected = 0.5 * (soft_ce(logits, targets) + soft_ce(columns, [list(c) for c in zip(*targets)]))
    assert contrastive_loss(image, text, scale, same).item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_temperature_is_clamped_at_100():
    emb = torch.eye(3)
    same = torch.eye(3, dtype=torch.bool)
    at_cap = contrastive_loss(emb, emb, torch.tensor(math.log(100.0)), same)
    beyond = contrastive_loss(emb, emb, torch.tensor(math.log(1e6)), same)
    assert beyond.item() == pytest.approx(at_cap.item(), rel=1e-6)


def test_hard_negative_groups_keep_positions_and_redraw_kinds_or_colours():
    pairs = hard_negative_pairs(seed=3, image_size=32)
    assert pairs(5)[1] == hard_negative_pairs(seed=3, image_size=32)(5)[1]  # pure function of (seed, index)
    for group in range(6):
        scenes = [pairs(4 * group + k)[2] for k in range(4)]
        base = scenes[0]
        for k, scene in enumerate(scenes[1:], start=1):
            assert [(s.x, s.y, s.size) for s in scene] == [(s.x, s.y, s.size) for s in base]  # same places
            changed = "colour" if k % 3 == 0 else "kind"
            kept = "kind" if changed == "colour" else "colour"
            assert [getattr(s, kept) for s in scene] == [getattr(s, kept) for s in base]
            assert [getattr(s, changed) for s in scene] != [getattr(s, changed) for s in base]
    image, caption, scene = pairs(1)
    assert image.size == (32, 32) and caption.startswith(scene[0].with_article)


def test_image_tower_pools_the_class_token_and_each_regions_patches():
    cfg = VisionConfig(image_size=16, patch_size=4, width=32, layers=1, heads=2, mlp_dim=64, activation="gelu")
    torch.manual_seed(0)
    vision = VisionTransformer(cfg).double()
    tower = ImageTower(vision, embed_dim=8).double()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    masks = torch.zeros(3, 16, dtype=torch.float64)
    masks[0, [0, 1, 4, 5]] = 1  # top-left 2x2 patches of image 0
    masks[1, [10, 11]] = 1  # two patches of image 1
    masks[2, 15] = 1  # the bottom-right patch of image 0
    owner = torch.tensor([0, 1, 0])
    image_emb, region_emb = tower(images, masks, owner)
    hidden = vision.encoder(vision.pre_layrnorm(vision.embeddings(images)))
    torch.testing.assert_close(image_emb, tower.proj(vision.post_layernorm(hidden[:, 0])))
    patches = vision(images)  # exactly what the resampler gets
    expected = torch.stack([patches[0, [0, 1, 4, 5]].mean(0), patches[1, [10, 11]].mean(0), patches[0, 15]])
    torch.testing.assert_close(region_emb, tower.region_proj(expected))


def test_region_masks_are_what_the_image_tower_pools_over():
    from flamingo_fast.data.shapes import Shape

    mask = region_mask(Shape("red", "circle", x=0.0, y=0.0, size=0.49), image_size=16, patch_size=4)
    assert mask.view(4, 4)[:2, :2].sum() == 4 and mask.sum() == 4


def test_text_tower_reads_the_last_real_token_and_ignores_padding_after_it():
    torch.manual_seed(1)
    tower = TextTower(vocab_size=20, width=16, layers=1, heads=2, embed_dim=8, max_len=10).eval()
    ids = torch.tensor([[3, 4, 5, 0, 0], [3, 4, 5, 9, 9]])
    out = tower(ids, torch.tensor([3, 3]))
    torch.testing.assert_close(out[0], out[1])  # causal: tokens after the last real one cannot matter
    shorter = tower(ids[:1, :3], torch.tensor([3]))
    torch.testing.assert_close(out[0], shorter[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tower(ids, torch.tensor([2, 3]))[0], out[0])  # the length picks the token
    with pytest.raises(ValueError, match="max_len"):
        tower(torch.zeros(1, 11, dtype=torch.long), torch.tensor([11]))
