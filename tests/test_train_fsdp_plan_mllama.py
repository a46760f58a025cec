"""The mllama-90b preset's FSDP2 plan (Llama 3.2 Vision 90B) on the meta device at world sizes 8, 64 and 256, with
torch's fake process group: `fully_shard` really runs, no weight is materialised. Checks the units (each local and
global vision block, the projector, each LM block grouped with the cross-attention layer in front of it, the root)
and the per-rank parameter bytes against the analytic value (dim 0 padded to a multiple of the world size, rank 0's
shard)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

# Rank 0's fp32 parameter shard of mllama-90b (88.6B parameters), bytes: dim 0 of every tensor padded to the world size.
PER_RANK_BYTES = {8: 44_325_408_108, 64: 5_565_331_452, 256: 1_415_982_336}


@pytest.fixture(params=sorted(PER_RANK_BYTES))
def fake_world(request):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized(), "an earlier test left a process group initialised (it must destroy it)"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=request.param)
    try:
        yield request.param, init_device_mesh("cpu", (request.param,), mesh_dim_names=("dp",))
    finally:
        dist.destroy_process_group()


def test_mllama_90b_fsdp_units_and_per_rank_bytes(fake_world):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    from flamingo_fast import Flamingo, FlamingoConfig
    from train.config import ParallelSection
    from train.parallel import parallelize

    world, mesh = fake_world
    cfg = FlamingoConfig.from_preset("mllama-90b")
    with torch.device("meta"):
        model = Flamingo(cfg)
    full_shapes = {name: p.shape for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    parallelize(model, ParallelSection(param_dtype="bfloat16", reduce_dtype="float32",
                                       activation_checkpoint="selective"), mesh)

    def state(module):
        assert isinstance(module, FSDPModule), type(module)
        return module._get_fsdp_state()

    local = [state(layer) for layer in model.vision.transformer.layers]
    global_ = [state(layer) for layer in model.vision.global_transformer.layers]
    assert len({id(s) for s in local + global_}) == cfg.vision.layers + cfg.vision.global_layers == 32 + 8
    lm_states = [state(block) for block in model.lm.layers]
    assert len({id(s) for s in lm_states}) == cfg.lm.layers == 80
    assert cfg.xattn_layer_ids == list(range(3, 80, 4))  # transformers' decoder layers 3, 8, ..., 98
    for i in cfg.xattn_layer_ids:
        assert state(model.xattn_layers[str(i)]) is lm_states[i]
    root = state(model)
    units = {id(s) for s in local + global_ + lm_states} | {id(state(model.projector)), id(root)}
    assert len(units) == 40 + 80 + 1 + 1
    # What the root itself owns: the vision stem and its tile/position embeddings and norms, the LM's embeddings,
    # final norm and head (no special_head: Mllama's special tokens are input-only).
    names = {id(p): n for n, p in model.named_parameters()}
    root_params = {names[id(fp.sharded_param)] for group in root._fsdp_param_groups for fp in group.fsdp_params}
    assert {".".join(n.split(".")[:2]) for n in root_params} == {
        "vision.patch_embedding", "vision.class_embedding", "vision.gated_positional_embedding",
        "vision.pre_tile_positional_embedding", "vision.post_tile_positional_embedding", "vision.layernorm_pre",
        "vision.layernorm_post", "lm.embed_tokens", "lm.special_embed", "lm.norm", "lm.lm_head"}

    total_bytes = trainable_bytes = 0
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor) and param.placements == (Shard(0),), name
        shard = param.to_local()
        assert shard.device.type == "meta"
        shape = full_shapes[name]
        assert shard.numel() == math.ceil(shape[0] / world) * math.prod(shape[1:]), name
        total_bytes += shard.numel() * shard.element_size()
        trainable_bytes += shard.numel() * shard.element_size() if name in trainable else 0
    counts = model.parameter_counts()
    assert abs(counts["total"] - 88.6e9) < 0.1e9  # Llama 3.2 Vision 90B's 88.6B
    assert total_bytes == PER_RANK_BYTES[world]
    # Padding: at 256 ranks every rank holds one row of the 9-row tile position embedding (9 x 4 tiles x 1601 tokens
    # x 1280, 73.8M parameters), 8.2M parameters where an even split would be 0.3M: +2.3% of the shard.
    assert counts["total"] * 4 / world <= total_bytes <= counts["total"] * 4 / world * 1.025
    # AdamW state: 2 fp32 moments of the trainable shards (projector, 20 cross-attention layers, 2 embedding rows).
    assert counts["trainable"] * 8 / world <= 2 * trainable_bytes <= counts["trainable"] * 8 / world * 1.01
