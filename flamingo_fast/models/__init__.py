"""Flamingo model: config presets, vision encoder, Perceiver Resampler, gated xattn layers, LM."""

from flamingo_fast.models.config import (
    PRESETS,
    FlamingoConfig,
    LMConfig,
    PerceiverConfig,
    VisionConfig,
    XAttnConfig,
)
from flamingo_fast.models.flamingo import Flamingo, FlamingoCache, FlamingoOutput
from flamingo_fast.models.lm import KVCache, LanguageModel
from flamingo_fast.models.perceiver import PerceiverResampler
from flamingo_fast.models.vision import VisionTransformer
from flamingo_fast.models.xattn import GatedXAttnDense

__all__ = [
    "PRESETS",
    "Flamingo",
    "FlamingoCache",
    "FlamingoConfig",
    "FlamingoOutput",
    "GatedXAttnDense",
    "KVCache",
    "LMConfig",
    "LanguageModel",
    "PerceiverConfig",
    "PerceiverResampler",
    "VisionConfig",
    "VisionTransformer",
    "XAttnConfig",
]
