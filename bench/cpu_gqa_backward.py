"""CPU flash attention backward with grouped-query heads: ATen's native GQA path against K/V repeated per query
head (what ops/cpu_flash.py runs), alone and with a competing process on the cores.

    python -m bench.cpu_gqa_backward [--busy-threads 0 1 2] [--json out.json]

One causal problem (1 x 2048 tokens, 4 query heads over 1 KV head, d 64, fp32, 2 threads); median of 5 calls
after a warm-up, both implementations timed in the same run under the same competitor.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time

import torch

from flamingo_fast.ops import cpu_flash

TOKENS, HEADS_Q, HEADS_KV, HEAD_DIM, CALLS = 2048, 4, 1, 64, 5


def _busy(threads: int, seconds: float) -> None:
    torch.set_num_threads(threads)
    a, end = torch.randn(800, 800), time.time() + seconds
    while time.time() < end:
        a @ a


def _implementations():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, TOKENS, HEADS_Q, HEAD_DIM, generator=g)
    k, v = (torch.randn(1, TOKENS, HEADS_KV, HEAD_DIM, generator=g) for _ in range(2))
    scale = HEAD_DIM ** -0.5
    out, lse = cpu_flash.forward(q, k, v, True, scale)
    dout = torch.randn_like(out)
    _, is_causal, mask = cpu_flash._causal_plan(q, k, True)
    bhsd = cpu_flash._bhsd

    def native():
        return cpu_flash._BACKWARD(bhsd(dout), bhsd(q), bhsd(k), bhsd(v), bhsd(out), lse, 0.0, is_causal,
                                   attn_mask=mask, scale=scale)

    return {"native_gqa": native, "repeat_kv": lambda: cpu_flash.backward(dout, q, k, v, out, lse, True, scale)}


def _median_ms(call) -> float:
    call()
    times = []
    for _ in range(CALLS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy-threads", type=int, nargs="+", default=[0, 1, 2],
                        help="threads of the competing process per round (0: alone)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    implementations, rows = _implementations(), []
    for busy in args.busy_threads:
        competitor = None
        if busy:
            competitor = multiprocessing.get_context("spawn").Process(target=_busy, args=(busy, 120.0), daemon=True)
            competitor.start()
            time.sleep(1.0)
        try:
            row = {"busy_threads": busy, **{name: round(_median_ms(call), 1) for name, call in implementations.items()}}
        finally:
            if competitor is not None:
                competitor.terminate()
        row["native_over_repeat"] = round(row["native_gqa"] / row["repeat_kv"], 2)
        rows.append(row)
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": "2-core", "threads": 2, "shape": [1, TOKENS, HEADS_Q, HEADS_KV, HEAD_DIM],
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
