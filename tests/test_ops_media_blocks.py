"""Query-block planning of the torch media_cross_attention: every token once, little padding, no mixing."""

import pytest
import torch

from flamingo_fast.ops.media_blocks import MAX_BLOCK, QUANTUM, plan_media_blocks


def _row(*pieces):
    return [value for value, count in pieces for _ in range(count)]


ROWS = [
    _row((-1, 3), (0, 65), (1, 100), (2, 1), (3, 257), (4, 17)),
    _row((0, 300), (1, 16), (2, 127)),
    _row((-1, 428), (0, 15)),
    _row((2, 443)),
]


@pytest.mark.parametrize("only_immediate", [True, False])
def test_blocks_cover_each_image_token_once(only_immediate):
    media_index = torch.tensor(ROWS)
    batch, seq = media_index.shape
    plan = plan_media_blocks(media_index, 5, 8, only_immediate)
    seen = torch.zeros(batch * seq, dtype=torch.long)
    padding = 0
    for bs in plan.block_sets:
        size = bs.rows.shape[1]
        assert size % QUANTUM == 0 and size <= MAX_BLOCK
        tokens = bs.rows[bs.valid]
        seen.index_add_(0, tokens, torch.ones_like(tokens))
        # A block holds consecutive tokens of one batch row and one image, starting at slot 0.
        assert bs.valid[:, 0].all()
        flat = media_index.reshape(-1)
        for rows, valid, b, m in zip(bs.rows, bs.valid, bs.batch, bs.image):
            real = rows[valid]
            assert torch.equal(real, real[0] + torch.arange(real.numel()))
            assert (real // seq == b).all() and (flat[real] == m).all()
        padding += int((~bs.valid).sum())
    assert torch.equal(seen, (media_index.reshape(-1) >= 0).long())
    runs = 5 + 3 + 1 + 1  # runs of image tokens in ROWS
    assert padding < QUANTUM * runs


@pytest.mark.parametrize("only_immediate", [True, False])
def test_chunks_respect_budget_and_key_ranges(only_immediate):
    media_index = torch.tensor(ROWS)
    plan = plan_media_blocks(media_index, 5, 8, only_immediate)
    budget = 2048
    total_rows = 0
    for chunk in plan.chunks(budget):
        n, r = chunk.rows.shape
        assert n == 1 or n * r * chunk.num_keys <= budget
        images = media_index.reshape(-1)[chunk.rows[:, 0]]
        if only_immediate:
            assert chunk.num_keys == 8
            assert torch.equal(chunk.key_index, chunk.rows[:, 0] // media_index.shape[1] * 5 + images)
        else:
            assert (chunk.num_keys == (images + 1) * 8).all()
            assert torch.equal(chunk.key_index, chunk.rows[:, 0] // media_index.shape[1])
        total_rows += int(chunk.valid.sum())
    assert total_rows == int((media_index >= 0).sum())


def test_no_blocks_without_images():
    plan = plan_media_blocks(torch.full((2, 7), -1), 0, 64, True)
    assert plan.block_sets == [] and list(plan.chunks(1 << 16)) == []
