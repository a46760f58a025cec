"""The media-mask tile plan of `_C` (host and CUDA paths) against a plain Python scan of the dense mask."""

import pytest
import torch

from flamingo_fast import native
from flamingo_fast.tile_plan import plan_media_tiles

pytestmark = pytest.mark.skipif(native.load() is None, reason="flamingo_fast._C is not built")


def random_media_index(generator: torch.Generator, batch: int, seq_len: int, num_images: int) -> torch.Tensor:
    """Non-decreasing rows: leading text (-1), consecutive images, rows without any image."""
    rows = []
    for _ in range(batch):
        steps = torch.rand(seq_len, generator=generator) < torch.rand(1, generator=generator).item() * 0.3
        start = int(torch.randint(-1, 1, (1,), generator=generator))
        row = (start + torch.cumsum(steps.long(), 0)).clamp(max=num_images - 1)
        rows.append(row)
    return torch.stack(rows)


def dense_mask(media_index: torch.Tensor, num_keys: int, latents: int, only_immediate: bool) -> torch.Tensor:
    key_image = torch.arange(num_keys) // latents
    index = media_index.unsqueeze(-1)
    visible = key_image == index if only_immediate else key_image <= index
    return visible & (index >= 0)


def hull(flags: torch.Tensor) -> list[int]:
    positions = torch.nonzero(flags).flatten()
    return [0, 0] if positions.numel() == 0 else [int(positions[0]), int(positions[-1]) + 1]


def plain_plan(media_index, num_keys, latents, block_q, block_k, only_immediate):
    mask = dense_mask(media_index, num_keys, latents, only_immediate)
    seq_len = media_index.shape[1]
    q_plan = [[hull(mask[b, q0:q0 + block_q].any(0)) for q0 in range(0, seq_len, block_q)]
              for b in range(mask.shape[0])]
    k_plan = [[hull(mask[b, :, k0:k0 + block_k].any(1)) for k0 in range(0, num_keys, block_k)]
              for b in range(mask.shape[0])]
    return q_plan, k_plan


def normalise(plan: torch.Tensor) -> list:
    # Empty ranges compare equal whatever their bounds.
    return [[r if r[1] > r[0] else [0, 0] for r in row] for row in plan.tolist()]


@pytest.mark.parametrize("only_immediate", [True, False])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_host_plan_matches_dense_mask(only_immediate, dtype):
    generator = torch.Generator().manual_seed(7)
    for trial in range(40):
        batch = int(torch.randint(1, 4, (1,), generator=generator))
        seq_len = int(torch.randint(1, 400, (1,), generator=generator))
        num_images = int(torch.randint(1, 9, (1,), generator=generator))
        latents = [1, 7, 64][trial % 3]
        block_q, block_k = [(128, 128), (64, 64), (5, 33)][trial % 3]
        media_index = random_media_index(generator, batch, seq_len, num_images).to(dtype)
        num_keys = num_images * latents
        q_plan, k_plan = plan_media_tiles(media_index, num_keys, latents, block_q, block_k, only_immediate)
        assert q_plan.dtype == torch.int32 and q_plan.shape == (batch, -(-seq_len // block_q), 2)
        assert k_plan.shape == (batch, -(-num_keys // block_k), 2)
        want_q, want_k = plain_plan(media_index.long(), num_keys, latents, block_q, block_k, only_immediate)
        assert normalise(q_plan) == want_q, f"trial {trial}"
        assert normalise(k_plan) == want_k, f"trial {trial}"


def test_hand_computed_plan():
    media_index = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 2, 2, 2]])
    q_plan, k_plan = plan_media_tiles(media_index, num_keys=12, latents_per_media=4, block_q=4, block_k=4)
    assert q_plan.tolist() == [[[0, 4], [0, 12], [8, 12]]]
    assert k_plan.tolist() == [[[2, 5], [5, 7], [7, 10]]]
    q_plan, k_plan = plan_media_tiles(media_index, 12, 4, 4, 4, only_immediate=False)
    assert k_plan.tolist() == [[[2, 10], [5, 10], [7, 10]]]


def test_row_without_images_plans_nothing():
    q_plan, k_plan = plan_media_tiles(torch.full((2, 300), -1), num_keys=128, latents_per_media=64)
    assert (q_plan[..., 1] <= q_plan[..., 0]).all() and (k_plan[..., 1] <= k_plan[..., 0]).all()


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(media_index=torch.zeros(4, dtype=torch.long)), ValueError, "media_index must be a 2-D"),
    (dict(media_index=torch.zeros(1, 4)), TypeError, "media_index must be int32 or int64"),
    (dict(media_index=torch.zeros(1, 4, dtype=torch.long), latents_per_media=0), ValueError, "latents_per_media"),
    (dict(media_index=torch.zeros(1, 4, dtype=torch.long), num_keys=100), ValueError, "num_keys"),
    (dict(media_index=torch.zeros(1, 4, dtype=torch.long), block_q=0), ValueError, "block_q"),
])
def test_bad_arguments_are_named(kwargs, error, words):
    arguments = dict(num_keys=128, latents_per_media=64) | kwargs
    with pytest.raises(error, match=words):
        plan_media_tiles(**arguments)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("only_immediate", [True, False])
def test_cuda_plan_equals_host_plan(only_immediate):
    generator = torch.Generator().manual_seed(11)
    media_index = random_media_index(generator, 5, 4099, 32)
    host = plan_media_tiles(media_index, 32 * 64, 64, 128, 128, only_immediate)
    device = plan_media_tiles(media_index.cuda().int(), 32 * 64, 64, 128, 128, only_immediate)
    for want, got in zip(host, device):
        assert got.is_cuda and torch.equal(got.cpu(), want)
