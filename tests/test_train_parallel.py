"""Activation checkpointing per block ("full" and "selective") changes neither the loss nor the gradients,
nor any parameter name; every block of Flamingo.shard_units() is wrapped."""

from __future__ import annotations

import pytest
import torch

from flamingo_fast import Flamingo, FlamingoConfig
from train.config import ParallelSection
from train.parallel import apply_activation_checkpointing, parallelize

TINY = dict(
    vocab_size=40, pad_token_id=0,
    vision={"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
    resampler={"dim": 32, "depth": 1, "heads": 2, "head_dim": 16, "n_latents": 4, "max_frames": 1},
    xattn={"every": 1, "heads": 2, "head_dim": 16},
    lm={"dim": 32, "layers": 2, "heads": 2, "kv_heads": 1, "ffn_dim": 64, "max_seq_len": 64},
)


def loss_and_grads(model):
    torch.manual_seed(3)
    ids = torch.randint(4, 38, (2, 9))
    ids[:, 1] = model.cfg.image_token_id
    # Non-zero gates so the xattn path contributes to the output and to the gradients of everything.
    with torch.no_grad():
        for layer in model.xattn_layers.values():
            layer.attn_gate.fill_(0.5)
            layer.ffw_gate.fill_(0.5)
    loss = model(ids, torch.randn(2, 1, 1, 3, 16, 16), labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_loss_gradients_and_names(mode):
    torch.manual_seed(0)
    reference = Flamingo(FlamingoConfig.from_preset("demo", **TINY))
    torch.manual_seed(0)
    model = Flamingo(FlamingoConfig.from_preset("demo", **TINY))
    names = [n for n, _ in model.named_parameters()]
    parallelize(model, ParallelSection(activation_checkpoint=mode), mesh=None)
    assert [n for n, _ in model.named_parameters()] == names
    assert all("forward" in vars(m) for unit in model.shard_units() for m in unit)  # every block wrapped
    want_loss, want = loss_and_grads(reference)
    got_loss, got = loss_and_grads(model)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)


def test_unknown_activation_checkpoint_mode_is_rejected():
    with pytest.raises(ValueError, match="activation checkpoint mode"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), "sometimes")


def test_float8_is_refused_without_a_float8_gpu_never_silently_bf16():
    model = Flamingo(FlamingoConfig.from_preset("demo", **TINY))
    cfg = ParallelSection(fsdp=False, param_dtype="float32", reduce_dtype="float32", float8=True)
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU has float8 matmuls")
    with pytest.raises(RuntimeError, match="float8 training needs"):
        parallelize(model, cfg, None, torch.device("cpu"))
    assert all(type(m) is torch.nn.Linear for m in model.lm.modules() if isinstance(m, torch.nn.Linear))


def test_float8_converts_only_frozen_lm_block_linears(monkeypatch):
    # torchao's conversion itself (CPU emulation of float8 matmuls) with the hardware check bypassed: which
    # layers it takes is decided here, on any machine.
    pytest.importorskip("torchao.float8")
    from flamingo_fast.models import float8

    monkeypatch.setattr(float8, "float8_unsupported_reason", lambda device: None)
    model = Flamingo(FlamingoConfig.from_preset("demo", **TINY))
    assert float8.convert_frozen_lm_to_float8(model, torch.device("cpu")) == 2 * 7  # q k v o gate up down
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {k for k, v in kinds.items() if v == "Float8Linear"} == {
        f"lm.layers.{i}.{part}" for i in range(2) for part in
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")}
    loss, grads = loss_and_grads(model)  # trains: trainable layers get gradients, frozen ones none
    assert torch.isfinite(loss) and any(n.startswith("xattn_layers") for n in grads)
    assert not any(n.startswith("lm.layers") for n in grads)


def test_compile_mode_is_validated():
    from train.config import TrainConfig

    cfg = TrainConfig()
    cfg.parallel.compile_mode = "everything"
    with pytest.raises(ValueError, match="parallel.compile_mode must be one of"):
        cfg.validate()


def test_a_one_rank_group_of_our_own_leaves_no_rendezvous_variables_behind(monkeypatch):
    import os

    import torch.distributed as dist

    from train.parallel import init_distributed, shutdown_distributed

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = init_distributed(ParallelSection(fsdp=True, param_dtype="float32", reduce_dtype="float32"))
    try:
        assert dist.is_initialized() and info.world_size == 1 and os.environ["WORLD_SIZE"] == "1"
    finally:
        shutdown_distributed()
    # Otherwise the next Trainer in this process (or a subprocess) would think torchrun launched it.
    assert not dist.is_initialized()
    assert not any(key in os.environ for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"))


@pytest.mark.parametrize("mode", ["regional", "whole"])
def test_parallel_compile_mode_picks_what_is_compiled(mode):
    # Module.compile is lazy: nothing is traced here, only which modules will run compiled.
    model = Flamingo(FlamingoConfig.from_preset("demo", **TINY))
    cfg = ParallelSection(fsdp=False, param_dtype="float32", reduce_dtype="float32", compile=True, compile_mode=mode)
    parallelize(model, cfg, None, torch.device("cpu"))
    units = [m for unit in model.shard_units() for m in unit]

    def compiled(module):
        return getattr(module, "_compiled_call_impl", None) is not None

    if mode == "regional":
        assert all(compiled(m) for m in units) and not compiled(model)
    else:
        assert compiled(model) and not any(compiled(m) for m in units)
