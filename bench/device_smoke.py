"""One small forward + backward of one fused-kernel mask kind against float64, in its own process.

    python -m bench.device_smoke causal|full|media|perceiver|perceiver_kv_input

bench/device_check.sh runs each kind under `timeout` before the test suite, so that a kernel that hangs
(a lost mbarrier arrival, say) is named by kind and direction instead of stalling every later stage.
Prints one line per direction: relative error against the float64 reference and the wall time.
"""

from __future__ import annotations

import sys
import time

import torch

from bench.harness import compare
from flamingo_fast import ops

KINDS = ("causal", "full", "media", "perceiver", "perceiver_kv_input")
TOLERANCE = 2e-2  # bf16


def _attention_call(kind: str, generator: torch.Generator):
    b, s, hq, hkv, d = 2, 300, 4, 2, 64
    media_index = None
    if kind == "media":
        images, latents = 3, 64
        media_index = torch.tensor([-1] * 20 + [0] * 100 + [1] * 90 + [2] * 90).expand(b, -1).contiguous()
        sk = images * latents
    elif kind == "perceiver":
        s, sk, hkv = 64, 64 + 257, hq
    else:
        sk = s

    def make(*shape):
        return torch.randn(*shape, generator=generator).to("cuda", torch.bfloat16)

    q, k, v = make(b, s, hq, d), make(b, sk, hkv, d), make(b, sk, hkv, d)
    dout = make(b, s, hq, d)

    def run(q, k, v, backend):
        if kind in ("causal", "full"):
            return ops.attention(q, k, v, causal=kind == "causal", backend=backend)
        if kind == "media":
            return ops.media_cross_attention(q, k, v, media_index.to(q.device), 64, True, backend=backend)
        return ops.perceiver_attention(q, k, v, backend=backend)

    return (q, k, v), dout, run


def _kv_input_call(generator: torch.Generator):
    from flamingo_fast.ops.perceiver_kv_input import perceiver_kv_input

    dim, n_img, tokens, n_lat = 256, 3, 65, 16
    media = torch.randn(n_img, tokens, dim, generator=generator).to("cuda", torch.bfloat16)
    latents = torch.randn(n_img, n_lat, dim, generator=generator).to("cuda", torch.bfloat16)
    # float64 LayerNorms with random affine parameters: the op casts them to the inputs' dtype.
    norms = [torch.nn.LayerNorm(dim).to("cuda", torch.float64) for _ in range(2)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=generator, dtype=torch.float64))
            norm.bias.copy_(0.1 * torch.randn(dim, generator=generator, dtype=torch.float64))
    dout = torch.randn(n_img, tokens + n_lat, dim, generator=generator).to("cuda", torch.bfloat16)

    def run(media, latents, backend):
        return perceiver_kv_input(media, latents, norms[0], norms[1], backend=backend)

    return (media, latents), dout, run


def main(kind: str) -> int:
    if kind not in KINDS:
        print(f"kind must be one of {KINDS}, got {kind!r}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(0)
    inputs, dout, run = _kv_input_call(generator) if kind == "perceiver_kv_input" else _attention_call(kind, generator)
    inputs = [x.requires_grad_() for x in inputs]
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    ref = run(*inputs64, "reference")
    ref_grads = torch.autograd.grad(ref, inputs64, dout.double())

    start = time.perf_counter()
    out = run(*inputs, "cuda")
    torch.cuda.synchronize()
    fwd_s = time.perf_counter() - start
    fwd_err = compare((out,), (ref,))[1]
    print(f"{kind} fwd: rel_err {fwd_err:.2e} ({fwd_s * 1e3:.1f} ms incl. first launch)", flush=True)
    start = time.perf_counter()
    grads = torch.autograd.grad(out, inputs, dout)
    torch.cuda.synchronize()
    bwd_s = time.perf_counter() - start
    bwd_err = compare(grads, ref_grads)[1]
    print(f"{kind} bwd: rel_err {bwd_err:.2e} ({bwd_s * 1e3:.1f} ms incl. first launch)", flush=True)
    ok = fwd_err <= TOLERANCE and bwd_err <= TOLERANCE
    print(f"{kind}: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
