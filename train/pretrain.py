"""Component pretraining for the demo, mirroring the Flamingo recipe in miniature: before the Flamingo
stage the vision encoder and the LM must already be trained, then both are frozen.

- Vision: CLIP-style contrastive training (Radford et al. 2021; the paper pretrains its NFNet the same
  way) of the ViT on image/caption pairs. The image embedding is the class token after
  `post_layernorm` plus a projection; the text tower is a small pre-LN Transformer over the caption
  tokens (embedding at the last token, projection). Symmetric InfoNCE with a learned temperature; pairs
  whose captions are identical count as positives of each other (soft targets), so duplicate captions in
  a batch are not pushed apart. Batches are built from groups of hard negatives (as NegCLIP does): a
  scene plus copies with the shape kinds or the colours redrawn and everything else kept. With random
  batches colour alone tells most captions apart, and the encoder learns little about shape (measured:
  an MLP probe of the frozen features then reads the leftmost shape's kind at ~35%, below a random
  encoder's ~55%).
- LM: next-token training of the decoder on the text of the training samples (captions and QA text,
  `<image>` markers removed, `<|endofchunk|>` kept), calling `model.lm` directly so the xattn layers
  (zero-gated, i.e. the identity) cost nothing. A question's answer can't be predicted from shapes text, so
  that text alone teaches the LM to ignore what is asked: at the answer position its states for "what colour is
  the circle?" and "... the star?" came out 0.1-0.4% apart, and the xattn queries built from them cannot find
  the asked shape. Two things make the LM carry the asked word there. `subject_lines` ("Question:what shape is
  blue? Output:blue") make the next word depend on the question's subject; trained first alone, then as a
  quarter of the text, they leave those states 17-65% apart (last to first layer; measured 2026-11-29). And the
  asked-word read-out (`subject_weight`): a linear probe per layer boundary reads `asked_word` (a look-up's
  subject, a position question's direction) from the LM's state at each position that predicts an answer word
  (the ":" of "Short answer:", and "red" of a "red circle" answer: the states the xattn layers build those
  words' queries from), and its loss trains the LM; the probes are discarded afterwards. This stands in for what
  a real LM brings from web-scale pretraining (attending back to what a question names). Without the direction,
  a probe told "what is left of ..." from "what is right of ..." at ":" at chance (0.50-0.64, 2026-12-04), so
  xattn could not either.

Both run on one process in plain PyTorch (no FSDP): they are the small warm-up stages of the demo; the
Flamingo stage that follows is the real trainer (train.loop).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flamingo_fast.data.sample import CAPTION_PROMPT, EOC_TOKEN, IMAGE_TOKEN, Sample
from flamingo_fast.data.shapes import COLOURS, KINDS, askable_questions, random_scene, render_scene, scene_caption
from flamingo_fast.data.tokenizer import Tokenizer
from flamingo_fast.data.transforms import ImageTransform
from flamingo_fast.models.vision import VisionTransformer

from train.optim import WarmupCosineSchedule


@dataclass
class StageResult:
    name: str
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    subject_accuracy: float | None = None  # stage 2's asked-word read-out on its last batch (subject_weight > 0)
    subject_readout: "SubjectReadout | None" = None  # the trained read-out (not part of the model)


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows -> ids (B, L) and lengths (B,)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows])


def _adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def _optimizer_step(optimizer, schedule: WarmupCosineSchedule, params, loss: torch.Tensor) -> None:
    """Backward, clip at 1.0, AdamW step at the schedule's lr, then advance the schedule."""
    schedule.apply(optimizer)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.advance()


# -- language model --------------------------------------------------------------------------------------------
def lm_text(sample: Sample) -> str:
    """The sample's text with its image markers removed (what a text-only corpus would hold)."""
    return sample.text.replace(IMAGE_TOKEN, "")


# Question types whose answer is found by looking up the one shape the question names.
LOOKUP_TYPES = ("colour", "shape")


def _subject_word(question: str) -> str:
    """"what colour is the circle?" -> "circle"; "what shape is blue?" -> "blue"."""
    return question.rstrip("?").split()[-1]


def asked_word(sample: Sample) -> str | None:
    """The word a shapes question's answer hinges on, which the LM must carry to the answer position: a
    look-up's subject ("what colour is the circle?" -> "circle", "what shape is blue?" -> "blue") or a position
    question's direction ("what is left of the red circle?" -> "left"); None for counting (its text never
    changes) and for any other sample."""
    meta = sample.meta or {}
    question_type = meta.get("question_type") if sample.task == "vqa" else None
    if question_type in LOOKUP_TYPES:
        return _subject_word(meta["question"])
    if question_type in ("left", "right"):
        return question_type
    return None


def subject_lines(seed: int = 0) -> Callable[[int], Sample]:
    """Text lines that repeat a shapes question's subject after "Output:" (see the module docstring)."""
    def line(index: int) -> Sample:
        rng = random.Random(f"flamingo-fast/subject-lines/{seed}/{index}")
        while True:
            questions = askable_questions(random_scene(rng))
            asked = [q for kind in LOOKUP_TYPES for q, _ in questions.get(kind, [])]
            if asked:
                break
        question = rng.choice(asked)
        subject = _subject_word(question)
        return Sample(f"Question:{question} {CAPTION_PROMPT}{subject}{EOC_TOKEN}", [], f"subject/{seed}/{index}",
                      "interleaved")
    return line


def mixed_with(texts: Callable[[int], Sample], extra: Callable[[int], Sample], every: int) -> Callable[[int], Sample]:
    """Sample i is extra(i) when i % every == 0, else texts(i)."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    return lambda index: extra(index) if index % every == 0 else texts(index)


class SubjectReadout(nn.Module):
    """Linear read-outs of the asked word from the LM's state at each layer boundary after the first block
    (the inputs of blocks 1..L-1, where xattn layers build their queries, and the final state)."""

    def __init__(self, dim: int, vocab_size: int, layers: int):
        super().__init__()
        self.readouts = nn.ModuleList(nn.Linear(dim, vocab_size) for _ in range(layers))

    def loss_and_accuracy(self, states: Sequence[torch.Tensor], rows: torch.Tensor, positions: torch.Tensor,
                          subjects: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Mean cross-entropy over boundaries of the subject ids read at (rows, positions); accuracy of the
        last boundary's read-out."""
        losses, logits = [], None
        for readout, x in zip(self.readouts, states):
            picked = x[rows, positions]
            logits = readout(F.layer_norm(picked, picked.shape[-1:]))
            losses.append(F.cross_entropy(logits, subjects))
        return torch.stack(losses).mean(), (logits.argmax(-1) == subjects).float().mean().item()


def _one_token(tokenizer: Tokenizer, word: str) -> int:
    ids = tokenizer.encode(word)
    if len(ids) != 1:
        raise ValueError(f"the asked-word read-out needs one-token words; the tokenizer splits {word!r} into {ids}")
    return ids[0]


def _answer_positions(tokenizer: Tokenizer, sample: Sample) -> range:
    """Indices, in [bos] + tokens(lm_text(sample)), of the tokens that predict the answer's words: the prompt's
    last token, then every answer word but the last ("red" of "red circle" predicts "circle")."""
    start = len(tokenizer.encode(sample.prompt.replace(IMAGE_TOKEN, "")))
    return range(start, start + len(tokenizer.encode(sample.answers[0])))


def pretrain_language_model(lm: nn.Module, tokenizer: Tokenizer, samples: Callable[[int], Sample], steps: int,
                            batch_size: int, lr: float, warmup: int = 20, log: Callable[[str], None] | None = None,
                            log_every: int = 50, subject_weight: float = 0.0) -> StageResult:
    """Train `lm` (a flamingo_fast LanguageModel) on text; `samples(i)` gives the i-th training sample. With
    `subject_weight` > 0 the loss adds that times the asked-word read-out's loss on the batch's questions
    (module docstring); the result's `subject_accuracy` is then the read-out's accuracy on the last batch."""
    if subject_weight < 0:
        raise ValueError(f"subject_weight must be >= 0, got {subject_weight}")
    params = [p for p in lm.parameters()]
    for p in params:
        p.requires_grad_(True)
    probes = SubjectReadout(lm.cfg.dim, lm.vocab_size, lm.cfg.layers) if subject_weight > 0 else None
    optimizer = _adamw(params + (list(probes.parameters()) if probes else []), lr, weight_decay=0.0)
    schedule = WarmupCosineSchedule(lr=lr, min_lr=lr * 0.05, warmup=min(warmup, steps), decay=max(steps - warmup - 1, 0))
    result = StageResult("lm", steps, 0.0)
    start = time.perf_counter()
    lm.train()
    for step in range(steps):
        batch = [samples(step * batch_size + i) for i in range(batch_size)]
        rows = [[tokenizer.bos_id] + tokenizer.encode(lm_text(sample)) for sample in batch]
        ids, lengths = _pad(rows, tokenizer.pad_id)
        targets = ids[:, 1:].masked_fill(torch.arange(1, ids.shape[1])[None, :] >= lengths[:, None], -100)
        asked = [(i, position, _one_token(tokenizer, word))
                 for i, sample in enumerate(batch) if probes is not None and (word := asked_word(sample))
                 for position in _answer_positions(tokenizer, sample)]
        states: list[torch.Tensor] = []  # the inputs of blocks 1..L-1, then the final state (SubjectReadout)

        def keep_block_inputs(i: int, x: torch.Tensor) -> torch.Tensor:
            if i > 0:
                states.append(x)
            return x

        hidden = lm.hidden_states(lm.embed(ids), before_block=keep_block_inputs if asked else None)
        states.append(hidden)
        logits = lm.logits(hidden)[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        message = ""
        if asked:
            asked_rows, positions, subjects = (torch.tensor(column) for column in zip(*asked))
            subject_loss, result.subject_accuracy = probes.loss_and_accuracy(states, asked_rows, positions, subjects)
            loss = loss + subject_weight * subject_loss
            message = f"  asked-word read-out accuracy {result.subject_accuracy:.3f}"
        _optimizer_step(optimizer, schedule, params, loss)
        result.losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"lm pretraining step {step + 1}/{steps}  loss {loss.item():.4f}{message}")
    result.seconds = time.perf_counter() - start
    result.subject_readout = probes
    return result


# -- vision encoder (contrastive) --------------------------------------------------------------------------------
class TextTower(nn.Module):
    """A small pre-LN Transformer text encoder: embedding at the last real token, projected."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, embed_dim: int, max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(max_len, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.position.shape[0]:
            raise ValueError(f"captions of {ids.shape[1]} tokens exceed the text tower's max_len {self.position.shape[0]}")
        x = self.embed(ids) + self.position[: ids.shape[1]]
        causal = torch.triu(torch.full((ids.shape[1], ids.shape[1]), float("-inf")), diagonal=1)
        x = self.encoder(x, mask=causal)  # causal: the last real token sees exactly its caption
        last = x[torch.arange(ids.shape[0]), lengths - 1]
        return self.proj(self.norm(last))


class ImageTower(nn.Module):
    """CLIP's image side on the Flamingo ViT: the class token after `post_layernorm`, projected (the image
    embedding), plus region embeddings: the mean of the final patch features (exactly what the Perceiver
    Resampler receives) over the patches a region covers, projected."""

    def __init__(self, vision: VisionTransformer, embed_dim: int):
        super().__init__()
        if not vision.cfg.class_token:
            raise ValueError("contrastive pretraining pools the class token; the ViT needs class_token=True")
        self.vision = vision
        self.proj = nn.Linear(vision.cfg.width, embed_dim, bias=False)
        self.region_proj = nn.Linear(vision.cfg.width, embed_dim, bias=False)

    def forward(self, images: torch.Tensor, region_masks: torch.Tensor | None = None,
                region_image: torch.Tensor | None = None):
        """images (B, C, H, W) -> image embeddings (B, E); with region_masks (R, num_patches) float and
        region_image (R,) long (which image each region is in), also region embeddings (R, E)."""
        v = self.vision
        x = v.encoder(v.pre_layrnorm(v.embeddings(images)))
        image_emb = self.proj(v.post_layernorm(x[:, 0]))
        if region_masks is None:
            return image_emb
        patches = x[:, 1:] if v.cfg.class_token else x
        patches = v.post_layernorm(patches) if v.cfg.output_norm else patches
        pooled = (region_masks[:, :, None] * patches[region_image]).sum(1) / region_masks.sum(1, keepdim=True)
        return image_emb, self.region_proj(pooled)


def region_mask(shape, image_size: int, patch_size: int) -> torch.Tensor:
    """(num_patches,) 1.0 on the patches the shape's bounding box overlaps (row-major, like the ViT)."""
    grid = image_size // patch_size
    x0, y0 = int(shape.x * grid), int(shape.y * grid)
    x1 = min(grid - 1, int((shape.x + shape.size) * grid - 1e-6))
    y1 = min(grid - 1, int((shape.y + shape.size) * grid - 1e-6))
    mask = torch.zeros(grid, grid)
    mask[y0:y1 + 1, x0:x1 + 1] = 1.0
    return mask.flatten()


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     same_caption: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; `same_caption` (B, B) bool marks pairs with identical captions (all positives)."""
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * image_emb @ text_emb.t()
    targets = same_caption.float() / same_caption.float().sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets.t()))


def _redraw(rng: random.Random, shapes, field_name: str, choices) -> list:
    """The scene with every shape's `field_name` redrawn, at least one of them changed."""
    while True:
        new = [dataclasses.replace(s, **{field_name: rng.choice(choices)}) for s in shapes]
        if new != list(shapes):
            return new


def hard_negative_pairs(seed: int, image_size: int, group: int = 4) -> Callable[[int], tuple]:
    """`pairs(i)` -> (PIL image, caption, shapes) of the i-th pair: groups of `group` scenes, a random
    scene then variants with redrawn kinds (twice as often) or colours, in the same places; a pure
    function of (seed, i) like the shapes dataset."""

    def pairs(index: int):
        base, offset = divmod(index, group)
        rng = random.Random(f"flamingo-fast/clip-hard-negatives/{seed}/{base}")
        shapes = random_scene(rng)
        variants = [shapes]
        for k in range(1, group):
            variants.append(_redraw(rng, shapes, "colour" if k % 3 == 0 else "kind",
                                    list(COLOURS) if k % 3 == 0 else list(KINDS)))
        scene = variants[offset]
        return render_scene(scene, image_size), scene_caption(scene), scene

    return pairs


def pretrain_vision_contrastive(vision: VisionTransformer, tokenizer: Tokenizer, pairs: Callable[[int], tuple],
                                transform: ImageTransform, steps: int, batch_size: int, lr: float,
                                warmup: int = 20, text_width: int = 128, text_layers: int = 2, embed_dim: int = 128,
                                region_weight: float = 1.0, log: Callable[[str], None] | None = None,
                                log_every: int = 50) -> StageResult:
    """CLIP-style training of `vision` on image/caption pairs (`pairs(i)` -> (PIL image, caption, shapes),
    e.g. `hard_negative_pairs`): the image-caption loss plus, weighted by `region_weight`, a region-phrase
    loss (each shape's patches against the text of its name, "red circle", as in RegionCLIP), which trains
    the patch features the resampler reads. The text tower and projections are discarded afterwards."""
    cfg = vision.cfg
    image_tower = ImageTower(vision, embed_dim)
    text_tower = TextTower(tokenizer.vocab_size, text_width, text_layers, max(1, text_width // 32), embed_dim)
    logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's initial temperature
    region_scale = nn.Parameter(torch.tensor(2.659))
    for p in vision.parameters():
        p.requires_grad_(True)
    params = [p for module in (image_tower, text_tower) for p in module.parameters()] + [logit_scale, region_scale]
    optimizer = _adamw(params, lr, weight_decay=0.05)
    schedule = WarmupCosineSchedule(lr=lr, min_lr=lr * 0.05, warmup=min(warmup, steps), decay=max(steps - warmup - 1, 0))
    result = StageResult("vision", steps, 0.0)
    start = time.perf_counter()
    region_accuracy = float("nan")
    for step in range(steps):
        batch = [pairs(step * batch_size + i) for i in range(batch_size)]
        captions = [caption for _, caption, _ in batch]
        images = torch.cat([transform(image) for image, _, _ in batch])  # (B, C, H, W): one frame each
        regions = [(b, shape) for b, (_, _, shapes) in enumerate(batch) for shape in shapes]
        masks = torch.stack([region_mask(shape, cfg.image_size, cfg.patch_size) for _, shape in regions])
        owner = torch.tensor([b for b, _ in regions])
        image_emb, region_emb = image_tower(images, masks, owner)

        ids, lengths = _pad([tokenizer.encode(c) + [tokenizer.eos_id] for c in captions], tokenizer.pad_id)
        same = torch.tensor([[a == b for b in captions] for a in captions])
        loss = contrastive_loss(image_emb, text_tower(ids, lengths), logit_scale, same)
        if region_weight > 0:
            names = sorted({shape.name for _, shape in regions})
            name_ids, name_lengths = _pad([tokenizer.encode(n) + [tokenizer.eos_id] for n in names], tokenizer.pad_id)
            name_emb = text_tower(name_ids, name_lengths)  # (N, E): every distinct phrase once
            target = torch.tensor([names.index(shape.name) for _, shape in regions])
            logits = region_scale.exp().clamp(max=100.0) * F.normalize(region_emb, dim=-1) @ \
                F.normalize(name_emb, dim=-1).t()
            loss = loss + region_weight * F.cross_entropy(logits, target)
            region_accuracy = (logits.argmax(dim=-1) == target).float().mean().item()
        _optimizer_step(optimizer, schedule, params, loss)
        result.losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"vision pretraining step {step + 1}/{steps}  contrastive loss {loss.item():.4f}  "
                f"region-phrase accuracy {region_accuracy:.3f}")
    result.seconds = time.perf_counter() - start
    return result
