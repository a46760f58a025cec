"""Text generation for Flamingo: greedy, sampling (temperature / top-k / top-p) and beam search.

    out = generate(model, input_ids, images, attention_mask=mask, max_new_tokens=20, num_beams=3,
                   eos_token_ids=[cfg.eoc_token_id, tokenizer.eos_id])
    out.tokens[i]   # prompt i's new tokens, without the stop token

What is computed once and what every step:
* the images go through the vision encoder and the resampler once (latents), and each gated
  cross-attention layer's keys/values of those latents are computed once (`Flamingo.media_kv`) and
  reused at every step. OpenFlamingo keeps the latents but recomputes every layer's K/V projection of
  all T_img x 64 latents at every step; `media_cache="latents"` reproduces that and `"none"` re-encodes
  the images too, for the benchmark (`python -m bench --ops generate`, bench/generation.py).
* the LM keeps a KV cache; each step runs one token per row.

Batches of prompts of different lengths are left-padded (`attention_mask` 0 on the left). Padded keys
are masked out of self-attention, and every row's RoPE positions start at 0 at its first real token, so
a row's result is the same as running it alone. `<image>` is never generated (there is no image for it),
and a row stops at the first of `eos_token_ids` (default: `<|endofchunk|>`).

Beam search (the Flamingo paper uses 3 beams) follows Hugging Face's: each step keeps the `num_beams` best
continuations of each prompt among the top 2 * num_beams candidates; a candidate ending in a stop token
(ranked within the first num_beams) becomes a finished hypothesis scored sum(log p) / length **
length_penalty (length = new tokens including the stop token); a prompt is done when it has num_beams
hypotheses and no running beam can beat the worst of them (exact for length_penalty <= 0).

`_Decoder.step` runs the LM's `hidden_states` with the KV cache, the `key_padding_mask` of the left
padding (only when some row is padded: otherwise the fused causal path) and Flamingo's xattn hook on the
cached media; a test checks it against `Flamingo.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from flamingo_fast.models.flamingo import Flamingo

MEDIA_CACHE_MODES = ("kv", "latents", "none")


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # per prompt: generated ids, without the stop token
    finished: list[bool]  # stopped on a stop token (False: ran into max_new_tokens)
    scores: list[float] = field(default_factory=list)  # sum of log-probs (beam: the length-normalised score)

    def padded(self, pad_token_id: int) -> torch.Tensor:
        """(B, longest) long tensor of `tokens`, right-padded."""
        width = max((len(t) for t in self.tokens), default=0)
        out = torch.full((len(self.tokens), width), pad_token_id, dtype=torch.long)
        for row, ids in enumerate(self.tokens):
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class _Decoder:
    """Incremental forward passes over a batch of rows with an LM KV cache and cached media K/V."""

    def __init__(self, model: Flamingo, rows: int, max_length: int, padded: bool, media_cache: str,
                 images: Optional[torch.Tensor], latents: Optional[torch.Tensor],
                 aspect_ratio_ids: Optional[torch.Tensor] = None):
        self.model, self.lm = model, model.lm
        weight = self.lm.embed_tokens.weight
        self.cache = self.lm.new_cache(rows, max_length, dtype=weight.dtype, device=weight.device)
        # Padding keys so far (True = padding); None when no row is padded: the LM's fast causal path.
        self.key_padding = torch.zeros(rows, max_length, dtype=torch.bool, device=weight.device) if padded else None
        self.media_state = None  # Flamingo.media_for_tokens' state: where the media spans continue
        self.key_count = None if aspect_ratio_ids is None else model.key_count(aspect_ratio_ids)
        self.aspect_ratio_ids = aspect_ratio_ids
        self.media_cache, self.images, self.latents = media_cache, images, latents
        self.media_kv = model.media_kv(latents) if (latents is not None and media_cache == "kv") else None

    def _media_for_step(self):
        """(latents, media_kv) for the xattn layers; both None without images."""
        if self.media_cache == "none" and self.images is not None:
            # re-encoded every step (benchmark mode)
            return self.model.encode_images(self.images, self.aspect_ratio_ids), None
        if self.latents is None:
            return None, None
        return (None, self.media_kv) if self.media_cache == "kv" else (self.latents, None)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (beam search); the media is shared within a prompt's beams, so it stays."""
        self.cache.reorder(rows)
        if self.media_state is not None:  # a (B,) tensor or a NamedTuple of them
            state = self.media_state
            self.media_state = (state.index_select(0, rows) if torch.is_tensor(state)
                                else type(state)(*(t.index_select(0, rows) for t in state)))
        if self.key_padding is not None:
            self.key_padding = self.key_padding.index_select(0, rows)

    def step(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids (rows, S) with valid (rows, S) bool (False = left padding) -> last-position logits (rows, V)."""
        start, end = self.cache.length, self.cache.length + ids.shape[1]
        if end > self.cache.max_length:
            raise ValueError(f"decoding needs {end} positions, the cache holds {self.cache.max_length}")
        key_padding_mask = None
        if self.key_padding is not None:
            self.key_padding[:, start:end] = ~valid
            key_padding_mask = self.key_padding[:, :end]
        media, self.media_state = self.model.media_for_tokens(ids, self.media_state, self.key_count)
        xattn = self.model.xattn_before_block(media, *self._media_for_step())
        h = self.lm.hidden_states(self.lm.embed(ids), self.cache, xattn, key_padding_mask)
        return self.lm.logits(h[:, -1])


# -- logits processing -----------------------------------------------------------------------------------------
def suppress_tokens(logits: torch.Tensor, token_ids: Iterable[int]) -> torch.Tensor:
    """logits (B, V') with the given ids set to -inf, in place; ids >= V' (input-only tokens) have no logit."""
    ids = [i for i in token_ids if i < logits.shape[-1]]
    if ids:
        logits[:, ids] = float("-inf")
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), restricted to the top_k tokens (0 = all)
    and to the smallest set whose probability reaches top_p (nucleus)."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# -- inputs --------------------------------------------------------------------------------------------------
def _check_inputs(model, input_ids, attention_mask, images, latents, num_beams, max_new_tokens, temperature,
                  top_p, media_cache):
    if not isinstance(model, Flamingo):
        raise TypeError(f"model must be a flamingo_fast Flamingo, got {type(model).__name__}")
    if not torch.is_tensor(input_ids) or input_ids.dtype != torch.long or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a (B, S) torch.long tensor with S >= 1, got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        mask = attention_mask.bool()
        if not torch.equal(mask, mask.long().cummax(1).values.bool()) or not mask[:, -1].all():
            raise ValueError("attention_mask must be left padding: 0s (if any) then 1s in every row, ending in 1")
    if images is not None and latents is not None:
        raise ValueError("pass images or latents, not both")
    if latents is not None and media_cache == "none":
        raise ValueError("media_cache='none' re-encodes images every step: pass images, not latents")
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams and max_new_tokens must be >= 1, got {num_beams} and {max_new_tokens}")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {temperature} and {top_p}")
    if media_cache not in MEDIA_CACHE_MODES:
        raise ValueError(f"media_cache must be one of {MEDIA_CACHE_MODES}, got {media_cache!r}")


@torch.no_grad()
def generate(
    model: Flamingo,
    input_ids: torch.Tensor,
    images: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    latents: Optional[torch.Tensor] = None,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Optional[Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    suppress_token_ids: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
    media_cache: str = "kv",
    aspect_ratio_ids: Optional[torch.Tensor] = None,
) -> GenerationOutput:
    """Continue each prompt row of `input_ids` (B, S) (left-padded, see `attention_mask`) given its
    images (B, T_img, F, C, H, W) or precomputed `latents` (B, T_img, n, Dm). Greedy by default;
    do_sample=True samples (temperature, top_k, top_p, `generator` for reproducibility); num_beams > 1 runs
    beam search (deterministic). Stops a row at any of `eos_token_ids` (default `<|endofchunk|>`) or after
    max_new_tokens; `<image>` and `suppress_token_ids` are never generated. Finished rows are padded with
    pad_token_id (default cfg.pad_token_id or 0) internally. media_cache: "kv" (default), or "latents" /
    "none" (slower, for benchmarks). Tiled vision (Mllama): images (B, T_img, max_tiles, C, H, W) with
    aspect_ratio_ids (B, T_img)."""
    _check_inputs(model, input_ids, attention_mask, images, latents, num_beams, max_new_tokens, temperature,
                  top_p, media_cache)
    if num_beams > 1 and do_sample:
        raise ValueError("beam search is deterministic here: use num_beams > 1 or do_sample=True, not both")
    cfg = model.cfg
    device = model.lm.embed_tokens.weight.device
    stop = [cfg.eoc_token_id] if eos_token_ids is None else [int(t) for t in eos_token_ids]
    if eos_token_ids is None and cfg.eoc_token_id >= model.lm.output_size:
        raise ValueError(f"eos_token_ids: the default stop token <|endofchunk|> (id {cfg.eoc_token_id}) has no logit in "
                         "this model (its special tokens are input-only, as Llama 3.2 Vision's): pass the tokenizer's "
                         "end-of-turn / eos id(s)")
    pad = (cfg.pad_token_id if cfg.pad_token_id is not None else 0) if pad_token_id is None else pad_token_id
    input_ids = input_ids.to(device)
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    padded = not bool(valid.all())
    model._check_tiled_media(images, latents, aspect_ratio_ids)
    if aspect_ratio_ids is not None:
        aspect_ratio_ids = aspect_ratio_ids.to(device)
    if images is not None:
        model._check_images(images, input_ids, aspect_ratio_ids)
        images = images.to(device)
        latents = model.encode_images(images, aspect_ratio_ids) if media_cache != "none" else None
    elif latents is not None:
        model._check_latents(latents, input_ids)
    num_media = images.shape[1] if images is not None else (latents.shape[1] if latents is not None else 0)
    key_count = None if aspect_ratio_ids is None else model.key_count(aspect_ratio_ids)
    model._check_values(input_ids, model.media_for_tokens(input_ids, None, key_count)[0], num_media, False)

    never = [cfg.image_token_id, *map(int, suppress_token_ids)]
    if num_beams > 1:
        return _beam_search(model, input_ids, valid, padded, images, latents, media_cache, max_new_tokens,
                            min_new_tokens, num_beams, length_penalty, stop, pad, never, aspect_ratio_ids)
    decoder = _Decoder(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, padded, media_cache,
                       images, latents, aspect_ratio_ids)
    logits = decoder.step(input_ids, valid)
    rows = input_ids.shape[0]
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    scores = torch.zeros(rows, dtype=torch.float64, device=device)
    stop_ids = torch.tensor(stop, dtype=torch.long, device=device)
    generated = []
    for t in range(max_new_tokens):
        logits = suppress_tokens(logits.float(), never + (stop if t < min_new_tokens else []))
        next_ids = sample_next(logits, temperature, top_k, top_p, generator) if do_sample else logits.argmax(-1)
        scores += torch.where(done, 0.0, logits.log_softmax(-1).gather(1, next_ids[:, None]).squeeze(1).double())
        next_ids = torch.where(done, torch.full_like(next_ids, pad), next_ids)
        generated.append(next_ids)
        hit = torch.isin(next_ids, stop_ids) & ~done
        finished |= hit
        done |= hit
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = decoder.step(next_ids[:, None], torch.ones_like(next_ids[:, None], dtype=torch.bool))
    table = torch.stack(generated, 1).tolist()
    tokens = []
    for row in range(rows):
        ids = table[row]
        cut = next((i for i, tok in enumerate(ids) if tok in stop), len(ids))
        tokens.append(ids[:cut])
    return GenerationOutput(tokens=tokens, finished=finished.tolist(), scores=scores.tolist())


class _Hypotheses:
    """The best `size` finished hypotheses of one prompt."""

    def __init__(self, size: int, length_penalty: float):
        self.size, self.length_penalty = size, length_penalty
        self.items: list[tuple[float, list[int], bool]] = []

    def add(self, tokens: list[int], sum_logprobs: float, finished: bool) -> None:
        score = sum_logprobs / (max(len(tokens), 1) ** self.length_penalty)
        if len(self.items) < self.size or score > self.worst:
            self.items.append((score, tokens, finished))
            self.items.sort(key=lambda item: item[0], reverse=True)
            del self.items[self.size:]

    @property
    def worst(self) -> float:
        return self.items[-1][0] if self.items else float("-inf")

    def done(self, best_running_sum: float, length: int) -> bool:
        if len(self.items) < self.size:
            return False
        return self.worst >= best_running_sum / (length**self.length_penalty)

    def best(self) -> tuple[float, list[int], bool]:
        return self.items[0]


def _beam_search(model, input_ids, valid, padded, images, latents, media_cache, max_new_tokens, min_new_tokens,
                 beams, length_penalty, stop, pad, never, aspect_ratio_ids=None) -> GenerationOutput:
    device = input_ids.device
    batch = input_ids.shape[0]

    def expand(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.repeat_interleave(beams, dim=0)  # each prompt's rows side by side

    decoder = _Decoder(model, batch * beams, input_ids.shape[1] + max_new_tokens, padded, media_cache,
                       expand(images), expand(latents), expand(aspect_ratio_ids))
    logits = decoder.step(expand(input_ids), expand(valid))
    beam_scores = torch.zeros(batch, beams, dtype=torch.float64, device=device)
    beam_scores[:, 1:] = float("-inf")  # all beams start equal: expand only the first at step 0
    sequences: list[list[int]] = [[] for _ in range(batch * beams)]
    hypotheses = [_Hypotheses(beams, length_penalty) for _ in range(batch)]
    done = [False] * batch
    stop_set = set(stop)
    for t in range(max_new_tokens):
        logits = suppress_tokens(logits.float(), never + (stop if t < min_new_tokens else []))
        logprobs = logits.log_softmax(-1).double()
        vocab = logprobs.shape[-1]
        candidates = (logprobs + beam_scores.view(-1, 1)).view(batch, beams * vocab)
        top_scores, top_index = candidates.topk(2 * beams, dim=1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        next_scores, next_tokens, next_rows = [], [], []
        for b in range(batch):
            chosen = []
            if not done[b]:
                for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b])):
                    source, token = divmod(index, vocab)
                    row = b * beams + source
                    if token in stop_set:
                        if rank < beams and score > float("-inf"):
                            hypotheses[b].add(sequences[row] + [token], score, finished=True)
                    elif score > float("-inf"):
                        chosen.append((score, token, row))
                    if len(chosen) == beams:
                        break
                done[b] = hypotheses[b].done(max(top_scores[b]), t + 1)
            if done[b] or len(chosen) < beams:  # finished prompt: its rows idle on padding
                chosen += [(float("-inf"), pad, b * beams)] * (beams - len(chosen))
            for score, token, row in chosen:
                next_scores.append(score)
                next_tokens.append(token)
                next_rows.append(row)
        if all(done):
            break
        sequences = [sequences[row] + [token] for row, token in zip(next_rows, next_tokens)]
        beam_scores = torch.tensor(next_scores, dtype=torch.float64, device=device).view(batch, beams)
        if t == max_new_tokens - 1:
            break
        decoder.reorder(torch.tensor(next_rows, dtype=torch.long, device=device))
        logits = decoder.step(torch.tensor(next_tokens, dtype=torch.long, device=device)[:, None],
                              torch.ones(batch * beams, 1, dtype=torch.bool, device=device))
    scores_now = beam_scores.tolist()
    for b in range(batch):
        if not done[b]:  # ran into max_new_tokens: the running beams compete too
            for k in range(beams):
                if scores_now[b][k] > float("-inf"):
                    hypotheses[b].add(sequences[b * beams + k], scores_now[b][k], finished=False)
    tokens, finished, scores = [], [], []
    for b in range(batch):
        score, ids, ended = hypotheses[b].best()
        tokens.append(ids[:-1] if ended else ids)  # running beams never hold a stop token
        finished.append(ended)
        scores.append(score)
    return GenerationOutput(tokens=tokens, finished=finished, scores=scores)
