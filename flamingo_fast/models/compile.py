"""torch.compile for Flamingo models: regional (the default) or whole-model.

Regional compilation compiles each repeated block in place (`Flamingo.shard_units()`: every vision block,
the resampler, every LM block and xattn layer). Dynamo treats a module's parameters as graph inputs
(`inline_inbuilt_nn_modules`, on by default), so blocks of one kind share one compiled graph: compile time
grows with the number of block *kinds*, not with depth, and the glue between blocks (embeddings, heads,
loss) stays eager. Whole-model compilation traces everything into one graph, which takes longer to build
and is rebuilt for every new input shape; it stays available for comparison.
"""

from __future__ import annotations

from torch import nn

COMPILE_MODES = ("regional", "whole")


def compile_regions(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile every module of `model.shard_units()` in place (Module.compile: parameter names and
    state_dict keys are unchanged). Returns `model`."""
    if not hasattr(model, "shard_units"):
        raise TypeError(f"{type(model).__name__} has no shard_units(); expected a flamingo_fast Flamingo model")
    for unit in model.shard_units():
        for module in unit:
            module.compile(**compile_kwargs)
    return model


def compile_model(model: nn.Module, mode: str = "regional", **compile_kwargs) -> nn.Module:
    """Compile `model` in place, per block ("regional") or as one graph ("whole"). Returns `model`."""
    if mode == "regional":
        return compile_regions(model, **compile_kwargs)
    if mode == "whole":
        model.compile(**compile_kwargs)
        return model
    raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
