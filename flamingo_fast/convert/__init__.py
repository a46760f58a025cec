"""Checkpoint import: Hugging Face Llama / CLIP folders, OpenFlamingo state dicts, and this project's own
exported folders.

    from_hf_llama(folder, into=None)        -> LanguageModel (config: .cfg, an LMConfig)
    from_hf_clip_vision(folder, into=None)  -> VisionTransformer (config: .cfg, a VisionConfig)
    from_open_flamingo(path, cfg, model=None) -> Flamingo
    from_hf_mllama(folder)                  -> Flamingo (Llama 3.2 Vision; config: mllama_config(folder))
    save_pretrained(model, tokenizer, folder) / load_pretrained(folder) -> (Flamingo, Tokenizer)
        this project's exported folder: config.json + model.safetensors + tokenizer.json
    llama_config(folder) / clip_vision_config(folder) / open_flamingo_config(lm, vision, n)  -> configs

Each reads tensors one at a time (safetensors shards, or a memory-mapped torch file), keeps the file's
dtype for weights it creates, and raises CheckpointKeyError (a ValueError) listing missing and unexpected
tensor names before loading anything. To build a Flamingo from released parts:

    cfg = FlamingoConfig(lm=llama_config(lm_dir), vision=clip_vision_config(clip_dir), ...)
    with torch.device("meta"):
        model = Flamingo(cfg)
    from_hf_llama(lm_dir, into=model.lm); from_hf_clip_vision(clip_dir, into=model.vision)
    # then the trained parts: from_open_flamingo(path, cfg, model=model), or the project's own checkpoint
"""

from flamingo_fast.convert.clip import clip_vision_config, from_hf_clip_vision
from flamingo_fast.convert.llama import from_hf_llama, llama_config
from flamingo_fast.convert.loading import CheckpointKeyError
from flamingo_fast.convert.mllama import from_hf_mllama, mllama_config
from flamingo_fast.convert.open_flamingo import from_open_flamingo, open_flamingo_config
from flamingo_fast.convert.pretrained import load_pretrained, save_pretrained

__all__ = [
    "CheckpointKeyError",
    "clip_vision_config",
    "from_hf_clip_vision",
    "from_hf_llama",
    "from_hf_mllama",
    "from_open_flamingo",
    "llama_config",
    "load_pretrained",
    "mllama_config",
    "open_flamingo_config",
    "save_pretrained",
]
