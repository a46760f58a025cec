"""Generation benchmark: greedy decoding with each xattn layer's media keys/values computed once and cached
(flamingo_fast's `generate`) against recomputing them from the latents at every step, as OpenFlamingo's
generate does, and against re-encoding the images at every step (`generate(media_cache=...)`: "kv",
"latents", "none").

Rows: op "generate", direction "fwd", impl "torch" (eager, attention ops on the `torch` backend), one per
model, image count and media mode; the mode ends the case label ("kv-cached", "kv-per-step", "reencode")
and is `shape["media_cache"]`, the rest of the label is the row's `series`. ms is one `generate` call
(prompt + `new_tokens` tokens, stopping disabled), tokens_per_s = batch * new_tokens / time, tflops = the
cached mode's FLOPs (the useful work, counted once with FlopCounterMode) / time, so recomputation earns
no credit. report.generation_ratios pairs the modes of one series: the ratio is the K/V cache's speedup.
The gap grows with the images in the prompt (shots): re-projecting costs T_img x n_latents x Dm x 2 x
heads x head_dim multiply-adds per xattn layer per step.

Correctness gate: every mode must generate exactly the tokens of a cache-free greedy loop (a full forward
over the whole sequence at every step) and match its summed log-probabilities within the fp32 tolerance
(rel_err); otherwise the row is refused. The gates of every xattn layer are 0.5 (as in bench/e2e.py), so
the images matter. Generation runs in float32 whatever --dtype says: one token per step leaves no work for
the half-precision fused kernels, and rounding would make the token comparison flaky.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from bench.e2e import E2ECase, build_model, forced_backend, make_batch, register_op_flop_formulas
from bench.harness import DTYPE_NAMES, TOLERANCE, Row, Settings, mark_rows, time_call
from bench.impls import Unavailable
from flamingo_fast.models.generate import MEDIA_CACHE_MODES, GenerationOutput, generate

OP = "generate"
IMPL = "torch"
DTYPE = torch.float32
MODE_TAGS = {"kv": "kv-cached", "latents": "kv-per-step", "none": "reencode"}
MODE_NOTES = {
    "kv": "media K/V computed once and cached (flamingo_fast)",
    "latents": "media K/V recomputed from the latents every step (OpenFlamingo's generate)",
    "none": "images re-encoded every step",
}


@dataclass(frozen=True)
class GenerationCase(E2ECase):
    """`seq` is the prompt length (its `images` `<image>` tokens placed as in bench/e2e.make_batch)."""

    new_tokens: int = 32

    @property
    def label(self) -> str:
        return f"{self.name} b{self.batch} p{self.seq} img{self.images} +{self.new_tokens}"


# "3b-shape": the 3b preset's proportions scaled down (an xattn layer before every LM block, 64 latents per
# image, resampler width = LM width) so that it runs on a CPU; "1b": bench/e2e.py's 1B model.
SHAPE_3B = {
    "vision": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 2, "heads": 4, "mlp_dim": 512},
    "resampler": {"dim": 512, "depth": 2, "heads": 8, "head_dim": 64, "n_latents": 64},
    "xattn": {"every": 1, "heads": 8, "head_dim": 64},
    "lm": {"vocab_size": 1022, "dim": 512, "layers": 8, "heads": 8, "kv_heads": 8, "ffn_dim": 1408},
}
GENERATION_CASES = (
    *(GenerationCase("demo", "demo", batch=1, seq=128, images=n) for n in (4, 8, 16)),
    *(GenerationCase("3b-shape", "demo", batch=1, seq=128, images=n, overrides=SHAPE_3B) for n in (4, 8, 16)),
    *(GenerationCase("1b", "3b", batch=1, seq=512, images=n, needs_cuda=True,
                     overrides={"lm": {"layers": 6}, "xattn": {"every": 2}}) for n in (8, 32)),
)
QUICK_GENERATION = GenerationCase("demo", "demo", batch=1, seq=32, images=2, new_tokens=8)


@torch.no_grad()
def cache_free_greedy(model, input_ids: torch.Tensor, latents: torch.Tensor,
                      new_tokens: int) -> tuple[list[list[int]], list[float]]:
    """The oracle: greedy tokens (never `<image>`) and their summed log-probs per row, from a full forward
    over the whole sequence at every step."""
    ids = input_ids
    scores = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    tokens = []
    for _ in range(new_tokens):
        logits = model(ids, latents=latents).logits[:, -1].float()
        logits[:, model.cfg.image_token_id] = float("-inf")
        token = logits.argmax(-1)
        scores += logits.log_softmax(-1).gather(1, token[:, None]).squeeze(1).double()
        tokens.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
    return torch.stack(tokens, 1).tolist(), scores.tolist()


def count_generate_flops(call: Callable[[], object]) -> float:
    """FLOPs of one generate call (matmuls, and the attention custom ops through bench/e2e's formulas)."""
    from torch.utils.flop_counter import FlopCounterMode

    register_op_flop_formulas()
    with FlopCounterMode(display=False) as counter:
        call()
    return float(counter.get_total_flops())


def _row(case: GenerationCase, mode: str, settings: Settings) -> Row:
    return Row(op=OP, case=f"{case.label} {MODE_TAGS[mode]}", impl=IMPL, direction="fwd", note=MODE_NOTES[mode],
               device=settings.device_name, dtype=DTYPE_NAMES[DTYPE], threads=settings.threads, seq_len=case.seq,
               series=case.label, shape={"preset": case.preset, "overrides": case.overrides, "batch": case.batch,
                                         "prompt_tokens": case.seq, "new_tokens": case.new_tokens,
                                         "images": case.images, "media_cache": mode})


@dataclass
class GenerationPrepared:
    """What the media modes of one case share: the model, the prompt, the oracle and the useful FLOPs."""

    case: GenerationCase
    model: torch.nn.Module
    input_ids: torch.Tensor
    images: torch.Tensor
    oracle_tokens: list[list[int]]
    oracle_scores: list[float]
    useful_flops: float

    def call(self, mode: str) -> Callable[[], GenerationOutput]:
        """One greedy `generate` call in media mode `mode`, stopping disabled."""
        def run() -> GenerationOutput:
            with forced_backend("torch"):
                return generate(self.model, self.input_ids, self.images, max_new_tokens=self.case.new_tokens,
                                eos_token_ids=[], media_cache=mode)
        return run


def prepare_generation(case: GenerationCase, settings: Settings) -> GenerationPrepared:
    if case.needs_cuda and settings.device.type != "cuda":
        raise Unavailable(f"the {case.name} model needs a CUDA GPU")
    cfg = case.config()
    # No parameter needs grad here (and FlopCounterMode's module tracker fails on ones that do under no_grad).
    model = build_model(cfg, settings.device, settings.seed).eval().requires_grad_(False)
    input_ids, images, _ = make_batch(cfg, case, settings.device, settings.seed)
    with torch.no_grad(), forced_backend("torch"):
        tokens, scores = cache_free_greedy(model, input_ids, model.encode_images(images), case.new_tokens)
    prepared = GenerationPrepared(case, model, input_ids, images, tokens, scores, 0.0)
    prepared.useful_flops = count_generate_flops(prepared.call("kv"))
    return prepared


@dataclass
class GenerationChecked:
    run: Callable[[], GenerationOutput]
    first_call_s: float
    tokens_match: bool
    max_abs_err: float
    rel_err: float
    tolerance: float = TOLERANCE[DTYPE]

    @property
    def ok(self) -> bool:
        return self.tokens_match and self.rel_err <= self.tolerance

    @property
    def refusal(self) -> str:
        if not self.tokens_match:
            return "refused to time: generated tokens differ from the cache-free greedy loop's"
        return f"refused to time: log-prob rel_err {self.rel_err:.3g} > tolerance {self.tolerance:g}"


def check_mode(prepared: GenerationPrepared, run: Callable[[], GenerationOutput]) -> GenerationChecked:
    """Run once and compare the tokens and summed log-probs with the cache-free oracle's."""
    start = time.perf_counter()
    out = run()
    first_call_s = time.perf_counter() - start
    errors = [abs(a - b) for a, b in zip(out.scores, prepared.oracle_scores)]
    rel_err = max(e / max(abs(b), 1e-300) for e, b in zip(errors, prepared.oracle_scores))
    return GenerationChecked(run, first_call_s, out.tokens == prepared.oracle_tokens, max(errors), rel_err)


def bench_generation_case(case: GenerationCase, settings: Settings,
                          on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """One row per media mode; every mode is checked against the cache-free oracle before it is timed."""
    rows = [_row(case, mode, settings) for mode in MEDIA_CACHE_MODES]
    try:
        prepared = prepare_generation(case, settings)
    except Unavailable as exc:
        return mark_rows(rows, "unavailable", str(exc), on_row)
    for row in rows:
        row.shape["parameters"] = prepared.model.parameter_counts()["total"]
        _bench_mode(row, prepared, prepared.call(row.shape["media_cache"]), settings)
        on_row(row)
    return rows


def _bench_mode(row: Row, prepared: GenerationPrepared, run: Callable[[], GenerationOutput],
                settings: Settings) -> None:
    row.oracle, row.tolerance, row.gflop = "cache-free greedy", TOLERANCE[DTYPE], prepared.useful_flops / 1e9
    try:
        checked = check_mode(prepared, run)
    except Exception as exc:  # reported in the table, never fatal for the whole run
        row.status, row.note = "error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        return
    row.available, row.max_abs_err, row.rel_err = True, checked.max_abs_err, checked.rel_err
    if not checked.ok:
        row.status, row.note = "wrong", checked.refusal
        return
    row.ms = time_call(run, settings, checked.first_call_s)  # the check doubles as the warm-up of slow calls
    seconds = row.ms * 1e-3
    row.tokens_per_s = prepared.case.batch * prepared.case.new_tokens / seconds
    row.tflops = prepared.useful_flops / seconds / 1e12
    row.status = "ok"


def bench_generation(settings: Settings, quick: bool, on_row: Callable[[Row], None] = lambda row: None,
                     cases: Optional[tuple[GenerationCase, ...]] = None) -> list[Row]:
    """Rows for every case (--quick: one small demo case)."""
    rows = []
    for case in cases or ((QUICK_GENERATION,) if quick else GENERATION_CASES):
        rows += bench_generation_case(case, settings, on_row)
    return rows
