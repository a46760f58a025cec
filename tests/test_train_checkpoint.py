"""Checkpoints: exact save/load of model + optimizer, atomic folders (a partial temp folder is never
resumed from), keep-last-k, the allow-list metadata reader, and loading initial weights."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flamingo_fast import Flamingo, FlamingoConfig
from train.checkpoint import (COMPLETE, MANIFEST, CheckpointManager, CorruptCheckpointError, SafeFileSystemReader,
                              load_model_weights)
from train.config import OptimSection
from train.optim import build_optimizer

TINY = dict(
    vocab_size=40, pad_token_id=0,
    vision={"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
    resampler={"dim": 32, "depth": 1, "heads": 2, "head_dim": 16, "n_latents": 4, "max_frames": 1},
    xattn={"every": 1, "heads": 2, "head_dim": 16},
    lm={"dim": 32, "layers": 2, "heads": 2, "kv_heads": 1, "ffn_dim": 64, "max_seq_len": 64},
)


def make(seed=0):
    torch.manual_seed(seed)
    model = Flamingo(FlamingoConfig.from_preset("demo", **TINY))
    return model, build_optimizer(model, OptimSection(lr=1e-2))


def train_one_step(model, optimizer, seed=1):
    torch.manual_seed(seed)
    ids = torch.randint(4, 38, (2, 7))
    ids[:, 1] = model.cfg.image_token_id
    model(ids, torch.randn(2, 1, 1, 3, 16, 16), labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_save_then_load_restores_model_and_optimizer_exactly(tmp_path):
    model, optimizer = make()
    train_one_step(model, optimizer)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    path = manager.save(1, model, optimizer, {"schedule": {"step": 1}, "note": "x"}, {"data": {"pos": 3}})
    assert path.name == "step_00000001" and (path / COMPLETE).is_file()
    expected_params = {k: v.clone() for k, v in model.state_dict().items()}
    expected_state = {id_: {k: v.clone() for k, v in s.items()} for id_, s in
                      zip(range(len(optimizer.state)), optimizer.state.values())}

    other, other_opt = make(seed=123)  # different weights, empty optimizer state
    trainer_state, rank_state = manager.load(manager.latest(), other, other_opt)
    assert trainer_state["step"] == 1 and trainer_state["note"] == "x" and rank_state == {"data": {"pos": 3}}
    for key, value in other.state_dict().items():
        assert torch.equal(value, expected_params[key]), key
    restored = list(other_opt.state.values())
    assert len(restored) == len(expected_state)
    for got, want in zip(restored, expected_state.values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got[key], want[key])
    # Frozen parameters never get optimizer state, also after a load.
    frozen = {id(p) for p in other.parameters() if not p.requires_grad}
    assert not frozen & {id(p) for p in other_opt.state}
    # The hyper-parameters come from the config, not the checkpoint.
    assert other_opt.param_groups[0]["lr"] == 1e-2


def test_partial_temp_folder_is_ignored_and_cleaned(tmp_path):
    model, optimizer = make()
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(2, model, optimizer, {}, {})
    # A crash while writing step 3 leaves its temp folder; a folder without COMPLETE is not a checkpoint either.
    partial = tmp_path / ".tmp-step_00000003"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half written")
    unmarked = tmp_path / "step_00000004"
    unmarked.mkdir()
    assert manager.latest().name == "step_00000002"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        manager.load(unmarked, model, optimizer)
    manager.save(5, model, optimizer, {}, {})
    assert not partial.exists()
    assert manager.latest().name == "step_00000005"


def test_keep_last_k(tmp_path):
    model, optimizer = make()
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        train_one_step(model, optimizer, seed=step)
        manager.save(step, model, optimizer, {}, {})
    assert [s for s, _ in manager.complete_checkpoints()] == [3, 4]
    assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000004"]
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_metadata_reader_refuses_foreign_pickles(tmp_path):
    model, optimizer = make()
    path = CheckpointManager(tmp_path).save(1, model, optimizer, {}, {})
    SafeFileSystemReader(str(path)).read_metadata()  # DCP's own metadata loads
    (path / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|not allowed"):
        SafeFileSystemReader(str(path)).read_metadata()


def test_load_model_weights_from_safetensors_and_checkpoint(tmp_path):
    source, optimizer = make(seed=5)
    train_one_step(source, optimizer)
    weights = {k: v for k, v in source.state_dict().items() if k.startswith("lm.")}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "lm.safetensors"))
    target, _ = make(seed=6)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    missing = load_model_weights(target, tmp_path / "lm.safetensors")
    assert missing and all(not k.startswith("lm.") for k in missing)
    for key, value in target.state_dict().items():
        assert torch.equal(value, weights[key] if key in weights else before[key]), key

    folder = CheckpointManager(tmp_path / "ck").save(1, source, optimizer, {}, {})
    other, _ = make(seed=7)
    assert load_model_weights(other, folder) == []
    for key, value in other.state_dict().items():
        assert torch.equal(value, source.state_dict()[key])

    save_file({"not.a.param": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not parameters of this model"):
        load_model_weights(other, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="must be a trainer checkpoint folder"):
        load_model_weights(other, tmp_path / "nothing.bin")


@pytest.mark.parametrize("crash_at_rename", [1, 2])
def test_resaving_a_step_is_atomic_at_every_rename(tmp_path, monkeypatch, crash_at_rename):
    """A kill during the re-save of a step that already has a checkpoint leaves a complete one under that step:
    the old one (set aside, put back by the next `latest()`) or the new one."""
    model, optimizer = make()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    manager.save(1, model, optimizer, {"version": "old"}, {})
    train_one_step(model, optimizer)
    real_rename, calls = os.rename, []

    def crashing_rename(src, dst):
        if Path(dst).parent == tmp_path / "ckpt":  # the manager's folder renames (DCP renames its own files too)
            calls.append((src, dst))
            if len(calls) == crash_at_rename:
                raise KeyboardInterrupt("killed")  # stands in for SIGKILL between two renames
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crashing_rename)
    with pytest.raises(KeyboardInterrupt):
        manager.save(1, model, optimizer, {"version": "new"}, {})
    monkeypatch.setattr(os, "rename", real_rename)

    fresh = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    latest = fresh.latest()
    assert latest is not None and latest.name == "step_00000001"
    other, other_opt = make(seed=9)
    trainer_state, _ = fresh.load(latest, other, other_opt)
    assert trainer_state["version"] == "old"  # both crash points fall before the new folder is in place
    assert not any(p.name.startswith(".old-") for p in (tmp_path / "ckpt").iterdir())


def test_resaving_a_step_replaces_it_and_leaves_nothing_aside(tmp_path):
    model, optimizer = make()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    manager.save(1, model, optimizer, {"version": "old"}, {})
    manager.save(1, model, optimizer, {"version": "new"}, {})
    other, other_opt = make(seed=9)
    assert manager.load(manager.latest(), other, other_opt)[0]["version"] == "new"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000001"]


def test_a_missing_rank_state_is_an_error_naming_the_checkpoint_and_file(tmp_path):
    model, optimizer = make()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    path = manager.save(1, model, optimizer, {}, {"data": {"pos": 3}})
    intact = manager.save(2, model, optimizer, {}, {"data": {"pos": 4}})
    (path / "rank_0.json").unlink()
    other, other_opt = make(seed=9)
    with pytest.raises(CorruptCheckpointError, match=r"step_00000001: rank_0.json is missing"):
        manager.load(path, other, other_opt)
    # Written with another world size: the per-rank state does not apply and is not asked for.
    elsewhere = CheckpointManager(tmp_path / "ckpt", keep_last=2, rank=0, world_size=2)
    assert elsewhere.load(intact, other, other_opt)[1] is None


# -- corruption matrix: each file kind of a checkpoint x (delete, truncate, flip a byte) ----------------------------
FILE_KINDS = (".metadata", "__0_0.distcp", "trainer.json", "rank_0.json", MANIFEST)


def _damage(path, fault: str) -> None:
    if fault == "delete":
        path.unlink()
    elif fault == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # flip one byte in the middle, size unchanged (bit rot, a partial overwrite)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", ["delete", "truncate", "flip"])
@pytest.mark.parametrize("name", FILE_KINDS)
def test_a_damaged_checkpoint_file_is_an_error_naming_the_folder_and_the_file(tmp_path, name, fault):
    """Expected per cell: delete and truncate are caught by `latest()` (manifest sizes, no hashing); a flipped
    byte keeps the size, so `latest()` lists the folder and `load()` catches it by SHA-256. A flipped byte in the
    manifest itself makes it unreadable or changes a recorded hash; either way the folder is refused. The model
    is never touched by a refused load."""
    model, optimizer = make()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    manager.save(1, model, optimizer, {"version": "old"}, {"data": {"pos": 1}})
    train_one_step(model, optimizer)
    path = manager.save(2, model, optimizer, {"version": "new"}, {"data": {"pos": 2}})
    _damage(path / name, fault)
    other, other_opt = make(seed=9)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    expected = rf"checkpoint .*step_00000002: {re.escape(name)} "
    if name == MANIFEST and fault == "flip":  # the manifest no longer parses, or names a file it now mismatches
        expected = rf"checkpoint .*step_00000002: .*{re.escape(MANIFEST)}"
    caught_by_sizes = fault != "flip"
    if not caught_by_sizes and name != MANIFEST:
        assert manager.latest() == path  # sizes still match: only the hash can tell
    with pytest.raises(CorruptCheckpointError, match=expected):
        manager.latest() if caught_by_sizes else manager.load(path, other, other_opt)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    # The older checkpoint still verifies and loads.
    assert manager.load(tmp_path / "ckpt" / "step_00000001", other, other_opt)[0]["version"] == "old"


def test_a_checkpoint_without_its_complete_marker_is_not_listed(tmp_path):
    model, optimizer = make()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    first = manager.save(1, model, optimizer, {}, {})
    (manager.save(2, model, optimizer, {}, {}) / COMPLETE).unlink()
    assert manager.latest() == first


def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    import hashlib
    import json

    model, optimizer = make()
    path = CheckpointManager(tmp_path / "ckpt").save(1, model, optimizer, {}, {"data": {}})
    files = json.loads((path / MANIFEST).read_text())["files"]
    on_disk = {p.name for p in path.iterdir()} - {MANIFEST, COMPLETE}
    assert set(files) == on_disk and {".metadata", "__0_0.distcp", "trainer.json", "rank_0.json"} <= on_disk
    for name, record in files.items():
        data = (path / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
