"""Document-masked causal attention in PyTorch (the `torch` backend of `attention(..., document_ids=...)`).

A packed row holds several documents one after another; a token may attend only to earlier tokens of its own
document. Rather than computing the whole (S, S) causal square and masking the cross-document part, the
documents are gathered into padded batches of their own ("varlen" as padded batches), one dense causal call
runs per batch, and the results are scattered back. No query-key pair of two different documents is ever
computed. Documents are grouped by length class (half octaves), so a batch pads each document to less than
1.5 times its length: one long document (a row's padding tail, say) does not pad all the short ones.

In the backward the padded queries contribute nothing: their dout and out are 0 (so dS = P (dP - delta) = 0),
and their lse is +inf, so that P = exp(score - lse) is 0 rather than an overflow (inf * 0 = NaN) for large
scores. Padded keys sit after every real query of their document, so the causal mask already hides them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flamingo_fast.ops.validation import check_document_order


@dataclass
class DocumentPlan:
    """Where each token goes in a buffer that holds, one length class after another, a padded
    (documents, longest, ...) batch per class: each class's batch is a contiguous view of that buffer, so one
    copy gathers a tensor for every class and one index_select brings the results back in token order."""

    destination: torch.Tensor  # (B*S,) the token's slot in the buffer
    slots: int  # buffer length: sum over classes of documents x longest
    classes: list[tuple[int, int, int]]  # (first slot, documents, longest) per length class

    def gather(self, x: torch.Tensor, fill: float = 0.0) -> list[torch.Tensor]:
        """(B, S, ...) -> one (documents, longest, ...) tensor per class, `fill` where a document is shorter."""
        flat = x.flatten(0, 1)
        buffer = flat.new_full((self.slots, *flat.shape[1:]), fill).index_copy_(0, self.destination, flat)
        return [buffer[first:first + n * longest].view(n, longest, *flat.shape[1:])
                for first, n, longest in self.classes]

    def scatter(self, parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The inverse of `gather` on the real tokens: per-class (documents, longest, ...) -> (B, S, ...)."""
        buffer = torch.cat([part.flatten(0, 1) for part in parts])
        return buffer.index_select(0, self.destination).view(*like.shape[:2], *buffer.shape[1:])


def document_plan(document_ids: torch.Tensor) -> DocumentPlan:
    """(B, S) ids, non-decreasing along each row -> the plan. A document is a run of equal ids within a row; rows
    never share one. Length class = ceil(2 log2(length)): a class pads a document to at most sqrt(2) times its
    length (finer classes cost more calls than they save on these sizes)."""
    check_document_order(document_ids)
    ids = document_ids.long()
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = starts.flatten()
    document = starts.long().cumsum(0) - 1
    position = torch.arange(starts.numel(), device=ids.device)
    offset = position - position[starts][document]  # the token's position within its document
    lengths = torch.bincount(document)
    length_class = torch.ceil(2 * torch.log2(lengths.double())).long()
    first_slot = torch.empty_like(lengths)  # of each document
    classes, slots = [], 0
    for cls in length_class.unique().tolist():
        members = (length_class == cls).nonzero().squeeze(1)
        longest = int(lengths[members].max())
        first_slot[members] = slots + torch.arange(members.numel(), device=ids.device) * longest
        classes.append((slots, int(members.numel()), longest))
        slots += int(members.numel()) * longest
    return DocumentPlan(first_slot[document] + offset, slots, classes)


def forward(dense, q, k, v, document_ids, scale: float):
    """dense: the module (forward/backward) of full causal attention. -> (out (B,S,Hq,d), lse (B,Hq,S))."""
    plan = document_plan(document_ids)
    results = [dense.forward(qc, kc, vc, True, scale) for qc, kc, vc in zip(*(plan.gather(t) for t in (q, k, v)))]
    out = plan.scatter([o for o, _ in results], q)
    lse = plan.scatter([part.transpose(1, 2) for _, part in results], q[..., 0])
    return out, lse.transpose(1, 2).contiguous()


def backward(dense, dout, q, k, v, out, lse, document_ids, scale: float):
    plan = document_plan(document_ids)
    lse_parts = [part.transpose(1, 2).contiguous() for part in plan.gather(lse.transpose(1, 2), fill=float("inf"))]
    grads = [dense.backward(*parts, lse_part, True, scale)
             for *parts, lse_part in zip(*(plan.gather(t) for t in (dout, q, k, v, out)), lse_parts)]
    return tuple(plan.scatter([g[i] for g in grads], t) for i, t in enumerate((q, k, v)))
