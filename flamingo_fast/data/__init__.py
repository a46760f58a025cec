"""Data for flamingo-fast: one sample type, tokenizers, image transforms, sources and torchdata pipelines.

    from flamingo_fast.data import build_loader, shapes_tokenizer, shapes_eval_split
    tok = shapes_tokenizer()
    loader = build_loader([{"kind": "shapes", "n": 50000}], tok, batch_size=32, image_size=64)
    for batch in loader: ...        # dict: input_ids, attention_mask, labels, media_index, images, num_images
                                    # (+ aspect_ratio_ids with a TileTransform collator: Llama 3.2 Vision)
    state = loader.state_dict()     # checkpoint with the trainer; loader.load_state_dict(state) resumes
"""

from flamingo_fast.data.captions import CaptionDataset, CaptionSource
from flamingo_fast.data.collate import IGNORE_INDEX, Collator, EncodedSample
from flamingo_fast.data.packing import Packer, collate_packed, cu_seqlens_from_document_ids
from flamingo_fast.data.pipeline import (
    SOURCE_KINDS,
    DataLoader,
    build_loader,
    make_source,
    make_tokenizer,
    shapes_eval_split,
)
from flamingo_fast.data.sample import (
    EOC_TOKEN,
    IMAGE_TOKEN,
    BadSampleError,
    Sample,
    caption_text,
    vqa_text,
)
from flamingo_fast.data.shapes import ShapesDataset, shapes_dataset, shapes_tokenizer, shapes_words
from flamingo_fast.data.skipping import SkipFilter, Skipped
from flamingo_fast.data.source import MapSource, ShardedIndexSampler, Source, iter_samples
from flamingo_fast.data.tiling import TileTransform, transform_for
from flamingo_fast.data.tokenizer import Tokenizer, build_word_tokenizer, load_tokenizer
from flamingo_fast.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, decode_image, open_image
from flamingo_fast.data.vqav2 import VQAv2Dataset, VQAv2Source
from flamingo_fast.data.webdataset import TarShardSource, expand_shards, read_shard, record_to_sample

__all__ = [
    "BadSampleError",
    "CLIP_MEAN",
    "CLIP_STD",
    "CaptionDataset",
    "CaptionSource",
    "Collator",
    "DataLoader",
    "EOC_TOKEN",
    "EncodedSample",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "ImageTransform",
    "MapSource",
    "Packer",
    "SOURCE_KINDS",
    "Sample",
    "ShapesDataset",
    "ShardedIndexSampler",
    "SkipFilter",
    "Skipped",
    "Source",
    "TarShardSource",
    "TileTransform",
    "Tokenizer",
    "VQAv2Dataset",
    "VQAv2Source",
    "build_loader",
    "build_word_tokenizer",
    "caption_text",
    "collate_packed",
    "cu_seqlens_from_document_ids",
    "decode_image",
    "expand_shards",
    "iter_samples",
    "load_tokenizer",
    "make_source",
    "make_tokenizer",
    "open_image",
    "read_shard",
    "record_to_sample",
    "shapes_dataset",
    "shapes_eval_split",
    "shapes_tokenizer",
    "shapes_words",
    "transform_for",
    "vqa_text",
]
