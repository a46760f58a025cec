"""Few-shot protocol: prompt format, demonstration choice, prediction cleaning, metrics, evaluate()."""

import pytest
import torch

import flamingo_fast.eval.harness as harness
from flamingo_fast.data.shapes import ShapesDataset, shapes_tokenizer
from flamingo_fast.data.transforms import ImageTransform
from flamingo_fast.eval import TASKS, compute_metrics, evaluate, generate_text, summarize
from flamingo_fast.eval.fewshot import build_prompt, clean_prediction, random_demos
from flamingo_fast.eval.rices import RicesRetriever
from flamingo_fast.models import Flamingo, FlamingoConfig

TOKENIZER = shapes_tokenizer()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = FlamingoConfig.from_preset(
        "demo", vocab_size=TOKENIZER.vocab_size, pad_token_id=TOKENIZER.pad_id,
        vision={"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
        resampler={"dim": 32, "depth": 1, "heads": 2, "head_dim": 16, "n_latents": 4, "max_frames": 1},
        xattn={"heads": 2, "head_dim": 16},
        lm={"dim": 32, "layers": 2, "heads": 2, "kv_heads": 1, "ffn_dim": 64, "max_seq_len": 256},
    )
    model = Flamingo(cfg).eval()
    with torch.no_grad():
        for layer in model.xattn_layers.values():
            layer.attn_gate.fill_(1.0)
    return model


def shapes(split, task, n=12):
    return ShapesDataset(split, n, image_size=16, task=task)


def test_prompt_format_few_and_zero_shot():
    support, queries = shapes("train", "vqa"), shapes("val", "vqa")
    demos, query = [support[3], support[5]], queries[0]
    text, images = build_prompt(query, demos, with_images=True)
    # "<image>Question:q1 Short answer:a1<|endofchunk|><image>Question:q2 Short answer:a2<|endofchunk|>
    #  <image>Question:q Short answer:"
    assert text == support[3].text + support[5].text + query.prompt
    assert text.endswith("Short answer:") and text.count("<image>") == 3 and text.count("<|endofchunk|>") == 2
    assert images == [support[3].images[0], support[5].images[0], query.images[0]]
    text, images = build_prompt(query, demos, with_images=False, separator="\n")
    assert text == support[3].text.replace("<image>", "") + "\n" + support[5].text.replace("<image>", "") + "\n" + query.prompt
    assert text.count("<image>") == 1 and images == [query.images[0]]
    caption = shapes("val", "caption")[0]
    assert build_prompt(caption, [], with_images=True)[0] == "<image>Output:"


def test_random_demos():
    first = random_demos(100, 8, seed=0, query_index=3)
    assert first == random_demos(100, 8, seed=0, query_index=3) and len(set(first)) == 8
    assert first != random_demos(100, 8, seed=1, query_index=3)
    assert first != random_demos(100, 8, seed=0, query_index=4)
    with pytest.raises(ValueError, match="only 3"):
        random_demos(3, 4, 0, 0)


def test_clean_prediction():
    vqa, caption = TASKS["vqav2"], TASKS["coco"]
    assert clean_prediction(" red question : what colour", vqa) == "red"
    assert clean_prediction("yes, it is", vqa) == "yes"
    assert clean_prediction('a "big" dog Output: a cat', caption) == "a big dog"
    assert clean_prediction("two dogs Short answer: two", caption) == "two dogs"
    assert clean_prediction("a dog, a cat", caption) == "a dog, a cat"  # only VQA cuts at ", "


def test_compute_metrics_by_hand():
    # VQA: "red" matches 10 humans (1.0), "blue" none (0.0) -> 50%; exact match also 1 of 2 -> 50%.
    metrics = compute_metrics(TASKS["shapes_vqa"], ["red", "blue"], [["red"] * 10, ["green"] * 10])
    assert metrics == {"vqa_accuracy": 50.0, "exact_match": 50.0}
    # Captions with disjoint words, identical to their reference: CIDEr-D 7.5 (see test_eval_metrics) -> 750.
    metrics = compute_metrics(TASKS["coco"], ["red circle left of blue square", "green star"],
                              [["red circle left of blue square"], ["green star"]])
    assert metrics["cider"] == pytest.approx(750.0)


def test_evaluate_plumbing_with_a_perfect_model(monkeypatch):
    queries, support = shapes("val", "vqa", 5), shapes("train", "vqa", 20)
    answers = iter([q.answers[0] for q in queries] * 4)  # four runs: (0, 2 shots) x (seed 0, 1)
    seen = []

    def perfect(model, tokenizer, prompts, images, transform, **kwargs):
        for prompt, imgs in zip(prompts, images):
            assert prompt.count("<image>") == len(imgs)
            seen.append(prompt)
        assert kwargs["max_new_tokens"] == 5 and kwargs["num_beams"] == 3 and kwargs["length_penalty"] == 0.0
        return [next(answers) + " question : what" for _ in prompts]  # a new prompt started: cut off

    monkeypatch.setattr(harness, "generate_text", perfect)
    results = evaluate(tiny_model(), TOKENIZER, "shapes_vqa", shots=[0, 2], queries=queries, support=support,
                       seeds=[0, 1], batch_size=2, image_transform=ImageTransform(16))
    assert [(r.shots, r.seed) for r in results] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert all(r.metrics == {"vqa_accuracy": 100.0, "exact_match": 100.0} for r in results)
    zero_shot, two_shot = seen[0], seen[10]
    # 0 shots: two text-only demonstrations, then the query with its image.
    assert zero_shot.count("<image>") == 1 and zero_shot.count("Short answer:") == 3
    assert two_shot.count("<image>") == 3
    assert seen[10] != seen[15]  # seed 1 draws other demonstrations than seed 0
    rows = summarize(results)
    assert {(r["shots"], r["metric"], r["seeds"], r["mean"], r["std"]) for r in rows} == {
        (k, m, 2, 100.0, 0.0) for k in (0, 2) for m in ("vqa_accuracy", "exact_match")}


def test_evaluate_matches_direct_generation():
    model = tiny_model()
    queries, support = shapes("val", "caption", 3), shapes("train", "caption", 10)
    results = evaluate(model, TOKENIZER, "shapes_caption", shots=[0, 2], queries=queries, support=support,
                       batch_size=2, num_beams=2, max_new_tokens=6)
    assert [r.shots for r in results] == [0, 2]
    transform = ImageTransform(16)
    for result in results:
        assert set(result.metrics) == {"cider", "exact_match"} and result.num_queries == 3
        for record in result.predictions:
            query = next(q for q in queries if q.id == record["id"])
            # 2 demonstrations either way: with their images at 2 shots, text-only at 0 shots (the paper's
            # zero-shot protocol).
            demos = [support[i] for i in random_demos(len(support), 2, 0, queries_index(queries, query))]
            # The prompt written out from the samples' own texts (Flamingo's format: each demonstration's
            # "<image>Output:{caption}<|endofchunk|>", then the query's "<image>Output:"), not read from evaluate.
            shown = [d.text if result.shots else d.text.replace("<image>", "") for d in demos]
            prompt = "".join(shown) + "<image>Output:"
            assert record["prompt"] == prompt
            images = ([d.images[0] for d in demos] if result.shots else []) + [query.images[0]]
            text = generate_text(model, TOKENIZER, [prompt], [images], transform, max_new_tokens=6, num_beams=2,
                                 length_penalty=0.0)[0]
            assert record["prediction"] == clean_prediction(text, TASKS["shapes_caption"])


def queries_index(queries, query):
    return next(i for i in range(len(queries)) if queries[i].id == query.id)


def test_rices_puts_the_most_similar_last():
    model = tiny_model()
    support = shapes("train", "caption", 10)
    retriever = RicesRetriever(model, support, ImageTransform(16), batch_size=4)
    picks = retriever.find([support[7].images[0], support[2].images[0]], k=3)
    assert picks[0][-1] == 7 and picks[1][-1] == 2 and len(set(picks[0])) == 3
    results = evaluate(model, TOKENIZER, "shapes_caption", shots=[2], queries=shapes("val", "caption", 2),
                       support=support, rices=True, seeds=[0, 1], num_beams=1, max_new_tokens=3)
    assert len(results) == 1  # RICES is deterministic: one run


def test_evaluate_bad_input():
    model = tiny_model()
    with pytest.raises(TypeError, match="Flamingo"):
        evaluate(None, TOKENIZER, "coco", queries=[], support=[])
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(model, TOKENIZER, "imagenet", queries=[], support=[])
    with pytest.raises(ValueError, match="needs 'caption'"):
        evaluate(model, TOKENIZER, "coco", shots=[0], queries=shapes("val", "vqa", 2), support=[])
    with pytest.raises(ValueError, match="shots"):
        evaluate(model, TOKENIZER, "coco", shots=[-1], queries=shapes("val", "caption", 2), support=[])
