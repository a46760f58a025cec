"""Issue 18's proof: in float64, a packed batch gives the same per-document losses and the same parameter
gradients (up to summation order) as the same documents run one per row, unpacked.

Documents: with and without images, an image as the very first token, several images in one document, a
document that fills a row exactly; the LM and the xattn layers use GQA (4 query heads over 2 KV heads)."""

import pytest
import torch

from flamingo_fast import Flamingo, FlamingoConfig
from train.loss import token_loss_sum

TINY = dict(
    vision={"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
    resampler={"dim": 32, "depth": 1, "heads": 2, "head_dim": 16, "n_latents": 4, "max_frames": 1},
    xattn={"heads": 4, "head_dim": 8, "kv_heads": 2},
    lm={"vocab_size": 30, "dim": 32, "layers": 2, "heads": 4, "kv_heads": 2, "ffn_dim": 64},
    pad_token_id=0,
)
IMG, EOC, BOS, S = 30, 31, 1, 16
DOCUMENTS = [  # token ids; every <image> has its own random image
    [BOS, IMG, 5, 6, 7, EOC],
    [BOS, 8, 9, 10],  # no image: xattn gives 0, only the gated FFW acts
    [BOS, IMG, 4, 5, IMG, 6, 7, EOC, IMG, 9],  # three images
    [IMG, 3, 4],  # an image as the very first token
    [BOS, IMG] + list(range(2, 16)),  # fills a row of S = 16 exactly
]
ROWS = [[0, 1, 3], [2], [4]]  # which documents each packed row holds


def _model() -> Flamingo:
    torch.manual_seed(0)
    model = Flamingo(FlamingoConfig.from_preset("demo", **TINY)).double()
    with torch.no_grad():  # open the tanh gates, or the xattn layers would not touch the output
        for layer in model.xattn_layers.values():
            layer.attn_gate.fill_(0.7)
            layer.ffw_gate.fill_(-0.5)
    return model


def _documents():
    g = torch.Generator().manual_seed(1)
    out = []
    for ids in DOCUMENTS:
        ids = torch.tensor(ids)
        labels = ids.clone()
        labels[ids == IMG] = -100
        images = torch.randn(int((ids == IMG).sum()), 1, 3, 16, 16, generator=g, dtype=torch.float64)
        out.append((ids, labels, images))
    return out


def _packed_batch(documents):
    """The packed layout (flamingo_fast.data.packing): rows of S tokens, documents back to back, the padding
    tail its own document, media_index into the flat image list."""
    rows = len(ROWS)
    batch = {"input_ids": torch.zeros(rows, S, dtype=torch.long), "labels": torch.full((rows, S), -100),
             "media_index": torch.full((rows, S), -1), "document_ids": torch.zeros(rows, S, dtype=torch.long)}
    images, spans = [], {}
    for r, members in enumerate(ROWS):
        start = 0
        for number, d in enumerate(members):
            ids, labels, doc_images = documents[d]
            end = start + len(ids)
            batch["input_ids"][r, start:end] = ids
            batch["labels"][r, start + 1:end] = labels[1:]  # never predict across a boundary
            batch["document_ids"][r, start:end] = number
            local = torch.cumsum(ids == IMG, 0) - 1
            batch["media_index"][r, start:end] = torch.where(local >= 0, local + len(images), -1)
            images += list(doc_images)
            spans[d] = (r, start, end)
            start = end
        batch["document_ids"][r, start:] = len(members)
    batch["images"] = torch.stack(images)
    return batch, spans


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_packed_rows_equal_documents_run_one_per_row():
    documents = _documents()
    model = _model()
    unpacked = []
    for ids, labels, images in documents:
        logits = model(ids[None], images[None] if len(images) else None).logits
        loss = token_loss_sum(logits, labels[None], IMG, 0)
        loss.backward()
        unpacked.append(loss.detach())
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    batch, spans = _packed_batch(documents)
    logits = model(batch["input_ids"], batch["images"], media_index=batch["media_index"],
                   document_ids=batch["document_ids"]).logits
    for d, (r, start, end) in spans.items():
        got = token_loss_sum(logits[r:r + 1, start:end], batch["labels"][r:r + 1, start:end], IMG, 0)
        torch.testing.assert_close(got, unpacked[d], rtol=1e-12, atol=1e-12, msg=lambda m: f"document {d}: {m}")
    token_loss_sum(logits, batch["labels"], IMG, 0).backward()
    got = _grads(model)
    assert got.keys() == want.keys() and len(got) > 20
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_packed_rows_without_document_ids_would_differ():
    """The test above can fail: the same packed rows run as plain causal rows (documents see each other, one
    RoPE position stream) give other losses."""
    documents = _documents()
    model = _model()
    batch, spans = _packed_batch(documents)
    packed = model(batch["input_ids"], batch["images"], media_index=batch["media_index"],
                   document_ids=batch["document_ids"]).logits
    plain = model(batch["input_ids"], batch["images"], media_index=batch["media_index"],
                  document_ids=torch.zeros_like(batch["document_ids"])).logits
    r, start, end = spans[1]  # the second document of row 0
    assert not torch.allclose(packed[r, start:end], plain[r, start:end])


@pytest.mark.parametrize("change, error, match", [
    (lambda b: b.pop("media_index"), ValueError, "need media_index"),
    (lambda b: b.update(images=b["images"][None]), ValueError, r"flat list \(N, F, C, H, W\)"),
    (lambda b: b.update(document_ids=b["document_ids"][:, :4]), ValueError, "document_ids must be"),
    (lambda b: b.update(document_ids=b["document_ids"].float()), TypeError, "document_ids must be an int32/int64"),
    (lambda b: b.update(media_index=b["media_index"].clamp(max=0) + 50), ValueError, "media_index points at image"),
])
def test_bad_packed_inputs_are_named(change, error, match):
    batch, _ = _packed_batch(_documents())
    change(batch)
    model = _model()
    with pytest.raises(error, match=match):
        model(batch["input_ids"], batch["images"], media_index=batch.get("media_index"),
              document_ids=batch["document_ids"])


@pytest.mark.slow
def test_packed_forward_backward_compiles_without_graph_breaks():
    torch._dynamo.reset()
    batch, _ = _packed_batch(_documents())
    model = _model().float()
    inputs = dict(images=batch["images"].float(), media_index=batch["media_index"],
                  document_ids=batch["document_ids"])

    def run(fn):
        model.zero_grad(set_to_none=True)
        logits = fn(batch["input_ids"], **inputs).logits
        token_loss_sum(logits, batch["labels"], IMG, 0).backward()
        return logits.detach(), _grads(model)

    eager_logits, eager_grads = run(model)
    compiled_logits, compiled_grads = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_flop_shape_of_a_packed_batch_counts_attention_per_document():
    from train.metrics import BatchShape

    batch, _ = _packed_batch(_documents())
    batch["attention_mask"] = (batch["document_ids"] < torch.tensor([3, 1, 1])[:, None]).long()  # real documents
    shape = BatchShape.from_batch(batch)
    lengths = [len(d) for d in DOCUMENTS]
    assert shape.text_tokens == sum(lengths)
    assert shape.text_tokens_sq == sum(n * n for n in lengths)  # not (6 + 4 + 3)^2 for row 0
    assert shape.media_items == shape.frames == 6  # the flat list: 1 + 0 + 3 + 1 + 1 images, one frame each
    assert shape.media_tokens == int(((batch["media_index"] >= 0) & batch["attention_mask"].bool()).sum())
