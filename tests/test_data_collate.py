"""Sample validation, image transform and the collator's batch layout (padding, labels, media_index, images)."""

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import llama_style_tokenizer_json
from flamingo_fast.data import (
    EOC_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    BadSampleError,
    Collator,
    ImageTransform,
    Sample,
    caption_text,
    load_tokenizer,
    shapes_tokenizer,
    vqa_text,
)


def _image(colour=(255, 0, 0), size=(24, 16)):
    return Image.new("RGB", size, colour)


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer()


def _words(tok, ids):
    return [tok.hf_tokenizer.id_to_token(int(i)) for i in ids]


def test_sample_rejects_more_markers_than_images():
    with pytest.raises(BadSampleError) as info:
        Sample(f"{IMAGE_TOKEN}a{IMAGE_TOKEN}b", [_image()])
    assert info.value.reason == "image_marker_mismatch"
    with pytest.raises(TypeError, match="images\\[0\\]"):
        Sample(IMAGE_TOKEN, ["not an image"])
    with pytest.raises(ValueError, match="task"):
        Sample(IMAGE_TOKEN, [_image()], task="dance")


def test_prompt_formats():
    text, start = caption_text("a red star")
    assert text == "<image>Output:a red star<|endofchunk|>" and text[:start] == "<image>Output:"
    text, start = vqa_text("how many shapes?", "two")
    assert text == "<image>Question:how many shapes? Short answer:two<|endofchunk|>"
    assert Sample(text, [_image()], loss_start=start).prompt == "<image>Question:how many shapes? Short answer:"


def test_transform_resizes_crops_and_normalises():
    transform = ImageTransform(8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    out = transform(_image((255, 0, 0), size=(30, 20)))
    assert out.shape == (1, 3, 8, 8) and out.dtype == torch.float32
    assert torch.allclose(out[0, 0], torch.full((8, 8), 2.0))  # (1 - 0.5) / 0.25
    assert torch.allclose(out[0, 1], torch.full((8, 8), -1.0))  # (0 - 0.5) / 0.5
    video = transform([_image(), _image((0, 0, 255)), _image()])
    assert video.shape == (3, 3, 8, 8)
    raw = torch.zeros(3, 20, 30, dtype=torch.uint8)
    assert transform(raw).shape == (1, 3, 8, 8)
    ready = torch.randn(2, 3, 8, 8)
    assert torch.equal(transform(ready), ready)  # float tensors are already transformed
    with pytest.raises(ValueError, match="8x8"):
        transform(torch.randn(3, 9, 9))


def _quadrants(width: int, height: int) -> Image.Image:
    """Four solid quadrants (red top-left, green top-right, blue bottom-left, white bottom-right): any flip,
    transpose or off-centre crop moves a known colour to a known wrong place."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = (255, 0, 0)
    pixels[: height // 2, width // 2:] = (0, 255, 0)
    pixels[height // 2:, : width // 2] = (0, 0, 255)
    pixels[height // 2:, width // 2:] = (255, 255, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("width, height", [(64, 64), (96, 64), (64, 96), (200, 50)])
def test_transform_keeps_orientation_and_crops_the_centre(width, height):
    transform = ImageTransform(16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # plain [0, 1] pixels
    out = transform(_quadrants(width, height))[0]  # (3, 16, 16): channel, row, column
    expected = {(0, 0): (1, 0, 0), (0, 1): (0, 1, 0), (1, 0): (0, 0, 1), (1, 1): (1, 1, 1)}  # (top?, right?) -> RGB
    for (bottom, right), rgb in expected.items():
        # the middle of each quadrant of the output, away from the resampled border between quadrants
        row, col = 4 + 8 * bottom, 4 + 8 * right
        torch.testing.assert_close(out[:, row, col], torch.tensor(rgb, dtype=torch.float32), atol=0.02, rtol=0)
    # A centre crop keeps the quadrant border in the middle: the long side is cropped equally on both ends.
    assert (out[:, :, 7] - out[:, :, 8]).abs().sum() > 1 and (out[:, 7, :] - out[:, 8, :]).abs().sum() > 1


def test_transform_normalises_each_channel_with_its_own_mean_and_std():
    transform = ImageTransform(4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    out = transform(Image.new("RGB", (4, 4), (51, 102, 204)))[0]  # 0.2, 0.4, 0.8 in [0, 1]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([(0.2 - 0.1) / 0.5, (0.4 - 0.2) / 0.25, (0.8 - 0.3) / 2.0]))


def test_collate_layout_padding_labels_media_index(tok):
    collator = Collator(tok, image_size=16)
    caption, cap_start = caption_text("a red circle")
    interleaved = f"{IMAGE_TOKEN}Output:a blue star{EOC_TOKEN}{IMAGE_TOKEN}Output:two{EOC_TOKEN}"
    samples = [
        Sample(caption, [_image()], loss_start=None),
        Sample("what " + interleaved, [_image((0, 255, 0)), _image((0, 0, 255))]),
    ]
    batch = collator(samples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "media_index", "images", "num_images"}
    ids, labels, mask, media = batch["input_ids"], batch["labels"], batch["attention_mask"], batch["media_index"]
    lengths = [1 + len(tok.encode(s.text)) for s in samples]  # bos + text
    assert ids.shape == labels.shape == mask.shape == media.shape == (2, max(lengths))
    assert ids.dtype == labels.dtype == media.dtype == torch.long

    # Row 0: right padding with pad id, labels -100 on padding, bos, <image>.
    assert mask[0].tolist() == [1] * lengths[0] + [0] * (max(lengths) - lengths[0])
    assert (ids[0, lengths[0] :] == tok.pad_id).all() and (labels[0, lengths[0] :] == IGNORE_INDEX).all()
    assert ids[0, 0] == tok.bos_id and ids[0, 1] == tok.image_token_id
    assert labels[0, :2].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert labels[0, 2 : lengths[0]].tolist() == ids[0, 2 : lengths[0]].tolist()  # loss_start=None: all text trained
    assert _words(tok, ids[0, lengths[0] - 1 : lengths[0]]) == [EOC_TOKEN]

    # Row 1: text before the first image ("what") and both <image> tokens are masked.
    row = ids[1].tolist()
    first, second = [i for i, t in enumerate(row) if t == tok.image_token_id]
    assert _words(tok, ids[1, :first]) == ["<s>", "what"]
    assert (labels[1, : first + 1] == IGNORE_INDEX).all() and labels[1, second] == IGNORE_INDEX
    trained = [i for i in range(first + 1, lengths[1]) if i != second]
    assert labels[1, trained].tolist() == ids[1, trained].tolist()

    # media_index = cumsum(<image>) - 1
    assert media[1, :first].tolist() == [-1] * first
    assert media[1, first:second].tolist() == [0] * (second - first)
    assert (media[1, second : lengths[1]] == 1).all()
    assert media[0, 0] == -1 and (media[0, 1 : lengths[0]] == 0).all()

    # images (B, T_max, F, C, H, W), zero-padded for the row with one image
    assert batch["images"].shape == (2, 2, 1, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert batch["num_images"].tolist() == [1, 2]
    assert (batch["images"][0, 1] == 0).all() and not (batch["images"][0, 0] == 0).all()
    expected_blue = collator.transform(_image((0, 0, 255)))
    assert torch.allclose(batch["images"][1, 1], expected_blue)


def test_loss_start_masks_the_prompt(tok):
    text, start = vqa_text("what colour is the star?", "purple")
    batch = Collator(tok, image_size=16)([Sample(text, [_image()], loss_start=start)])
    trained = batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX]
    assert _words(tok, trained) == ["purple", EOC_TOKEN]
    unmasked = Collator(tok, image_size=16, mask_prompt=False)([Sample(text, [_image()], loss_start=start)])
    assert _words(tok, unmasked["input_ids"][0][unmasked["labels"][0] != IGNORE_INDEX])[:2] == ["question", ":"]


def test_loss_start_with_a_llama_style_tokenizer(tmp_path):
    path, _ = llama_style_tokenizer_json(tmp_path)
    llama = load_tokenizer(path)
    text, start = vqa_text("the quick fox?", "the lazy dog")
    batch = Collator(llama, image_size=16)([Sample(text, [_image()], loss_start=start)])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids[0] == llama.bos_id and ids[1] == llama.image_token_id
    trained = ids[labels != IGNORE_INDEX].tolist()
    assert trained[-1] == llama.eoc_token_id
    assert llama.decode(trained) == "the lazy dog"


def test_left_padding_for_generation(tok):
    collator = Collator(tok, image_size=16, padding_side="left")
    batch = collator([Sample(IMAGE_TOKEN + "Output:", [_image()]), Sample(IMAGE_TOKEN + "Output:a red star", [_image()])])
    assert batch["attention_mask"][0].tolist()[:3] == [0, 0, 0] and batch["input_ids"][0, -1] == tok.hf_tokenizer.token_to_id(":")
    assert (batch["media_index"][0, :4] == -1).all()  # 3 pads + bos


def test_max_length_truncation_drops_cut_images(tok):
    text = f"{IMAGE_TOKEN}Output:a red star{EOC_TOKEN}{IMAGE_TOKEN}Output:a blue cross{EOC_TOKEN}"
    encoded = Collator(tok, image_size=16, max_length=8).encode(Sample(text, [_image(), _image()]))
    assert encoded.input_ids.numel() == 8 and encoded.images.shape[0] == 1


def test_add_eos_is_trained(tok):
    encoded = Collator(tok, image_size=16, add_eos=True).encode(Sample(IMAGE_TOKEN + "red", [_image()]))
    assert encoded.input_ids[-1] == tok.eos_id and encoded.labels[-1] == tok.eos_id


def test_video_frames_and_frame_count_checks(tok):
    collator = Collator(tok, image_size=8)
    frames = [_image(), _image((0, 255, 0))]
    batch = collator([Sample(IMAGE_TOKEN + "red", [frames]), Sample(IMAGE_TOKEN + "red", [[_image(), _image()]])])
    assert batch["images"].shape == (2, 1, 2, 3, 8, 8)
    with pytest.raises(ValueError, match="frame count"):
        collator([Sample(IMAGE_TOKEN + "red", [frames]), Sample(IMAGE_TOKEN + "red", [_image()])])


def test_collator_argument_errors(tok):
    with pytest.raises(ValueError, match="image_size"):
        Collator(tok)
    with pytest.raises(TypeError, match="Tokenizer"):
        Collator(object(), image_size=8)
    with pytest.raises(ValueError, match="padding_side"):
        Collator(tok, image_size=8, padding_side="middle")
    with pytest.raises(ValueError, match="empty"):
        Collator(tok, image_size=8).collate([])
