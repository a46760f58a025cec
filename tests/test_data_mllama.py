"""Llama 3.2 Vision data: the tiling transform against transformers' MllamaImageProcessor (pixel for pixel), the
tiled batch layout (aspect_ratio_ids, zero tiles and padding slots), answers ending in eos for a model without
`<|endofchunk|>` logits, the Mllama tokenizer's `<|image|>`, and packing refused for tiled images."""

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from flamingo_fast.data import (CLIP_MEAN, CLIP_STD, EOC_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, Collator, ImageTransform,
                                Sample, TileTransform, build_loader, load_tokenizer, shapes_tokenizer, transform_for,
                                vqa_text)
from flamingo_fast.models.config import MLLAMA_ASPECT_RATIOS, FlamingoConfig

# (width, height): wide, tall, tiny, large, exactly one tile, just over, extreme strips, odd sizes
SIZES = [(1200, 300), (250, 900), (10, 7), (2000, 1500), (560, 560), (561, 1120), (3000, 200), (100, 1000),
         (57, 29), (800, 600)]


def _random_image(width, height, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


@pytest.fixture(scope="module")
def processors():
    """transformers' processor as Llama 3.2 Vision's preprocessor_config.json sets it (CLIP mean/std, bilinear),
    and ours, for 560 px tiles (the released model) and 28 px tiles (the tests' tiny model)."""
    made = {}
    for tile in (560, 28):
        hf = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=4,
                                     image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        made[tile] = hf, TileTransform(tile, 4, MLLAMA_ASPECT_RATIOS)
    return made


@pytest.mark.parametrize("tile", [560, 28])
@pytest.mark.parametrize("width, height", SIZES)
def test_tiles_equal_transformers_processor(processors, tile, width, height):
    hf, ours = processors[tile]
    image = _random_image(width, height, seed=width * height)
    expected = hf(images=[[image]], return_tensors="pt")
    tiles, ratio = ours(image)
    assert ratio == int(expected["aspect_ratio_ids"][0, 0])
    rows, cols = MLLAMA_ASPECT_RATIOS[ratio - 1]
    assert rows * cols == expected["num_tiles"][0][0]
    assert tiles.shape == (4, 3, tile, tile) and tiles.dtype == torch.float32
    # Same resize backend (Pillow bilinear) and the same float64 -> float32 arithmetic: bit-identical.
    assert torch.equal(tiles, expected["pixel_values"][0, 0])
    assert not tiles[rows * cols:].any()  # padding tiles are zeros


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_non_rgb_images_convert_as_transformers_does(processors, mode):
    hf, ours = processors[560]
    image = _random_image(700, 300, seed=3, mode=mode)  # RGBA: composited onto white
    tiles, ratio = ours(image)
    expected = hf(images=[[image]], return_tensors="pt")
    assert ratio == int(expected["aspect_ratio_ids"][0, 0]) and torch.equal(tiles, expected["pixel_values"][0, 0])


def test_tile_order_is_row_by_row():
    ours = TileTransform(4, 4, MLLAMA_ASPECT_RATIOS, mean=(0, 0, 0), std=(1, 1, 1))
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)  # 2 x 2 tiles of 4 px, each one grey level
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        pixels[4 * r:4 * r + 4, 4 * c:4 * c + 4] = 50 * (k + 1)
    tiles, ratio = ours(Image.fromarray(pixels))
    assert MLLAMA_ASPECT_RATIOS[ratio - 1] == (2, 2)
    assert [round(float(t.mean()) * 255) for t in tiles] == [50, 100, 150, 200]
    raw = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # uint8 (3, H, W) pixels: the same
    assert torch.equal(ours(raw)[0], tiles)


def test_tile_transform_refuses_what_has_no_aspect_ratio():
    ours = TileTransform(28, 4, MLLAMA_ASPECT_RATIOS)
    with pytest.raises(TypeError, match="one still image per <image>"):
        ours(torch.randn(4, 3, 28, 28))  # already transformed: its aspect ratio id is lost
    with pytest.raises(TypeError, match="one still image per <image>"):
        ours([_random_image(28, 28, 0), _random_image(28, 28, 1)])  # video frames
    with pytest.raises(ValueError, match="at most max_tiles=2"):
        TileTransform(28, 2, MLLAMA_ASPECT_RATIOS)


def test_transform_for_picks_tiles_for_the_mllama_presets():
    assert isinstance(transform_for(FlamingoConfig.from_preset("mllama-11b").vision), TileTransform)
    assert isinstance(transform_for(FlamingoConfig.from_preset("demo").vision), ImageTransform)
    tiled = transform_for(FlamingoConfig.from_preset("mllama-90b").vision)
    assert (tiled.image_size, tiled.max_tiles, tiled.aspect_ratios) == (560, 4, list(MLLAMA_ASPECT_RATIOS))


def test_tiled_batch_layout():
    tok = shapes_tokenizer()
    transform = TileTransform(28, 4, MLLAMA_ASPECT_RATIOS)
    collator = Collator(tok, transform=transform, eoc_as_eos=True)
    wide, tall, square = _random_image(120, 30, 1), _random_image(30, 60, 2), _random_image(28, 28, 3)
    text, start = vqa_text("what colour is the circle?", "red")
    samples = [Sample(text, [wide], loss_start=start),
               Sample(f"{IMAGE_TOKEN}Output:a red star{EOC_TOKEN}{IMAGE_TOKEN}Output:a blue cross{EOC_TOKEN}",
                      [tall, square])]
    batch = collator(samples)
    assert batch["images"].shape == (2, 2, 4, 3, 28, 28)
    ratios = [transform(image)[1] for image in (wide, tall, square)]
    assert [MLLAMA_ASPECT_RATIOS[r - 1] for r in ratios] == [(1, 4), (2, 1), (1, 1)]
    assert batch["aspect_ratio_ids"].tolist() == [[ratios[0], 0], ratios[1:]]  # 0: row 0's padding slot
    assert batch["aspect_ratio_ids"].dtype == torch.long and batch["num_images"].tolist() == [1, 2]
    assert torch.equal(batch["images"][0, 0], transform(wide)[0])
    assert torch.equal(batch["images"][1, 1], transform(square)[0])
    assert not batch["images"][0, 1].any()  # padding slot: zero pixels
    # eoc_as_eos: the chunk ends are eos, in the ids and as trained labels; no id the model cannot output remains.
    ids, labels = batch["input_ids"], batch["labels"]
    assert not (ids == tok.eoc_token_id).any() and (ids[1] == tok.eos_id).sum() == 2
    assert (labels[ids == tok.eos_id] == tok.eos_id).all()
    assert int(labels.max()) < tok.image_token_id and (labels[ids == tok.image_token_id] == IGNORE_INDEX).all()
    # Without eoc_as_eos (Flamingo's rule) the text keeps its <|endofchunk|>.
    plain = Collator(tok, transform=transform)(samples)
    assert (plain["input_ids"] == tok.eoc_token_id).sum() == 3


def test_eoc_as_eos_needs_a_pad_token_other_than_eos(tmp_path):
    tok = load_tokenizer(_mllama_tokenizer(tmp_path, pad=False))
    assert tok.pad_id == tok.eos_id  # no pad token: padding with eos
    with pytest.raises(ValueError, match="pads with eos"):
        Collator(tok, transform=TileTransform(28, 4, MLLAMA_ASPECT_RATIOS), eoc_as_eos=True)


def test_packing_refuses_tiled_images():
    tok = shapes_tokenizer()
    collator = Collator(tok, transform=TileTransform(28, 4, MLLAMA_ASPECT_RATIOS), max_length=32)
    with pytest.raises(ValueError, match="packing=True cannot carry tiled images"):
        build_loader([{"kind": "shapes", "n": 4}], tok, 2, 28, collator=collator, max_length=32, packing=True,
                     num_workers=0, prefetch_factor=0)
    with build_loader([{"kind": "shapes", "n": 8}], tok, 2, 28, collator=collator, max_length=32, num_workers=0,
                      prefetch_factor=0, cycle=False) as loader:
        batch = next(iter(loader))
    assert batch["images"].shape[2:] == (4, 3, 28, 28) and (batch["aspect_ratio_ids"] == 1).all()  # square shapes


def _mllama_tokenizer(folder, pad=True):
    """A Llama 3.2 Vision style tokenizer.json: byte-level BPE, Llama 3's special tokens, `<|image|>` last."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["what colour is the circle? red", "Question: Short answer: Output:"] * 20, trainer)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"] + (["<|finetune_right_pad_id|>"] if pad else [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + ["<|image|>"]])
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_mllama_tokenizer_image_token_is_the_flamingo_image_id(tmp_path):
    raw = HFTokenizer.from_file(str(_mllama_tokenizer(tmp_path) / "tokenizer.json"))
    image_id = raw.token_to_id("<|image|>")
    assert image_id == raw.get_vocab_size() - 1
    tok = load_tokenizer(tmp_path)
    # `<|image|>` keeps its id, which is the text vocabulary size: cfg.image_token_id = lm.vocab_size.
    assert (tok.image_token_id, tok.eoc_token_id, tok.vocab_size) == (image_id, image_id + 1, image_id + 2)
    assert tok.base_vocab_size == image_id
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(raw.token_to_id(t) for t in (
        "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"))
    ids = tok.encode(f"{IMAGE_TOKEN}Question:what colour is the circle? Short answer:red{EOC_TOKEN}")
    assert ids[0] == image_id and ids[-1] == tok.eoc_token_id and ids.count(image_id) == 1
    assert ids[1:-1] == raw.encode("Question:what colour is the circle? Short answer:red").ids
    tok.save(tmp_path / "saved")  # saved and reloaded: the same ids
    again = load_tokenizer(tmp_path / "saved")
    assert (again.image_token_id, again.eoc_token_id, again.vocab_size) == (image_id, image_id + 1, image_id + 2)
