"""Fine-tuning Llama 3.2 Vision with the trainer: train/configs/finetune_mllama.toml's settings (FSDP on a 1-rank
gloo group, bf16, selective activation checkpointing, init_from a transformers Mllama folder) on a tiny random
Mllama and the shapes data. Each trainable mode trains exactly its parameters; a checkpoint written after an
epoch's evaluation resumes; the cached and the cache-free evaluation agree; packing and a checkpoint of another
architecture are refused early; the FLOP counter matches torch's count of a tiny Mllama step."""

from __future__ import annotations

import math

import pytest
import torch

import transformers  # dev extra (the Mllama parity tests need it too)

from flamingo_fast.data import shapes_tokenizer
from flamingo_fast.models import Flamingo
from flamingo_fast.models.config import MLLAMA_ASPECT_RATIOS, TRAINABLE_MODES, FlamingoConfig
from train.checkpoint import load_model_weights
from train.config import config_path, load_config
from train.loop import Trainer
from train.parallel import shutdown_distributed

TOKENIZER = shapes_tokenizer()
BASE_VOCAB = TOKENIZER.vocab_size - 2  # the Mllama text vocabulary; <image> = its first id after
# The tiny model as mllama-11b overrides: the cross-attention layers take the LM's heads, kv heads, head dim and
# SwiGLU width (mllama_xattn), and sit before LM blocks 1 and 3 (transformers' decoder layers 1 and 4 of 6).
TINY = {
    "vision": {"image_size": 28, "patch_size": 7, "width": 32, "layers": 4, "global_layers": 2, "heads": 4,
               "mlp_dim": 48, "intermediate_layers": [2, 0]},
    "lm": {"dim": 48, "layers": 4, "heads": 4, "kv_heads": 2, "ffn_dim": 64, "max_seq_len": 128},
    "xattn": {"layer_ids": [1, 3], "heads": 4, "kv_heads": 2, "head_dim": 12, "ffw_dim": 64},
}
# What each mode trains, by parameter-name prefix.
TRAINS = {"flamingo": ("projector.", "xattn_layers.", "lm.special_embed."), "lm": ("lm.",), "vision": ("vision.",),
          "all": ("",)}


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """The tiny model as a transformers MllamaForConditionalGeneration folder, gates random (transformers starts
    them at 0, which would hide every gradient through the cross-attention)."""
    vision = dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=48,
                  image_size=28, patch_size=7, max_num_tiles=4, intermediate_layers_indices=[2, 0],
                  vision_output_dim=96, supported_aspect_ratios=[list(r) for r in MLLAMA_ASPECT_RATIOS])
    text = dict(vocab_size=BASE_VOCAB, hidden_size=48, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, cross_attention_layers=[1, 4], pad_token_id=0,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    hf = transformers.MllamaForConditionalGeneration(
        transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=BASE_VOCAB))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "gate" in name and "proj" not in name:
                p.uniform_(-1.5, 1.5)
    folder = tmp_path_factory.mktemp("mllama")
    hf.save_pretrained(folder)
    return folder


def _config(out, hf_folder, *extra):
    """finetune_mllama.toml with the tiny model, the shapes data and a short run (no compile: CPU test)."""
    return load_config(config_path("finetune_mllama"), [
        f"--model.overrides={_toml(TINY)}", f"--model.init_from={hf_folder}", "--data.tokenizer=shapes",
        '--data.sources=[{kind="shapes", name="vqa", split="train", n=500, task="vqa"}]',
        '--eval.sources=[{kind="shapes", name="val_vqa", split="val", n=6, task="vqa"}]',
        "--data.micro_batch_size=4", "--data.max_length=32", "--data.num_workers=0", "--train.global_batch_tokens=256",
        "--train.epochs=0", "--train.steps=3", "--train.progress=false", f"--train.out_dir={out}",
        "--parallel.compile=false", "--checkpoint.every=0", "--checkpoint.export_safetensors=false",
        "--eval.at_end=false", *extra])


@pytest.fixture
def distributed():
    """The trainers below make a 1-rank process group (parallel.fsdp); end it after the test."""
    yield
    shutdown_distributed()


def _local(param: torch.Tensor) -> torch.Tensor:
    return (param.to_local() if hasattr(param, "to_local") else param).detach().clone()


def test_config_settings_and_the_tiny_model(hf_folder, tmp_path):
    cfg = _config(tmp_path, hf_folder)
    shipped = load_config(config_path("finetune_mllama"))
    assert (shipped.model.preset, shipped.model.trainable, shipped.data.packing) == ("mllama-11b", "flamingo", False)
    assert (shipped.optim.lr, shipped.parallel.param_dtype, shipped.parallel.activation_checkpoint) == \
        (1e-5, "bfloat16", "selective")
    assert (cfg.parallel.fsdp, cfg.parallel.param_dtype, cfg.parallel.activation_checkpoint) == \
        (True, "bfloat16", "selective")
    model_cfg = FlamingoConfig.from_preset(cfg.model.preset, **cfg.model.overrides)
    assert model_cfg.xattn_layer_ids == [1, 3] and model_cfg.keys_per_media == 4 * 17
    with pytest.raises(ValueError, match="data.packing = true .*mllama-11b.*set data.packing = false"):
        _config(tmp_path, hf_folder, "--data.packing=true")


def test_finetuning_lowers_the_loss_and_evaluates(hf_folder, tmp_path, distributed):
    trainer = Trainer(_config(tmp_path, hf_folder, "--optim.lr=1e-3", "--optim.warmup_steps=1"))
    batch = next(iter(trainer.loader))
    assert batch["images"].shape[2:] == (4, 3, 28, 28) and batch["aspect_ratio_ids"].shape == batch["images"].shape[:2]
    assert not (batch["input_ids"] == TOKENIZER.eoc_token_id).any()  # answers end with eos: no logit for eoc
    micro = [batch for _ in range(trainer.accumulation)]
    losses = [trainer.train_step(micro) for _ in range(4)]  # the same batch: its loss must fall
    assert all(math.isfinite(r.loss) and not r.skipped and r.flops > 0 for r in losses)
    assert losses[-1].loss < losses[0].loss - 0.05, [r.loss for r in losses]
    result = trainer.evaluate()
    assert result.num_vqa == 6 and 0 <= result.vqa_accuracy <= 1
    assert all(isinstance(e["prediction"], str) for e in result.examples)


@pytest.mark.parametrize("mode", TRAINABLE_MODES)
def test_each_trainable_mode_trains_exactly_its_parameters(hf_folder, tmp_path, distributed, mode):
    trainer = Trainer(_config(tmp_path, hf_folder, f"--model.trainable={mode}", "--optim.lr=1e-3",
                              "--optim.warmup_steps=1"))
    params = dict(trainer.model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert trainable == {name for name in params if name.startswith(TRAINS[mode])}
    before = {name: _local(p) for name, p in params.items()}
    batches = iter(trainer.loader)
    for _ in range(2):
        trainer.train_step([next(batches) for _ in range(trainer.accumulation)])
    changed = {name for name, p in params.items() if not torch.equal(_local(p), before[name])}
    assert changed == trainable


def test_checkpoint_after_an_epoch_evaluation_resumes_the_run(hf_folder, tmp_path, distributed):
    # Fine-tuning mode as the config runs it: an evaluation after each epoch, then the checkpoint (the evaluation's
    # forward without backward must leave FSDP's parameters sharded, as the optimizer holds them).
    epochs = ["--train.steps_per_epoch=2", "--eval.every_epoch=true"]
    first = Trainer(_config(tmp_path, hf_folder, "--train.epochs=1", *epochs))
    assert first.run().evals and (tmp_path / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    state = {name: _local(p) for name, p in first.model.named_parameters()}
    resumed = Trainer(_config(tmp_path, hf_folder, "--train.epochs=2", "--checkpoint.resume=true", *epochs))
    assert resumed.resume() and resumed.step == 2
    for name, p in resumed.model.named_parameters():
        assert torch.equal(_local(p), state[name]), name
    result = resumed.run()  # the second epoch, from the restored data position
    assert result.steps == 4 and math.isfinite(result.final_loss) and [e["epoch"] for e in result.evals] == [1, 2]


def test_cached_and_cache_free_evaluation_agree(hf_folder, tmp_path):
    from train.data import eval_samples
    from train.evaluate import evaluate

    trainer = Trainer(_config(tmp_path, hf_folder, "--parallel.fsdp=false", "--parallel.param_dtype=float32",
                              "--parallel.reduce_dtype=float32", "--model.init_device=cpu"))
    samples = eval_samples(trainer.cfg.eval.sources, trainer.image_size)
    cached = evaluate(trainer.model, samples, trainer.collator, batch_size=4, max_new_tokens=4)
    free = evaluate(trainer.model, samples, trainer.collator, batch_size=4, max_new_tokens=4, use_cache=False)
    assert cached.examples == free.examples and cached.metrics() == free.metrics()
    assert len({e["prediction"] for e in cached.examples}) > 1  # the outputs depend on the image and question


def test_init_from_an_mllama_folder_of_another_architecture_is_refused(hf_folder):
    other = FlamingoConfig.from_preset("mllama-11b", vocab_size=TOKENIZER.vocab_size,
                                       **{**TINY, "lm": {**TINY["lm"], "ffn_dim": 96},
                                          "xattn": {**TINY["xattn"], "ffw_dim": 96}})
    with pytest.raises(ValueError, match=r"different model .*xattn.ffw_dim: configured 96, folder 64.*lm.ffn_dim"):
        load_model_weights(Flamingo(other), hf_folder)


def test_the_planner_plans_a_tiny_mllama_step(hf_folder, tmp_path):
    from train.gpu_profiles import get_profile
    from train.planner import make_plan

    cfg = _config(tmp_path, hf_folder, "--train.global_batch_tokens=1024")
    plan = make_plan(cfg, 8, get_profile("h100-80gb"), images=2)  # nothing materialised: fake tensors
    with torch.device("meta"):
        model = Flamingo(FlamingoConfig.from_preset(cfg.model.preset, **cfg.model.overrides))
    analytic = sum(math.ceil(p.shape[0] / 8) * math.prod(p.shape[1:]) * 4 for p in model.parameters())
    assert plan.sharded_bytes["parameters"] == analytic
    assert plan.parameters == model.parameter_counts() and plan.fits and plan.flops_per_micro_batch > 0
    assert plan.memory.by_category["Activation"] > 0 and plan.traffic.all_gather > 0


def _register_flop_formulas() -> None:
    """FlopCounterMode's formulas for what a tiny Mllama step runs beyond bench.e2e's ops: the media span op (each
    token's valid keys) and the CPU flash kernel the tiled encoder's masked attention dispatches to."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    from bench import flops
    from bench.e2e import register_op_flop_formulas

    register_op_flop_formulas()
    lib, aten = torch.ops.flamingo_fast, torch.ops.aten
    if lib.media_span_attention_fwd in flop_registry:
        return

    def pairs(q, start, end, key_count):
        image = torch.arange(key_count.shape[1], device=q.device)
        seen = (image >= start[..., None]) & (image < end[..., None])  # (B, S, T_img)
        return int((key_count[:, None, :] * seen).sum())

    @register_flop_formula(lib.media_span_attention_fwd, get_raw=True)
    def _media_fwd(q, k, v, start, end, key_offset, key_count, scale, backend, out_val=None, **kwargs):
        return int(flops.attention_flops(pairs(q, start, end, key_count), q.shape[2], q.shape[3], "fwd"))

    @register_flop_formula(lib.media_span_attention_bwd, get_raw=True)
    def _media_bwd(dout, q, k, v, out, lse, start, end, key_offset, key_count, scale, backend, out_val=None, **kwargs):
        return int(flops.attention_flops(pairs(q, start, end, key_count), q.shape[2], q.shape[3], "bwd"))

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def test_flop_counter_matches_torch_count_of_a_tiny_mllama_step(hf_folder):
    import numpy as np
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    from bench.e2e import forced_backend
    from flamingo_fast.convert import from_hf_mllama
    from flamingo_fast.data import Collator, Sample, TileTransform, vqa_text
    from train.metrics import BatchShape, FlopCounter

    _register_flop_formulas()
    model = from_hf_mllama(hf_folder).float()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for w, h in ((90, 30), (30, 50), (28, 28), (60, 60))]
    first, second = vqa_text("what colour is the circle?", "red")[0], vqa_text("how many?", "two")[0]
    # Rows of the same length and image count: the model computes padding rows and image slots too, the counter not.
    samples = [Sample(first + second, images[:2]), Sample(second + first, images[2:])]
    batch = Collator(TOKENIZER, transform=TileTransform.from_config(model.cfg.vision), eoc_as_eos=True)(samples)
    assert batch["attention_mask"].all()
    counter = FlopCounter(model)
    shape = BatchShape.from_batch(batch, counter.tiles_of)
    assert shape.tiles == 3 + 4 + 1 + 4 and shape.media_items == 4  # canvases (1, 3), (2, 2), (1, 1), (2, 2)
    args = (batch["input_ids"], batch["images"])
    kwargs = {"aspect_ratio_ids": batch["aspect_ratio_ids"], "labels": batch["labels"]}
    with forced_backend("torch"):
        with FlopCounterMode(display=False) as forward:
            model(*args, **kwargs)
        with FlopCounterMode(display=False) as both:
            model(*args, **kwargs).loss.backward()
    assert counter.flops(shape, backward=False) == pytest.approx(forward.get_total_flops(), rel=0.05)
    assert counter.flops(shape) == pytest.approx(both.get_total_flops(), rel=0.05)
