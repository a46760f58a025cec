"""The flamingo-fast FSDP2 trainer.

    torchrun --nproc_per_node=N -m train --config train/configs/demo.toml [--section.key=value ...]

Modules: config (TOML + overrides), parallel (process group, FSDP2, activation checkpointing, compile),
optim (AdamW groups, schedule, accumulation), loss (token-summed loss), checkpoint (atomic DCP),
metrics (FLOPs/MFU, console + metrics.jsonl), data (pipelines), evaluate (greedy decoding, scores),
loop (the Trainer), pretrain (the demo's component pretraining), demo (`flamingo-fast demo`),
cli (`flamingo-fast train` / `python -m train`).
"""
