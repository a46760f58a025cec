"""The training loop in-process (one rank, no process group): non-finite steps are skipped and counted,
too many in a row stop the run; metrics.jsonl has the documented keys; fine-tuning mode runs epochs
with an evaluation after each."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flamingo_fast.convert import load_pretrained
from train.config import config_path, load_config
from train.loop import NonFiniteLossError, Trainer
from train.loss import count_label_tokens
from train.metrics import device_peak_flops


def tiny(tmp_path, *extra):
    return load_config(config_path("tiny"), [f"--train.out_dir={tmp_path}", "--parallel.fsdp=false", *extra])


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path):
    trainer = Trainer(tiny(tmp_path, "--train.max_consecutive_nonfinite=3", "--optim.warmup_steps=1"))
    batches = iter(trainer.loader)

    def micro():
        return [next(batches) for _ in range(trainer.accumulation)]

    first = micro()
    # The step's loss is the label-token mean over all its micro-batches: recompute it from the model's own
    # per-micro-batch mean (Flamingo.loss) before the update, weighted by each micro-batch's label tokens.
    cfg = trainer.model_cfg
    with torch.no_grad():
        parts = [(trainer.model(b["input_ids"], b["images"], labels=b["labels"], media_index=b["media_index"],
                                document_ids=b["document_ids"], positions=b["positions"]).loss.item(),
                  count_label_tokens(b["labels"], cfg.image_token_id, cfg.pad_token_id)) for b in first]
    expected = sum(mean * n for mean, n in parts) / sum(n for _, n in parts)
    good = trainer.train_step(first)
    assert not good.skipped and math.isfinite(good.loss) and trainer.step == 1
    assert good.loss == pytest.approx(expected, rel=1e-5)

    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    states = {n: trainer.optimizer.state[p]["exp_avg"].clone() for n, p in trainer.model.named_parameters()
              if p.requires_grad}
    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * float("nan")
        return out

    trainer.model.forward = poisoned
    bad = trainer.train_step(micro())
    assert bad.skipped and trainer.skipped_steps == 1 and trainer.step == 2
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, params[name]), f"{name} changed on a skipped step"
            assert torch.equal(trainer.optimizer.state[param]["exp_avg"], states[name])
            assert param.grad is None

    trainer.model.forward = forward  # a good step resets the consecutive count
    assert not trainer.train_step(micro()).skipped and trainer.consecutive_nonfinite == 0

    # An infinite gradient (finite loss) is caught by the grad norm.
    def inf_grad(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits.register_hook(lambda g: g * float("inf"))
        return out

    trainer.model.forward = inf_grad
    assert trainer.train_step(micro()).skipped
    assert trainer.train_step(micro()).skipped
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps had a non-finite loss or gradient norm"):
        trainer.train_step(micro())
    assert trainer.skipped_steps == 4


def test_data_wait_is_the_time_blocked_on_the_loader(tmp_path):
    import time

    class SlowLoader:  # the real pipeline, 40 ms late with every micro-batch
        def __init__(self, inner):
            self.inner, self.skipped = inner, inner.skipped

        def __iter__(self):
            for batch in self.inner:
                time.sleep(0.04)
                yield batch

        def close(self):
            self.inner.close()

    cfg = tiny(tmp_path, "--train.steps=2", "--train.log_every=1", "--checkpoint.save_final=false",
               "--eval.at_end=false")
    trainer = Trainer(cfg)
    trainer.loader = SlowLoader(trainer.loader)
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["data_wait_ms"] >= 40 * trainer.accumulation for r in records)


def test_run_writes_metrics_jsonl_and_checkpoints(tmp_path):
    cfg = tiny(tmp_path, "--train.steps=3", "--train.log_every=1", "--checkpoint.every=2", "--eval.at_end=true",
               "--checkpoint.export_safetensors=true")
    trainer = Trainer(cfg)
    result = trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped", "mem_gib", "data_wait_ms"):
            assert key in record, key
        assert record["loss"] > 0 and record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1
        # MFU is the logged model FLOP rate over this machine's peak (train/metrics.py), not any number in (0, 1)
        assert record["mfu"] == pytest.approx(record["tflops"] * 1e12 / device_peak_flops(torch.device("cpu")))
    assert [r["lr"] for r in records] == pytest.approx([cfg.optim.lr / 2, cfg.optim.lr, cfg.optim.min_lr])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.toml").is_file()
    exported, tokenizer = load_pretrained(tmp_path)  # the export is a flamingo_fast.convert.save_pretrained folder
    torch.testing.assert_close(exported.state_dict(), trainer.model.state_dict(), rtol=0, atol=0)
    assert tokenizer.vocab_size == trainer.tokenizer.vocab_size
    assert result.steps == 3 and result.last_eval is not None
    assert result.last_eval.num_caption == 8 and result.last_eval.num_vqa == 8
    hits = result.last_eval.caption_exact_match * 8  # exact match is a count of whole captions, not a soft score
    assert 0 <= hits <= 8 and hits == pytest.approx(round(hits))
    by_type = result.last_eval.vqa_by_type  # per question type, consistent with the overall accuracy
    assert sum(v["count"] for v in by_type.values()) == 8 and set(by_type) <= {"colour", "shape", "count", "left", "right"}
    assert sum(v["accuracy"] * v["count"] for v in by_type.values()) / 8 == pytest.approx(result.last_eval.vqa_accuracy)


def test_finetune_mode_runs_epochs_with_eval_after_each(tmp_path):
    init = tmp_path / "init"
    Trainer(tiny(init, "--train.steps=1", "--checkpoint.every=0", "--checkpoint.export_safetensors=true")).run()
    out = tmp_path / "ft"
    cfg = tiny(out, f"--model.init_from={init / 'model.safetensors'}", "--train.epochs=2", "--optim.lr=1e-5",
               '--data.sources=[{kind="shapes", name="vqa", split="train", n=24, task="vqa"}]',
               "--checkpoint.every=0", "--data.packing=false")
    trainer = Trainer(cfg)
    assert trainer.steps_per_epoch == 2 and trainer.total_steps == 4  # 24 rows / 16 rows per step, rounded up
    # Starts from the exported weights.
    from safetensors.torch import load_file

    exported = load_file(str(init / "model.safetensors"))
    assert torch.equal(trainer.model.state_dict()["resampler.latents"], exported["resampler.latents"])
    result = trainer.run()
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [(e["step"], e["epoch"]) for e in evals] == [(2, 1), (4, 2)]
    assert result.last_eval is None and len(result.evals) == 2  # the epoch-2 eval is the final one
    for e in evals:  # each epoch's record: the per-type table adds up to the overall accuracy
        by_type = e["vqa_by_type"]
        assert sum(v["count"] for v in by_type.values()) == e["num_vqa"] > 0
        assert sum(v["accuracy"] * v["count"] for v in by_type.values()) / e["num_vqa"] == \
            pytest.approx(e["vqa_accuracy"])


def test_cache_free_evaluation_for_sharded_models_equals_the_cached_one(tmp_path):
    from train.data import eval_samples
    from train.evaluate import evaluate

    trainer = Trainer(tiny(tmp_path))
    model = trainer.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights that make the tiny model's outputs depend on context and images
        for name, p in model.named_parameters():
            if not name.startswith("vision."):
                noise = torch.randn(p.shape, generator=g)
                p.copy_(2 * noise / p.shape[-1] ** 0.5 if p.dim() > 1 else 1 + 0.2 * noise)
    samples = eval_samples(trainer.cfg.eval.sources, trainer.image_size)[::3]  # captions and questions
    collator = trainer.collator
    cached = evaluate(model, samples, collator, batch_size=3, max_new_tokens=5)
    free = evaluate(model, samples, collator, batch_size=3, max_new_tokens=5, use_cache=False)
    assert cached.examples == free.examples and cached.metrics() == free.metrics()
    assert len({e["prompt"] for e in cached.examples}) > 1  # prompts of different lengths share batches
    assert len({e["prediction"] for e in cached.examples}) > 1


def test_checkpoint_round_trips_every_field_of_the_trainer_state(tmp_path):
    cfg = tiny(tmp_path, "--train.steps=3", "--checkpoint.save_final=false", "--eval.at_end=false")
    trainer = Trainer(cfg)
    batches = iter(trainer.loader)
    trainer.train_step([next(batches) for _ in range(trainer.accumulation)])
    # Values no fresh trainer has, so a field that is not saved or not restored shows.
    trainer.skipped_steps, trainer.consecutive_nonfinite = 3, 2
    trainer.evals = [{"step": 1, "vqa_accuracy": 0.25}]
    trainer.save_checkpoint()
    saved = trainer.trainer_state()

    resumed = Trainer(tiny(tmp_path, "--train.steps=3", "--checkpoint.resume=true"))
    assert resumed.resume()
    assert resumed.trainer_state() == saved and resumed.step == trainer.step == 1
    assert (resumed.skipped_steps, resumed.consecutive_nonfinite) == (3, 2)
    assert resumed.schedule.state_dict() == trainer.schedule.state_dict()


def test_gradients_are_clipped_to_the_global_norm_before_the_optimizer_step(tmp_path):
    trainer = Trainer(tiny(tmp_path, "--optim.clip_grad_norm=0.001"))
    seen = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):  # the global gradient norm the optimizer actually receives
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        seen.append(torch.nn.utils.get_total_norm(grads).item())
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    batches = iter(trainer.loader)
    result = trainer.train_step([next(batches) for _ in range(trainer.accumulation)])
    assert result.grad_norm > 0.01  # the reported norm is the one before clipping ...
    assert seen and seen[0] == pytest.approx(0.001, rel=1e-3)  # ... the optimizer gets it scaled to the limit


def test_fsdp_bf16_mixed_precision_on_real_tensors_computes_in_bf16_and_keeps_fp32_weights(tmp_path):
    from train.parallel import shutdown_distributed

    fp32 = Trainer(tiny(tmp_path / "fp32"))
    batches = iter(fp32.loader)
    micro = [next(batches) for _ in range(fp32.accumulation)]
    want = fp32.train_step(micro).loss
    cfg = load_config(config_path("tiny"), [f"--train.out_dir={tmp_path / 'bf16'}", "--parallel.fsdp=true",
                                            "--parallel.param_dtype=bfloat16", "--parallel.reduce_dtype=float32"])
    try:
        trainer = Trainer(cfg)  # a 1-rank gloo group: FSDP2 on real CPU tensors, not the meta device
        dtypes = []
        trainer.model.lm.layers[0].mlp.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        got = trainer.train_step(micro)
        assert dtypes and set(dtypes) == {torch.bfloat16}  # the blocks compute in FSDP's param dtype
        params = [p for p in trainer.model.parameters()]
        assert all(p.dtype == torch.float32 for p in params)  # sharded master weights stay fp32
        assert math.isfinite(got.loss) and got.loss == pytest.approx(want, rel=2e-2)  # same step, bf16 rounding
        assert not got.skipped and got.grad_norm > 0
    finally:
        shutdown_distributed()


def test_resume_refuses_a_corrupt_checkpoint_or_with_fallback_takes_the_previous_one(tmp_path):
    from train.checkpoint import CorruptCheckpointError

    Trainer(tiny(tmp_path, "--train.steps=2", "--checkpoint.every=1", "--eval.at_end=false")).run()
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        assert (folder / f"step_0000000{step}" / "COMPLETE").is_file()
    shard = folder / "step_00000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # bit rot: same size, different bytes
    shard.write_bytes(bytes(data))

    expected = r"step_00000002: __0_0.distcp does not match .*checkpoint.fallback"
    with pytest.raises(CorruptCheckpointError, match=expected):
        Trainer(tiny(tmp_path, "--train.steps=2", "--checkpoint.resume=true")).resume()
    fallback = Trainer(tiny(tmp_path, "--train.steps=2", "--checkpoint.resume=true", "--checkpoint.fallback=true"))
    assert fallback.resume() and fallback.step == 1
    (folder / "step_00000001" / "trainer.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="none of the 2 checkpoints"):
        Trainer(tiny(tmp_path, "--train.steps=2", "--checkpoint.resume=true", "--checkpoint.fallback=true")).resume()


def test_run_stops_the_loader_threads_before_returning(tmp_path):
    # A prefetch/decode thread still alive at interpreter exit can abort the process inside a torch op
    # ("terminate called without an active exception", seen once in a 2-rank CI run).
    import threading

    before = set(threading.enumerate())
    trainer = Trainer(tiny(tmp_path, "--train.steps=2", "--checkpoint.every=0", "--data.num_workers=2"))
    iterator = iter(trainer.loader)
    next(iterator)
    assert set(threading.enumerate()) - before  # the pipeline does run threads while iterating
    trainer.run()
    assert {t for t in threading.enumerate() if t.is_alive()} - before == set()
