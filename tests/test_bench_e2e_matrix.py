"""The training-step matrix (bench/e2e.py): its cases, the OpenFlamingo baseline it times against, the
variants that must say why they cannot run here, and the same-run ratios the report prints."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bench.e2e import (
    MODELS,
    QUICK_DEMO,
    SHAPES,
    E2ECase,
    Unavailable,
    check_variant,
    e2e_case,
    prepare_e2e,
    select_e2e_cases,
)
from bench.harness import Row, Settings
from bench.report import train_step_ratios

CPU = Settings(device=torch.device("cpu"), dtype=torch.float32, min_time_s=0.01)
TINY = E2ECase("demo", "demo", batch=2, seq=24, images=2, shape_name="tiny",
               overrides={"lm": {"layers": 2}, "vision": {"layers": 1}, "resampler": {"depth": 1}})


def test_matrix_is_models_by_shapes_and_cpu_runs_the_demo_model():
    assert set(MODELS) == {"demo", "1b", "3b-shape"} and set(SHAPES) == {"pairs", "m3w", "long"}
    cpu = select_e2e_cases(None, None, quick=False, device=torch.device("cpu"))
    assert [(c.name, c.shape_name) for c in cpu] == [("demo", s) for s in SHAPES]
    gpu = select_e2e_cases(None, None, quick=False, device=torch.device("cuda"))
    assert len(gpu) == len(MODELS) * len(SHAPES)
    assert select_e2e_cases(["3b-shape"], ["long"], quick=False, device=torch.device("cuda"))[0].label == \
        "3b-shape long b4 s2048 img8"
    assert select_e2e_cases(None, None, quick=True, device=torch.device("cpu")) == [QUICK_DEMO]


def test_shapes_are_flamingos_and_configs_fit_them():
    assert (SHAPES["pairs"][:2], SHAPES["m3w"][:2], SHAPES["long"][:2]) == ((32, 1), (256, 5), (2048, 8))
    long = e2e_case("demo", "long")
    assert long.config().lm.max_seq_len >= 2048  # the demo preset stops at 512 positions
    three_b = e2e_case("3b-shape", "m3w").config()
    assert (three_b.lm.dim, three_b.lm.layers, three_b.vision.layers, three_b.xattn.every) == (2048, 8, 24, 1)


def test_unknown_model_or_shape_names_the_argument():
    with pytest.raises(ValueError, match="model must be one of"):
        e2e_case("7b", "long")
    with pytest.raises(ValueError, match="shape must be one of"):
        e2e_case("demo", "huge")


@pytest.fixture(scope="module")
def prepared():
    return prepare_e2e(TINY, CPU)


def test_openflamingo_baseline_is_sized_like_ours_and_trains_only_its_new_layers(prepared):
    theirs = prepared.model("openflamingo", CPU).base.model
    cfg = prepared.cfg
    blocks = theirs.lang_encoder.gated_cross_attn_layers
    assert [i for i, b in enumerate(blocks) if b is not None] == list(cfg.xattn_layer_ids)
    block = next(b for b in blocks if b is not None)
    assert (block.attn.heads, block.attn.to_q.out_features) == (cfg.xattn.heads, cfg.xattn.heads * cfg.xattn.head_dim)
    assert block.attn_gate.item() == 0.5 and block.ff_gate.item() == 0.5
    assert len(theirs.perceiver.layers) == cfg.resampler.depth
    assert theirs.perceiver.latents.shape == (cfg.resampler.n_latents, cfg.vision.width)
    lm = theirs.lang_encoder
    assert (lm.config.hidden_size, lm.config.num_hidden_layers, lm.config.num_key_value_heads) == \
        (cfg.lm.dim, cfg.lm.layers, cfg.lm.n_kv_heads)
    trainable = {id(p) for p in theirs.parameters() if p.requires_grad}
    expected = {id(p) for p in theirs.perceiver.parameters()}
    expected |= {id(p) for b in blocks if b is not None for p in b.parameters()}
    assert trainable == expected  # OpenFlamingo's factory with frozen LM embeddings


def test_openflamingo_step_matches_its_float64_model_and_updates_only_trainable(prepared):
    checked = check_variant(prepared, "openflamingo", CPU)
    assert checked.ok and checked.rel_err < 1e-5
    model = prepared.model("openflamingo", CPU)
    assert model.loss64 == pytest.approx(checked.first_loss, rel=1e-5)
    assert model.step_flops > 0 and model.parameters["trainable"] < model.parameters["total"]
    # The images reach the loss through the gated blocks: closing the gates changes it.
    closed = copy.deepcopy(model.base)
    for block in closed.model.lang_encoder.gated_cross_attn_layers:
        if block is not None:
            block.attn_gate.data.zero_()
    ids, images, labels = prepared.batch
    with torch.no_grad():
        assert closed(ids, images, labels).loss.item() != pytest.approx(model.loss64, rel=1e-4)


def test_ours_and_openflamingo_both_train_on_the_batch(prepared):
    ours = check_variant(prepared, "torch", CPU)
    theirs = check_variant(prepared, "openflamingo", CPU)
    assert ours.ok and theirs.ok
    # A second step on the same batch, after the AdamW update: finite, and lower (the trainable layers learned it).
    for checked in (ours, theirs):
        second = checked.step().item()
        assert math.isfinite(second) and second < checked.first_loss


@pytest.mark.parametrize("variant", ["compile+cuda", "compile+cuda+fp8"])
def test_gpu_variants_say_why_not_on_cpu(prepared, variant):
    with pytest.raises(Unavailable, match="cuda|CUDA|Hopper"):
        check_variant(prepared, variant, CPU)


def test_bad_variant_and_compile_mode_are_refused(prepared):
    with pytest.raises(ValueError, match="variant must be one of"):
        check_variant(prepared, "jit", CPU)
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        check_variant(prepared, "compile", CPU, compile_mode="partial")


def test_train_step_ratios_pair_variants_of_one_case():
    def row(impl, ms):
        return Row("train_step", "3b long", impl, "fwd+bwd", ms=ms)

    rows = [row("openflamingo", 200.0), row("torch", 400.0), row("compile", 300.0), row("compile+cuda", 100.0),
            row("compile+cuda+fp8", None), Row("attention", "3b long", "cuda", "fwd", ms=1.0)]
    (ratios,) = train_step_ratios(rows)
    assert ratios["compile+cuda vs compile"] == 3.0 and ratios["compile+cuda vs openflamingo"] == 2.0
    assert ratios["torch vs openflamingo"] == 0.5 and ratios["compile vs torch"] == pytest.approx(4 / 3)
    assert ratios["compile+cuda+fp8 vs compile+cuda"] is None  # not timed: no ratio


@pytest.mark.parametrize("variant", ["torch+sac", "torch+ac"])
def test_checkpointed_variants_train_exactly_like_eager(prepared, variant):
    eager, checkpointed = check_variant(prepared, "torch", CPU), check_variant(prepared, variant, CPU)
    assert checkpointed.ok and checkpointed.first_loss == eager.first_loss
    # After one AdamW step on gradients from the recomputed backward, the weights agree with eager's.
    after_eager = dict(eager.model.named_parameters())
    for name, param in checkpointed.model.named_parameters():
        torch.testing.assert_close(param, after_eager[name], rtol=1e-5, atol=1e-6, msg=name)
    wrapped = [b for b in checkpointed.model.lm.layers if "forward" in vars(b)]
    assert len(wrapped) == len(checkpointed.model.lm.layers)  # every frozen LM block is checkpointed
