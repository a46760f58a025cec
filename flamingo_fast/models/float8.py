"""Float8 training for the frozen language model: torchao's float8 Linear on the frozen LM blocks.

A training step's largest cost is the frozen LM: its forward and input-gradient matmuls (frozen weights get
no weight gradient). torchao's `convert_to_float8_training` swaps those nn.Linear layers for Float8Linear
(dynamic per-tensor scaling, matmuls on Hopper's float8 tensor cores); the trainable xattn layers and
resampler, the LM head and the frozen vision encoder stay in the autocast dtype. Only on a GPU that has
float8 matmuls (compute capability 8.9 or 9.0+) and with torchao installed: anywhere else this raises
rather than silently training in bf16.
"""

from __future__ import annotations

import torch
from torch import nn


def float8_unsupported_reason(device: torch.device) -> str | None:
    """Why float8 training cannot run on `device`, or None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"float8 training needs a CUDA GPU with float8 matmuls (Hopper, sm_89+); got device {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return (f"float8 training needs compute capability 8.9+ (Ada/Hopper); {torch.cuda.get_device_name(device)} "
                f"has {capability}")
    try:
        import torchao.float8  # noqa: F401
    except ImportError as exc:
        return f"float8 training needs torchao (pip install torchao): {exc}"
    return None


def _frozen_block_linear(module: nn.Module, fqn: str) -> bool:
    # float8 matmuls need both dimensions divisible by 16.
    return (isinstance(module, nn.Linear) and not module.weight.requires_grad and fqn.startswith("layers.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_frozen_lm_to_float8(model: nn.Module, device: torch.device | None = None) -> int:
    """Swap the frozen LM blocks' Linear layers of a Flamingo `model` for torchao Float8Linear in place
    (call after set_trainable, before compile and FSDP). Returns how many layers were converted."""
    device = device or next(model.parameters()).device
    reason = float8_unsupported_reason(device)
    if reason is not None:
        raise RuntimeError(reason)
    from torchao.float8 import convert_to_float8_training

    converted = [fqn for fqn, module in model.lm.named_modules() if _frozen_block_linear(module, fqn)]
    if not converted:
        raise ValueError("no frozen LM block Linear layers to convert (is the LM trainable, or are its widths "
                         "not multiples of 16?)")
    convert_to_float8_training(model.lm, module_filter_fn=_frozen_block_linear)
    return len(converted)
