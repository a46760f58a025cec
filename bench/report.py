"""Presenting results: the rich console table, the JSON list, the PNG plot and the markdown summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional

from bench.harness import Row

# The CPU targets of the issue: media_cross_attention's torch backend against OpenFlamingo's dense mask,
# fp32 forward, 2k text tokens: >= 5x at 8 images and >= 20x at 32 images (fwd+bwd is reported alongside).
MEDIA_TARGETS = {8: 5.0, 32: 20.0}
MEDIA_TARGET_SEQ = 2048
MODEL_OPS = ("train_step", "generate", "packing")  # whole-model rows: tokens/s columns, not on the kernels' plot
STATUS_STYLE = {"ok": "", "wrong": "red", "error": "red", "unavailable": "dim", "skipped": "dim"}


# -- formatting --------------------------------------------------------------------------------------------------
def _sig(value: Optional[float], digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 10 ** digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _err(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1e}"


def _peak(row: Row) -> str:
    if row.peak_fraction is None:
        return "-"
    return f"{100 * row.peak_fraction:.1f}% {'mem' if row.bound == 'memory' else 'cmp'}"


def _peer(row: Row) -> str:
    if row.speedup_vs_best_peer is None:
        return "-"
    return f"{row.speedup_vs_best_peer:.2f}x {row.best_peer}"


# -- console ----------------------------------------------------------------------------------------------------
def print_tables(rows: list[Row], console, peaks=None, title_note: str = "") -> None:
    """One table per op; long notes (why a row is unavailable, skipped or refused) become footnotes."""
    from rich.table import Table

    if peaks is not None:
        console.print(
            f"[bold]measured peaks[/bold]: matmul {peaks.tflops:.3g} TFLOP/s (n={peaks.matmul_n}), "
            f"copy {peaks.gbps:.3g} GB/s ({peaks.copy_bytes / 2**20:.0f} MiB)"
        )
    for op in dict.fromkeys(r.op for r in rows):
        op_rows = [r for r in rows if r.op == op]
        if op == "data":
            _print_data_table(op_rows, console)
            continue
        e2e = op in MODEL_OPS
        first = op_rows[0]
        table = Table(title=f"{op}  [{first.device}, {first.dtype}, {first.threads or '-'} threads]{title_note}",
                      title_justify="left")
        for column in ("case", "dir", "impl", "ms", "TFLOP/s"):
            table.add_column(column, justify="right" if column in ("ms", "TFLOP/s") else "left")
        if e2e:
            table.add_column("tokens/s", justify="right")
            table.add_column("MFU", justify="right")
            table.add_column("peak MiB", justify="right")
            table.add_column("compile s", justify="right")
            table.add_column("act. MiB", justify="right")
        else:
            table.add_column("GB/s", justify="right")
            table.add_column("% roofline", justify="right")
        for column in ("max abs err", "rel err", "vs best peer", "status"):
            table.add_column(column, justify="right" if "err" in column else "left")
        notes: dict[str, int] = {}
        previous = None
        for row in op_rows:
            group = (row.case, row.direction)
            if previous is not None and group != previous:
                table.add_section()
            previous = group
            rates = ([_sig(row.tokens_per_s), _pct(row.mfu), _sig(row.peak_mem_mb), _sig(row.compile_s),
                      _sig(row.activation_mb)] if e2e
                     else [_sig(row.gbps), _peak(row)])
            status = row.status
            if row.note:
                status += f" [{notes.setdefault(row.note, len(notes) + 1)}]"
            table.add_row(
                row.case, row.direction, row.impl, _sig(row.ms), _sig(row.tflops), *rates,
                _err(row.max_abs_err), _err(row.rel_err), _peer(row), status,
                style=STATUS_STYLE.get(row.status, ""),
            )
        console.print(table)
        for note, number in notes.items():
            console.print(f"  [{number}] {note}", markup=False, highlight=False)


def _print_data_table(rows: list[Row], console) -> None:
    from rich.table import Table

    first = rows[0]
    table = Table(title=f"data: WebDataset path, decode + resize + tokenize + collate  [{first.device}]",
                  title_justify="left")
    for column, justify in (("case", "left"), ("impl", "left"), ("ms / batch", "right"), ("samples/s", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(row.case, row.impl, _sig(row.ms), _sig(row.samples_per_s))
    console.print(table)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# -- targets ----------------------------------------------------------------------------------------------------
def media_targets(rows: Iterable[Row]) -> list[dict]:
    """torch backend vs openflamingo_dense at 2k text tokens and 8 / 32 images, per direction."""
    by_key = {(r.case, r.direction, r.impl): r for r in rows if r.op == "media_cross_attention"}
    results = []
    for (case, direction, impl), row in by_key.items():
        shape = row.shape
        if impl != "torch" or shape.get("seq_q") != MEDIA_TARGET_SEQ or shape.get("num_images") not in MEDIA_TARGETS:
            continue
        dense = by_key.get((case, direction, "openflamingo_dense"))
        if row.ms is None or dense is None or dense.ms is None:
            continue
        target = MEDIA_TARGETS[shape["num_images"]] if direction == "fwd" else None
        ratio = dense.ms / row.ms
        results.append({
            "case": case, "images": shape["num_images"], "direction": direction, "dtype": row.dtype,
            "torch_ms": row.ms, "openflamingo_dense_ms": dense.ms, "ratio": ratio, "target": target,
            "met": None if target is None else ratio >= target,
        })
    return sorted(results, key=lambda t: (t["images"], t["direction"] != "fwd"))


def generation_ratios(rows: Iterable[Row]) -> list[dict]:
    """Per generation series (model, prompt, images): the media K/V cache's speedup over recomputing the
    K/V every step (OpenFlamingo) and over re-encoding the images every step, from the same run."""
    by_series: dict[str, dict[str, Row]] = {}
    for row in rows:
        if row.op == "generate":
            by_series.setdefault(row.series, {})[row.shape.get("media_cache")] = row
    results = []
    for series, modes in by_series.items():
        cached = modes.get("kv")
        if cached is None or cached.ms is None:
            continue
        result = {"case": series, "images": cached.shape.get("images"), "kv_tokens_per_s": cached.tokens_per_s}
        for mode, key in (("latents", "recompute"), ("none", "reencode")):
            other = modes.get(mode)
            timed = other is not None and other.ms is not None
            result[f"{key}_tokens_per_s"] = other.tokens_per_s if timed else None
            result[f"{key}_ratio"] = other.ms / cached.ms if timed else None
        results.append(result)
    return results


def train_step_ratios(rows: list[Row]) -> list[dict]:
    """Per case, from the same run: compile+cuda's speedup over compile, torch and openflamingo, and
    compile's over torch and torch's over openflamingo (None where a side was not timed)."""
    by_case: dict[str, dict[str, Row]] = {}
    for row in rows:
        if row.op == "train_step":
            by_case.setdefault(row.case, {})[row.impl] = row
    pairs = (("compile+cuda", "compile"), ("compile+cuda", "torch"), ("compile+cuda", "openflamingo"),
             ("compile+cuda+fp8", "compile+cuda"), ("compile", "torch"), ("torch", "openflamingo"),
             ("compile", "openflamingo"), ("torch+sac", "torch"), ("torch+ac", "torch"))
    results = []
    for case, impls in by_case.items():
        result = {"case": case}
        for fast, slow in pairs:
            a, b = impls.get(fast), impls.get(slow)
            result[f"{fast} vs {slow}"] = b.ms / a.ms if a and b and a.ms and b.ms else None
        results.append(result)
    return results


def _times(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_generation(ratios: list[dict], console) -> None:
    for r in ratios:
        console.print(
            f"generate {r['case']}: media K/V cached {_sig(r['kv_tokens_per_s'])} tokens/s; recomputed every step "
            f"(OpenFlamingo) {_sig(r['recompute_tokens_per_s'])} -> cache {_times(r['recompute_ratio'])} faster; "
            f"images re-encoded every step {_sig(r['reencode_tokens_per_s'])} -> {_times(r['reencode_ratio'])}"
        )


def print_step_ratios(ratios: list[dict], console) -> None:
    """train_step: same-run speedups per case (only the pairs where both sides were timed)."""
    for r in ratios:
        timed = [f"{pair} {value:.2f}x" for pair, value in r.items() if pair != "case" and value is not None]
        if timed:
            console.print(f"train_step {r['case']}: " + "; ".join(timed))


def print_targets(targets: list[dict], console) -> None:
    for t in targets:
        if t["target"] is None:
            verdict = "reported; the target is for fwd"
        else:
            verdict = f"target >= {t['target']:g}x: " + ("[green]met[/green]" if t["met"] else "[red]MISSED[/red]")
        console.print(
            f"media_cross_attention {t['case']} {t['direction']} {t['dtype']}: torch {t['torch_ms']:.3g} ms, "
            f"openflamingo_dense {t['openflamingo_dense_ms']:.3g} ms -> {t['ratio']:.1f}x ({verdict})"
        )


# -- JSON -------------------------------------------------------------------------------------------------------
def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def rows_to_json(rows: list[Row]) -> list[dict]:
    return [_finite(row.to_dict()) for row in rows]


def write_json(rows: list[Row], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows_to_json(rows), indent=1, allow_nan=False) + "\n")


# -- plot -------------------------------------------------------------------------------------------------------
def write_plot(rows: list[Row], path: Path, title: str = "") -> None:
    """TFLOP/s against sequence length, one line per implementation (and image count / head dim)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.tflops is not None and r.op not in MODEL_OPS]
    ops = list(dict.fromkeys(r.op for r in timed)) or ["(no timed rows)"]
    directions = list(dict.fromkeys(r.direction for r in timed)) or ["fwd"]
    fig, axes = plt.subplots(len(ops), len(directions), figsize=(6.5 * len(directions), 4.2 * len(ops)),
                             squeeze=False)
    xlabels = {"attention": "sequence length", "media_cross_attention": "text tokens",
               "perceiver_attention": "media tokens per image"}
    for i, op in enumerate(ops):
        for j, direction in enumerate(directions):
            ax = axes[i][j]
            lines: dict[str, list[tuple[int, float]]] = {}
            for r in timed:
                if r.op == op and r.direction == direction:
                    label = f"{r.impl} ({r.series})" if r.series else r.impl
                    lines.setdefault(label, []).append((r.seq_len, r.tflops))
            for label, points in lines.items():
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {direction}")
            ax.set_xlabel(xlabels.get(op, "sequence length"))
            ax.set_ylabel("TFLOP/s (unmasked work)")
            ax.grid(True, alpha=0.3)
            if lines:
                ax.legend(fontsize=6, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- markdown ---------------------------------------------------------------------------------------------------
def markdown_summary(rows: list[Row], meta: dict, targets: list[dict]) -> str:
    lines = [f"# Benchmark: {meta['device_name']}, {meta['date']}", ""]
    lines.append(f"- command: `{meta['command']}`")
    lines.append(f"- device: {meta['device_description']}; dtype {meta['dtype']}; torch {meta['torch']}; "
                 f"threads {meta['threads']}")
    lines.append(f"- measured peaks (same run): matmul {meta['peak_tflops']:.3g} TFLOP/s, copy "
                 f"{meta['peak_gbps']:.3g} GB/s")
    if meta.get("case_note"):
        lines.append(f"- cases: {meta['case_note']}")
    lines.append(f"- JSON: `{meta['json_name']}` (schema: bench/README.md); plot: `{meta['plot_name']}`")
    lines += ["", f"![TFLOP/s against sequence length]({meta['plot_name']})", ""]
    if targets:
        lines += ["## media_cross_attention: torch backend vs OpenFlamingo dense masking (same run)", "",
                  "| case | dir | torch ms | openflamingo_dense ms | speedup | target |", "|---|---|---|---|---|---|"]
        for t in targets:
            if t["target"] is None:
                verdict = "reported (target is for fwd)"
            else:
                verdict = f">= {t['target']:g}x " + ("met" if t["met"] else "**missed**")
            lines.append(f"| {t['case']} | {t['direction']} | {t['torch_ms']:.3g} | {t['openflamingo_dense_ms']:.3g} | "
                         f"{t['ratio']:.1f}x | {verdict} |")
        lines.append("")
    ratios = generation_ratios(rows)
    if ratios:
        lines += ["## generate: media K/V cached vs recomputed every step (OpenFlamingo), same run", "",
                  "| case | cached tokens/s | recomputed tokens/s | cache speedup | re-encoded tokens/s | speedup |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {_sig(r['kv_tokens_per_s'])} | {_sig(r['recompute_tokens_per_s'])} | "
                  f"{_times(r['recompute_ratio'])} | {_sig(r['reencode_tokens_per_s'])} | "
                  f"{_times(r['reencode_ratio'])} |" for r in ratios]
        lines.append("")
    step_ratios = train_step_ratios(rows)
    if any(len([v for k, v in r.items() if k != "case" and v is not None]) for r in step_ratios):
        lines += ["## train_step: same-run speedups", ""]
        for r in step_ratios:
            timed = [f"{pair} **{value:.2f}x**" for pair, value in r.items() if pair != "case" and value is not None]
            if timed:
                lines.append(f"- {r['case']}: " + "; ".join(timed))
        lines.append("")
        lines += ["| case | impl | ms | tokens/s | MFU | peak MiB | compile s | activation MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r.case} | {r.impl} | {_sig(r.ms)} | {_sig(r.tokens_per_s)} | {_pct(r.mfu)} | "
                  f"{_sig(r.peak_mem_mb)} | {_sig(r.compile_s)} | {_sig(r.activation_mb)} |"
                  for r in rows if r.op == "train_step" and r.ms]
        lines.append("")
    data = [r for r in rows if r.op == "data" and r.ms]
    if data:
        lines += ["## data: WebDataset path (decode + resize + tokenize + collate)", "",
                  "| case | impl | ms / batch | samples/s |", "|---|---|---|---|"]
        lines += [f"| {r.case} | {r.impl} | {_sig(r.ms)} | {_sig(r.samples_per_s)} |" for r in data]
        lines.append("")
    lines += ["## Timed rows", "",
              "| op | case | dir | impl | ms | TFLOP/s | GB/s | % roofline | rel err | vs best peer |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.ms is None or r.op == "data":
            continue
        rate = _pct(r.mfu) + " MFU" if r.op == "train_step" else _peak(r)
        lines.append(f"| {r.op} | {r.case} | {r.direction} | {r.impl} | {_sig(r.ms)} | {_sig(r.tflops)} | "
                     f"{_sig(r.gbps)} | {rate} | {_err(r.rel_err)} | {_peer(r)} |")
    refused = [r for r in rows if r.status in ("wrong", "error")]
    if refused:
        lines += ["", "## Refused or failed", ""]
        lines += [f"- {r.op} {r.case} {r.direction} {r.impl}: {r.note}" for r in refused]
    missing = {}
    for r in rows:
        if r.status in ("unavailable", "skipped"):
            missing.setdefault((r.impl, r.status, r.note), []).append(r.op)
    if missing:
        lines += ["", "## Not timed here", ""]
        for (impl, status, note), op_list in missing.items():
            lines.append(f"- {impl} ({status}, {', '.join(dict.fromkeys(op_list))}): {note}")
    return "\n".join(lines) + "\n"
