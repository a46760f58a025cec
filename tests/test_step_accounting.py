"""What a training step costs and keeps: the trainer's FLOP counter (train/metrics.py) against torch's own
FlopCounterMode, and no work or memory spent on the frozen parts (no weight gradients for frozen
parameters, a frozen Linear's backward = its input gradient only, nothing saved for backward inside the
frozen vision encoder)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.e2e import E2ECase, build_model, forced_backend, make_batch, register_op_flop_formulas
from train.metrics import BatchShape, FlopCounter

CPU = torch.device("cpu")
# The demo preset as it trains, and the 3b widths (ViT-L/14 at 224 px, resampler 1536, LM 2048 with 128-wide
# heads) at a depth a CPU test can run.
CASES = {
    "demo": E2ECase("demo", "demo", batch=2, seq=64, images=2),
    "3b-shape-tiny": E2ECase("3b-shape-tiny", "3b", batch=1, seq=48, images=2,
                             overrides={"lm": {"layers": 2}, "vision": {"layers": 1}, "resampler": {"depth": 1}}),
}


def _measured(case: E2ECase):
    """The model (gradients of one step), its batch shape, FlopCounterMode's forward and forward+backward."""
    register_op_flop_formulas()
    cfg = case.config()
    model = build_model(cfg, CPU, seed=0)
    ids, images, labels = make_batch(cfg, case, CPU, seed=0)
    with forced_backend("torch"):
        with FlopCounterMode(display=False) as fwd:
            model(ids, images, labels=labels)
        # A second step counted whole: modules are tracked in the backward only when the mode saw the forward.
        with FlopCounterMode(display=False) as both:
            model(ids, images, labels=labels).loss.backward()
    shape = BatchShape.from_batch({"input_ids": ids, "media_index": model.compute_media_index(ids), "images": images})
    return model, shape, fwd, both


@pytest.fixture(scope="module", params=list(CASES))
def measured(request):
    return _measured(CASES[request.param])


def test_flop_counter_matches_torch_count_within_5_percent(measured):
    model, shape, fwd, both = measured
    counter = FlopCounter(model)
    forward, total = fwd.get_total_flops(), both.get_total_flops()
    assert counter.flops(shape, backward=False) == pytest.approx(forward, rel=0.05)
    assert counter.flops(shape) == pytest.approx(total, rel=0.05)
    # Not trivially close: the backward is more than the forward (trainable weights cost 2x, frozen 1x).
    assert 1.0 < (total - forward) / forward < 2.0


def _linear_flops(counts: dict, module_name: str) -> int:
    """FLOPs FlopCounterMode charged to the matmuls under one module (its weight's mm/addmm)."""
    ops = counts.get(module_name, {})
    return sum(v for op, v in ops.items() if "mm" in str(op))


def test_frozen_linear_backward_is_input_gradient_only(measured):
    model, _, fwd, both = measured
    f, fb = fwd.get_flop_counts(), both.get_flop_counts()
    b = {name: {op: v - f.get(name, {}).get(op, 0) for op, v in ops.items()} for name, ops in fb.items()}
    frozen = "Flamingo.lm.layers.0.mlp.down_proj"
    trainable = "Flamingo.xattn_layers.0.ffw.fc2"
    assert not model.lm.layers[0].mlp.down_proj.weight.requires_grad
    assert model.xattn_layers["0"].ffw.fc2.weight.requires_grad
    assert _linear_flops(f, frozen) > 0 and _linear_flops(f, trainable) > 0
    assert _linear_flops(b, frozen) == _linear_flops(f, frozen)  # dX only
    assert _linear_flops(b, trainable) == 2 * _linear_flops(f, trainable)  # dX and dW
    # The vision encoder (frozen, first in the graph) has no backward at all.
    assert not any(name.startswith("Flamingo.vision") for name, ops in b.items() if sum(ops.values()))
    assert sum(f.get("Flamingo.vision", {}).values()) > 0


def test_no_weight_gradients_for_frozen_parameters(measured):
    model, *_ = measured
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert frozen and trainable
    params = dict(model.named_parameters())
    assert all(params[n].grad is None for n in frozen)
    assert all(params[n].grad is not None for n in trainable)


def test_nothing_is_saved_for_backward_inside_the_frozen_vision_encoder():
    case = CASES["demo"]
    cfg = case.config()
    model = build_model(cfg, CPU, seed=0)
    ids, images, labels = make_batch(cfg, case, CPU, seed=0)
    saved = {"vision": 0, "elsewhere": 0}
    inside = []

    def leave(*_):
        inside.pop()  # (a forward hook that returns a value would replace the output)

    model.vision.register_forward_pre_hook(lambda *_: inside.append(True))
    model.vision.register_forward_hook(leave)

    def pack(tensor):
        saved["vision" if inside else "elsewhere"] += tensor.numel() * tensor.element_size()
        return tensor

    with forced_backend("torch"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, images, labels=labels).loss
    assert saved["vision"] == 0, f"{saved['vision']} bytes kept for a backward through the frozen encoder"
    assert saved["elsewhere"] > 0  # the hook does see what the trainable path keeps
    loss.backward()
