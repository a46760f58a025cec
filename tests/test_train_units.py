"""Unit tests of the trainer's arithmetic and plumbing: config overrides, LR schedule, accumulation,
parameter groups, token-normalised loss, JSON state round trip, FLOP counting, scoring."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from flamingo_fast import Flamingo, FlamingoConfig
from train.checkpoint import from_jsonable, rng_state, set_rng_state, to_jsonable
from train.config import OptimSection, TrainConfig, config_path, load_config, parse_overrides, to_toml
from flamingo_fast.data.sample import Sample, caption_text, vqa_text
from train.evaluate import score_example
from train.loss import count_label_tokens, token_loss_sum
from train.metrics import BatchShape, FlopCounter
from train.optim import WarmupCosineSchedule, accumulation_steps, build_optimizer, build_schedule, param_groups

TINY = dict(
    vocab_size=40, pad_token_id=0,
    vision={"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
    resampler={"dim": 32, "depth": 1, "heads": 2, "head_dim": 16, "n_latents": 4, "max_frames": 1},
    xattn={"every": 1, "heads": 2, "head_dim": 16},
    lm={"dim": 32, "layers": 2, "heads": 2, "kv_heads": 1, "ffn_dim": 64, "max_seq_len": 64},
)


def tiny_model(seed: int = 0) -> Flamingo:
    torch.manual_seed(seed)
    return Flamingo(FlamingoConfig.from_preset("demo", **TINY))


# -- config ---------------------------------------------------------------------------------------------
def test_overrides_parse_toml_literals_and_strings():
    parsed = parse_overrides(["--optim.lr=3e-4", "--train.steps", "12", "--parallel.compile=true",
                              "--train.out_dir=runs/x", '--data.sources=[{kind="shapes", n=5}]'])
    assert parsed == {"optim": {"lr": 3e-4}, "train": {"steps": 12, "out_dir": "runs/x"},
                      "parallel": {"compile": True}, "data": {"sources": [{"kind": "shapes", "n": 5}]}}


def test_load_config_applies_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr = 0.01\nwarmup_steps = 7\n[train]\nsteps = 3\n")
    cfg = load_config(path, ["--optim.lr=2e-3", "--checkpoint.keep_last=5"])
    assert cfg.optim.lr == 2e-3 and cfg.optim.warmup_steps == 7 and cfg.train.steps == 3
    assert cfg.checkpoint.keep_last == 5
    # An int where a float is expected is accepted as a float.
    assert load_config(path, ["--optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override, message", [
    (["--optim.nope=1"], "unknown key optim.nope"),
    (["--nosuch.key=1"], "unknown section"),
    (["--train.steps=abc"], "train.steps must be an integer"),
    (["--parallel.compile=1"], "parallel.compile must be true or false"),
    (["--parallel.activation_checkpoint=some"], "activation_checkpoint must be one of"),
    (["lr=3"], "expected an override"),
    (["--parallel.fsdp=false"], "take effect through FSDP"),
])
def test_bad_overrides_raise_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override)


@pytest.mark.parametrize("name", ["demo", "xl", "finetune_vqav2", "tiny"])
def test_shipped_configs_load_and_round_trip_through_toml(name, tmp_path):
    cfg = load_config(config_path(name))
    path = tmp_path / "again.toml"
    path.write_text(to_toml(cfg.to_dict()))
    assert load_config(path).to_dict() == cfg.to_dict()


def test_xl_config_accumulation_matches_the_paper_batch():
    cfg = load_config(config_path("xl"))
    assert cfg.train.global_batch_tokens == 2_048_000
    assert cfg.optim.warmup_steps == 10_000 and cfg.optim.min_lr == 1e-6
    steps = accumulation_steps(cfg.train.global_batch_tokens, 256, cfg.data.micro_batch_size, cfg.data.max_length)
    assert steps * 256 * cfg.data.micro_batch_size * cfg.data.max_length == 2_048_000


# -- schedule and accumulation ------------------------------------------------------------------------------
def test_warmup_is_linear_then_cosine_reaches_min_lr():
    s = WarmupCosineSchedule(lr=1e-3, min_lr=1e-6, warmup=10, decay=100)
    assert s.lr_at(0) == pytest.approx(1e-4)
    assert s.lr_at(4) == pytest.approx(5e-4)
    assert s.lr_at(9) == pytest.approx(1e-3)
    assert s.lr_at(10) == pytest.approx(1e-3)  # cosine starts at the peak
    assert s.lr_at(60) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)  # half way
    assert s.lr_at(110) == pytest.approx(1e-6) and s.lr_at(10**6) == pytest.approx(1e-6)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_schedule_applies_group_lr_scale():
    model = tiny_model()
    optimizer = build_optimizer(model, OptimSection(lr=1e-3, gate_lr_multiplier=20.0))
    s = WarmupCosineSchedule(lr=1e-3, min_lr=1e-6, warmup=0, decay=10)
    assert s.apply(optimizer) == pytest.approx(1e-3)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["gates"] == pytest.approx(2e-2) and lrs["decay"] == pytest.approx(1e-3)


def test_schedule_state_and_build_schedule():
    cfg = OptimSection(lr=2e-4, min_lr=1e-6, warmup_steps=10_000)
    s = build_schedule(cfg, total_steps=50_000)
    assert (s.warmup, s.decay) == (10_000, 39_999)
    assert s.lr_at(49_999) == pytest.approx(1e-6) and s.lr_at(49_998) > 1e-6
    s.advance()
    s.advance()
    other = build_schedule(cfg, total_steps=50_000)
    other.load_state_dict(s.state_dict())
    assert other.step == 2 and other.lr_at(other.step) == s.lr_at(2)
    # Short runs: warm-up is cut to the run length.
    assert build_schedule(cfg, total_steps=100).warmup == 100


def test_accumulation_from_global_token_batch():
    assert accumulation_steps(2_048_000, 256, 4, 1000) == 2
    assert accumulation_steps(2_048_000, 512, 4, 1000) == 1
    assert accumulation_steps(4096, 1, 4, 32) == 32
    assert accumulation_steps(4096, 2, 4, 32) == 16
    with pytest.raises(ValueError, match="not a multiple"):
        accumulation_steps(1000, 3, 4, 32)
    with pytest.raises(ValueError, match="not a multiple"):
        accumulation_steps(64, 4, 4, 32)  # less than one micro-step per rank
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        accumulation_steps(64, 0, 4, 32)


# -- optimizer groups -----------------------------------------------------------------------------------------
def test_param_groups_cover_trainable_only_with_the_right_decay():
    model = tiny_model()
    groups = {g["name"]: g for g in param_groups(model, OptimSection(weight_decay=0.1, resampler_weight_decay=0.0,
                                                                     gate_lr_multiplier=10.0))}
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {names[id(p)]: g["name"] for g in groups.values() for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grouped) == trainable
    assert groups["decay"]["weight_decay"] == 0.1
    assert groups["resampler"]["weight_decay"] == 0.0 and groups["no_decay"]["weight_decay"] == 0.0
    assert grouped["xattn_layers.0.attn_gate"] == grouped["xattn_layers.1.ffw_gate"] == "gates"
    assert groups["gates"]["weight_decay"] == 0.0 and groups["gates"]["lr_scale"] == 10.0
    assert groups["decay"]["lr_scale"] == 1.0
    assert grouped["xattn_layers.0.attn.norm.bias"] == "no_decay"
    assert grouped["xattn_layers.0.ffw.fc1.weight"] == "decay"
    assert grouped["lm.special_embed.weight"] == "decay"
    assert grouped["resampler.layers.0.attn.to_q.weight"] == "resampler"
    assert grouped["resampler.norm.weight"] == "no_decay"


def test_optimizer_keeps_no_state_for_frozen_parameters():
    model = tiny_model()
    optimizer = build_optimizer(model, OptimSection())
    ids = torch.randint(4, 38, (2, 6))
    ids[:, 1] = model.cfg.image_token_id
    images = torch.randn(2, 1, 1, 3, 16, 16)
    model(ids, images, labels=ids).loss.backward()
    optimizer.step()
    state_ids = {id(p) for p in optimizer.state}
    assert state_ids == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(id(p) not in state_ids for p in model.lm.layers.parameters())


def test_optimizer_is_adamw_with_the_papers_betas_and_the_configs_values():
    model = tiny_model()
    default = build_optimizer(model, OptimSection())
    assert isinstance(default, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in default.param_groups)  # Flamingo's AdamW
    custom = build_optimizer(model, OptimSection(beta1=0.8, beta2=0.99, eps=1e-6))
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 for g in custom.param_groups)


# -- loss ------------------------------------------------------------------------------------------------------
def test_token_loss_sum_matches_model_mean_times_count():
    model = tiny_model()
    ids = torch.randint(1, 38, (3, 9))
    ids[:, 1] = model.cfg.image_token_id
    labels = ids.clone()
    labels[0, :3] = -100
    labels[2, -2:] = model.cfg.pad_token_id
    images = torch.randn(3, 1, 1, 3, 16, 16)
    out = model(ids, images, labels=labels)
    total = token_loss_sum(out.logits, labels, model.cfg.image_token_id, model.cfg.pad_token_id)
    count = count_label_tokens(labels, model.cfg.image_token_id, model.cfg.pad_token_id)
    # Shifted: 8 targets per row. Ignored: row 0 positions 1-2 (-100, covering its <image>), row 1 its
    # <image>, row 2 its <image> and 2 pads.
    assert count == 3 * 8 - 2 - 1 - 3
    torch.testing.assert_close(total / count, out.loss, rtol=1e-6, atol=1e-6)


def test_global_token_normalisation_is_independent_of_the_micro_batch_split():
    # The token-mean over 2 rows equals the sum of per-micro-batch sums / total count, not the mean of means.
    model = tiny_model()
    ids = torch.randint(1, 38, (2, 10))
    ids[:, 0] = model.cfg.image_token_id
    labels = ids.clone()
    labels[1, :7] = -100  # the second row has far fewer label tokens
    images = torch.randn(2, 1, 1, 3, 16, 16)
    whole = model(ids, images, labels=labels).loss
    sums = [token_loss_sum(model(ids[i:i + 1], images[i:i + 1]).logits, labels[i:i + 1], model.cfg.image_token_id, 0)
            for i in range(2)]
    counts = [count_label_tokens(labels[i:i + 1], model.cfg.image_token_id, 0) for i in range(2)]
    torch.testing.assert_close(sum(sums) / sum(counts), whole, rtol=1e-5, atol=1e-6)
    mean_of_means = (sums[0] / counts[0] + sums[1] / counts[1]) / 2
    assert not torch.allclose(mean_of_means, whole, rtol=1e-3)


# -- JSON state ------------------------------------------------------------------------------------------------
def test_json_state_round_trips_tensors_tuples_and_bytes():
    state = {"a": torch.arange(5, dtype=torch.int64), "b": (1, 2.5, None), "c": b"\x00\xff",
             "d": [torch.tensor([1.5, -2.0], dtype=torch.bfloat16), {"e": np.arange(3, dtype=np.uint32)}],
             "f": torch.empty(0, 3)}
    back = from_jsonable(__import__("json").loads(__import__("json").dumps(to_jsonable(state))))
    assert torch.equal(back["a"], state["a"]) and back["b"] == (1, 2.5, None) and back["c"] == b"\x00\xff"
    assert back["d"][0].dtype == torch.bfloat16 and torch.equal(back["d"][0], state["d"][0])
    assert np.array_equal(back["d"][1]["e"], state["d"][1]["e"]) and back["f"].shape == (0, 3)
    with pytest.raises(TypeError, match="cannot store"):
        to_jsonable({"x": object()})


def test_rng_state_round_trip_through_json():
    import json

    saved = json.loads(json.dumps(to_jsonable(rng_state())))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(from_jsonable(saved))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


# -- FLOPs ------------------------------------------------------------------------------------------------------
def test_flop_counter_charges_trainable_6_frozen_4_vision_2():
    model = tiny_model()
    counter = FlopCounter(model)
    assert counter.vision_rate == 2 and counter.connector_rate == 6 and counter.xattn_rate == 6
    assert counter.lm_block_rate == 4
    text_only = BatchShape(text_tokens=10, text_tokens_sq=100, media_tokens=0, frames=0, media_items=0)
    lm = model.cfg.lm
    block_params = sum(m.weight.numel() for m in model.lm.layers.modules() if isinstance(m, torch.nn.Linear))
    xattn_text = sum(m.weight.numel() for name, m in model.xattn_layers.named_modules()
                     if isinstance(m, torch.nn.Linear) and "to_kv" not in name)
    head = 6 * 2 * lm.dim + 4 * lm.vocab_size * lm.dim
    expected = 10 * (4 * block_params + 6 * xattn_text + head) + 3 * 2 * 100 * lm.dim * lm.layers
    assert counter.flops(text_only) == pytest.approx(expected)
    model.set_trainable("all")
    everything = FlopCounter(model)
    assert everything.vision_rate == 6 and everything.lm_block_rate == 6
    with_image = BatchShape(text_tokens=10, text_tokens_sq=100, media_tokens=8, frames=1, media_items=1)
    assert everything.flops(with_image) > counter.flops(with_image) > counter.flops(text_only)


@pytest.mark.parametrize("stem", [[], [[6, 1], [8, 2], [12, 2]]])
def test_flop_counter_charges_each_embedding_conv_for_its_output_grid(stem):
    from torch.utils.flop_counter import FlopCounterMode

    from flamingo_fast.models.vision import VisionTransformer
    from train.metrics import _embedding_macs

    cfg = tiny_model().cfg.replace(vision={"stem": stem}).vision
    embeddings = VisionTransformer(cfg).embeddings
    with FlopCounterMode(display=False) as measured:  # torch's own count of the convs, for 3 images
        embeddings(torch.randn(3, 3, cfg.image_size, cfg.image_size))
    assert 2 * 3 * _embedding_macs(embeddings, cfg.image_size) == measured.get_total_flops()


# -- scoring ----------------------------------------------------------------------------------------------------
def test_held_out_scoring_is_flamingo_fast_evals():
    """train.evaluate scores with flamingo_fast.eval's cleaning, exact_match and vqa_accuracy."""
    text, start = vqa_text("how many?", "two")
    question = Sample(text, [torch.zeros(3, 4, 4)], "q", "vqa", answers=["2"] * 10, loss_start=start)
    assert score_example(question, " The Two! Question: what") == {
        "id": "q", "task": "vqa", "prompt": "<image>Question:how many? Short answer:", "prediction": "The Two!",
        "kind": "vqa", "score": 1.0, "reference": "2", "correct": True}
    # VQAv2: 2 of 10 annotators agree -> mean over leave-one-out subsets of min(1, matches / 3)
    question.answers[:] = ["red", "red"] + ["blue"] * 8
    assert score_example(question, "red")["score"] == pytest.approx((8 * (2 / 3) + 2 * (1 / 3)) / 10)
    text, start = caption_text("a red circle")
    caption = Sample(text, [torch.zeros(3, 4, 4)], "c", "caption", references=["a red circle"], loss_start=start)
    assert score_example(caption, " a red  circle ")["correct"] is True
    assert score_example(caption, "a red circle left")["score"] == 0.0
    assert "score" not in score_example(Sample("plain text", [], "t", "interleaved"), "x")


def test_default_config_validates():
    TrainConfig().validate()
    assert math.isclose(TrainConfig().optim.beta2, 0.95)


def test_region_mask_covers_exactly_the_patches_under_the_shape():
    from flamingo_fast.data.shapes import Shape
    from train.pretrain import region_mask

    mask = region_mask(Shape("red", "circle", x=0.25, y=0.5, size=0.25), image_size=32, patch_size=4).view(8, 8)
    expected = torch.zeros(8, 8)
    expected[4:6, 2:4] = 1.0  # pixels 8-15 across, 16-23 down: patch columns 2-3, rows 4-5
    assert torch.equal(mask, expected)
    edge = region_mask(Shape("red", "star", x=0.7, y=0.0, size=0.3), image_size=32, patch_size=4).view(8, 8)
    assert edge[0, 7] == 1.0 and edge[:, :5].sum() == 0  # clipped at the border, nothing left of x = 0.7


def test_subject_lines_repeat_the_asked_word_and_mix_in_every_nth_sample():
    from train.pretrain import mixed_with, subject_lines

    lines = subject_lines(seed=3)
    texts = [lines(i).text for i in range(40)]
    assert texts == [subject_lines(seed=3)(i).text for i in range(40)]  # a pure function of (seed, index)
    assert texts != [subject_lines(seed=4)(i).text for i in range(40)]
    for text in texts:
        question, output = text.removesuffix("<|endofchunk|>").split(" Output:")
        assert question.startswith("Question:what ") and question.endswith("?")
        assert output == question.rstrip("?").split()[-1]  # "what colour is the star?" -> "star"
    assert any(t.startswith("Question:what colour") for t in texts) and any(t.startswith("Question:what shape") for t in texts)
    mixed = mixed_with(lambda i: f"text {i}", lines, every=4)
    assert [isinstance(mixed(i), Sample) for i in range(8)] == [True, False, False, False] * 2
    with pytest.raises(ValueError, match="every must be a positive int"):
        mixed_with(lambda i: i, lines, every=0)


def test_lm_pretrained_on_subject_lines_names_the_subject():
    """The mechanism stage 2 relies on: after subject lines, the LM's next word after "Output:" is the question's
    subject, i.e. its state there carries what was asked."""
    from flamingo_fast.data.shapes import shapes_tokenizer
    from train.pretrain import pretrain_language_model, subject_lines

    torch.manual_seed(0)
    tokenizer = shapes_tokenizer()
    config = FlamingoConfig.from_preset("demo", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                                        lm={"dim": 64, "layers": 2, "heads": 1, "kv_heads": 1, "ffn_dim": 128})
    lm = Flamingo(config).lm
    lines = subject_lines(seed=0)
    pretrain_language_model(lm, tokenizer, lines, steps=80, batch_size=32, lr=3e-3)
    correct = 0
    with torch.no_grad():
        for i in range(10_000, 10_040):  # unseen lines
            prompt, subject = lines(i).text.removesuffix("<|endofchunk|>").split("Output:")
            ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(prompt + "Output:")])
            correct += int(lm(ids)[0, -1].argmax()) == tokenizer.encode(subject)[0]
    assert correct >= 36, f"the LM named the subject in {correct}/40 unseen lines"


def test_asked_word_names_the_subject_of_look_ups_and_the_direction_of_position_questions():
    from flamingo_fast.data.shapes import ShapesDataset
    from train.pretrain import asked_word

    data = ShapesDataset(split="val", n=400, seed=5, image_size=32, task="vqa")
    seen = set()
    for sample in data:
        kind, question = sample.meta["question_type"], sample.meta["question"]
        word = asked_word(sample)
        if kind == "colour":  # "what colour is the circle?"
            assert word == question.removeprefix("what colour is the ").removesuffix("?")
        elif kind == "shape":  # "what shape is blue?"
            assert word == question.removeprefix("what shape is ").removesuffix("?")
        elif kind in ("left", "right"):  # "what is left of the red circle?"
            assert question.startswith(f"what is {word} of the ") and word == kind
        else:
            assert kind == "count" and word is None
        seen.add(kind)
    assert seen == {"colour", "shape", "count", "left", "right"}
    assert asked_word(ShapesDataset(split="val", n=1, seed=5, image_size=32, task="caption")[0]) is None


def test_subject_readout_makes_the_lm_carry_the_asked_word_to_the_answer_position():
    """The stage-2 mechanism for look-up and position questions: trained with the asked-word read-out, the LM's
    state at the answer position of unseen questions (the prompt's last token, as evaluation feeds it) names the
    asked word (a subject, or left/right) at every layer boundary the xattn queries are built from, after only
    one LM block too. Each kind of question is checked on its own, so neither can ride on the other's score."""
    from flamingo_fast.data.shapes import ShapesDataset, shapes_tokenizer
    from train.pretrain import asked_word, pretrain_language_model

    torch.manual_seed(0)
    tokenizer = shapes_tokenizer()
    config = FlamingoConfig.from_preset("demo", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                                        lm={"dim": 64, "layers": 3, "heads": 1, "kv_heads": 1, "ffn_dim": 128})
    lm = Flamingo(config).lm
    questions = ShapesDataset(split="pretrain_text", n=10**6, seed=0, image_size=32, task="vqa")
    result = pretrain_language_model(lm, tokenizer, questions.__getitem__, steps=60, batch_size=32, lr=3e-3,
                                     subject_weight=1.0)
    readouts = result.subject_readout.readouts
    assert len(readouts) == config.lm.layers  # inputs of blocks 1..L-1 and the final state
    asked = [s for s in ShapesDataset(split="val", n=600, seed=1, image_size=32, task="vqa") if asked_word(s)]
    look_ups = [s for s in asked if s.meta["question_type"] in ("colour", "shape")][:60]
    positions = [s for s in asked if s.meta["question_type"] in ("left", "right")][:40]
    assert {s.meta["question_type"] for s in positions} == {"left", "right"}
    assert all(len(s.answers[0].split()) == 2 for s in positions)  # "red circle": read at ":" and at "red"
    _check_readouts(lm, tokenizer, readouts, look_ups, "look-up")
    _check_readouts(lm, tokenizer, readouts, positions, "left/right")
    without = pretrain_language_model(lm, tokenizer, questions.__getitem__, steps=1, batch_size=4, lr=1e-3)
    assert without.subject_readout is None


def _check_readouts(lm, tokenizer, readouts, unseen, label: str) -> None:
    """Every read-out names the asked word for >= 90% of `unseen`, from the state at every position that predicts
    an answer word: the prompt's last token, and for two-word answers ("red circle") also the first word."""
    from flamingo_fast.data.sample import IMAGE_TOKEN
    from train.pretrain import asked_word

    correct, total = [0] * len(readouts), 0
    lm.eval()
    with torch.no_grad():
        for sample in unseen:
            prompt = [tokenizer.bos_id] + tokenizer.encode(sample.prompt.replace(IMAGE_TOKEN, ""))
            words = sample.answers[0].split()
            for given in range(len(words)):  # the prompt, then the prompt and the answer's first word
                ids = torch.tensor([prompt + [tokenizer.encode(w)[0] for w in words[:given]]])
                states = []
                keep = lambda i, x: (states.append(x) if i else None) or x  # noqa: E731 - inputs of blocks 1..
                hidden = lm.hidden_states(lm.embed(ids), before_block=keep)
                states.append(hidden)
                asked = tokenizer.encode(asked_word(sample))[0]
                for k, (readout, x) in enumerate(zip(readouts, states)):
                    last = x[0, -1]
                    correct[k] += int(readout(torch.nn.functional.layer_norm(last, last.shape)).argmax()) == asked
                total += 1
    assert min(correct) >= 0.9 * total, f"read-out right per boundary {correct} of {total} unseen {label} states"


def test_question_weights_shift_the_drawn_question_types():
    from collections import Counter

    from flamingo_fast.data.shapes import ShapesDataset

    def fractions(**kwargs):
        data = ShapesDataset(split="train", n=1500, seed=0, image_size=32, task="vqa", **kwargs)
        counts = Counter(s.meta["question_type"] for s in data)
        return {t: c / len(data) for t, c in counts.items()}

    uniform = fractions()
    weighted = fractions(question_weights={"colour": 3, "shape": 2})
    assert weighted["colour"] > 1.5 * uniform["colour"] and weighted["shape"] > uniform["shape"]
    assert weighted["count"] < uniform["count"]
    only_count = fractions(question_weights={"colour": 0, "shape": 0, "left": 0, "right": 0})
    assert only_count == {"count": 1.0}  # every scene can be asked its count
    for bad in ({"size": 1}, {"colour": -1}, {"colour": "3"}, {t: 0 for t in ("colour", "shape", "count", "left", "right")}):
        with pytest.raises(ValueError, match="question_weights"):
            ShapesDataset(split="train", n=1, seed=0, image_size=32, task="vqa", question_weights=bad)
