#!/usr/bin/env bash
# The one prepared check for a lent H200 (see /work/.library/device/README.md): build flamingo_fast._C there,
# smoke-test each fused kernel in its own process (a hang is named, not fatal), run the GPU tests, time the
# kernels against SDPA/cuDNN/FlexAttention/torch, time a training step and packed vs padded rows, and run the
# demo's GPU path. Every stage has its own limit and all of them fit a global DEADLINE (default 540 s), so the
# run ends inside one device call; the short table printed last is the part to read first.
#
# Run from the repository root on the device machine, carrying the wheels folder:
#   device tool: run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=600)
# Wheels needed in .whl/ (the device has no network; everything else is in its image, see KINDS.md):
#   nvidia_cutlass-4.2.0.0-py3-none-any.whl   (CUTLASS/CuTe headers for the build; imported --no-deps)
#   torchdata-0.11.0-py3-none-any.whl         (flamingo_fast.data imports it; test collection needs it)
#   open_flamingo-2.0.1, einops_exts-0.0.4    (the OpenFlamingo parity tests and the train-step baseline)
#   torchao-0.18.0 (optional)                 (the train step's compile+cuda+fp8 variant; without it: unavailable)
# STAGES (default: all) picks stages by name, e.g. STAGES="build steps" after a call that ran the rest:
#   build smoke tests kernels steps fp8 flex packing mllama demo   (every stage after build needs it)
# Files written under $OUT (at most 8 come back): run.log build.log pytest.log bench.log bench.json extras.log
# summary.json fp8_numerics.json.
set -uo pipefail

OUT=${OUT:-/tmp/flamingo_fast_device_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=${DEADLINE:-540}
export PYTHONUNBUFFERED=1
SCRATCH=$(mktemp -d)
STAGES=${STAGES:-build smoke tests kernels steps fp8 flex packing mllama demo}
want() { [[ " $STAGES " == *" $1 "* ]]; }

elapsed() { echo $(( $(date +%s) - START )); }
stage() { echo "== [$(elapsed) s] $*"; }
# limit WANTED: seconds a stage may take, cut to what is left before the deadline (less 15 s for the summary).
limit() { local left=$(( DEADLINE - 15 - $(elapsed) )); (( left < $1 )) && echo $(( left > 0 ? left : 0 )) || echo "$1"; }
# run_limited SECONDS CMD...: SIGINT first (pytest then still writes its report), SIGKILL 10 s later.
run_limited() { local t=$1; shift; (( t < 10 )) && { echo "skipped: no time left"; return 124; }; timeout -s INT -k 10 "$t" "$@"; }

exec > >(tee -a "$OUT/run.log") 2>&1

# 1. Carried wheels into a private site folder (never the image's own environment).
stage "installing carried wheels"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ff_site .whl/*.whl \
    || { echo "wheel install failed"; exit 2; }
  export PYTHONPATH=/tmp/ff_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PYTHONPATH
date -u +%FT%TZ
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
nvcc --version 2>&1 | tail -2
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "cores $(nproc); git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# 2. Build the extension in place with every core (torch's BuildExtension runs ninja with MAX_JOBS jobs).
# The image sets CC/CXX to /opt/gcc/bin/* wrappers that link libstdc++ statically into shared objects (ldd of
# the _C built with them lists no libstdc++): the extension then carries its own copy of the iostream/locale
# code, and the first TORCH_CHECK that formats a number segfaults in it (seen 2026-11-28, cuda-gdb backtrace in
# std::ostream::_M_insert<long> inside _C.so). The distribution's gcc/g++ (same 13.3) link it dynamically.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
export FLAMINGO_FAST_CUDA=1  # the kernels, always (setup.py would also pick them with a GPU visible)
stage "building flamingo_fast._C with ${CXX:-c++} (limit $(limit 260) s)"
BUILD_START=$(date +%s)
MAX_JOBS=$(nproc) run_limited "$(limit 260)" "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1
BUILD_RC=$?
BUILD_SECONDS=$(( $(date +%s) - BUILD_START ))
echo "build exit $BUILD_RC after ${BUILD_SECONDS} s"
tail -5 "$OUT/build.log"
if [ "$BUILD_RC" -eq 0 ] && ! ldd flamingo_fast/_C*.so | grep -q "libstdc++"; then
  echo "WARNING: flamingo_fast/_C does not link libstdc++ dynamically; C++ error paths may crash (see above)"
fi

# 3. One small fwd + bwd per kernel kind, each in its own process with a short limit.
SMOKE_FAILED=""
if [ "$BUILD_RC" -eq 0 ] && want smoke; then
  stage "kernel smoke tests"
  for kind in causal full media perceiver perceiver_kv_input; do
    run_limited "$(limit 40)" "$PY" -m bench.device_smoke "$kind" 2>&1 | tail -4
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "smoke $kind: exit $rc"; SMOKE_FAILED="$SMOKE_FAILED $kind"; }
  done
fi

# 4. GPU tests: every test marked gpu (kernels vs float64, opcheck, determinism, model GPU tests), kernels first.
TEST_RC=125
if [ "$BUILD_RC" -eq 0 ] && want tests; then
  TEST_LIMIT=$(limit 170)
  stage "pytest -m gpu (limit $TEST_LIMIT s)"
  TIMEOUT_ARGS=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout=60 --timeout-method=thread)
  run_limited "$TEST_LIMIT" "$PY" -m pytest tests/test_kernels_gpu.py tests -m gpu -v --no-header -p no:cacheprovider \
    --continue-on-collection-errors --durations=15 "${TIMEOUT_ARGS[@]}" --junitxml="$SCRATCH/pytest.xml" \
    > "$OUT/pytest.log" 2>&1
  TEST_RC=$?
  tail -25 "$OUT/pytest.log"
fi

# 5. Benchmarks (the bench CLI checks each implementation against float64 before timing it). Non-compiled
# peers over the whole GPU case set first; then the training-step matrix (3b-shape x M3W-like and long, every
# variant, regional compile); then FlexAttention as long as time allows.
BENCH_RC=125
if [ "$BUILD_RC" -eq 0 ] && want kernels; then
  stage "bench: kernels vs SDPA flash/cuDNN, torch, dense (limit $(limit 130) s)"
  run_limited "$(limit 130)" "$PY" -m bench --device cuda --ops attention media_cross_attention perceiver_attention \
    --impls cuda sdpa_flash sdpa_cudnn torch openflamingo_dense --json "$SCRATCH/bench_kernels.json" \
    > "$OUT/bench.log" 2>&1
  BENCH_RC=$?
  tail -40 "$OUT/bench.log"
fi
STEPS_RC=125
if [ "$BUILD_RC" -eq 0 ] && want steps; then
  stage "bench: training-step matrix (limit $(limit "${STEPS_LIMIT:-180}") s)"
  run_limited "$(limit "${STEPS_LIMIT:-180}")" "$PY" -m bench --device cuda --ops train_step --models 3b-shape --shapes long m3w \
    --variants openflamingo torch compile compile+cuda compile+cuda+fp8 --json "$SCRATCH/bench_e2e.json" >> "$OUT/bench.log" 2>&1
  STEPS_RC=$?
  tail -30 "$OUT/bench.log"
fi
if [ "$BUILD_RC" -eq 0 ] && want fp8; then
  stage "fp8 numerics: 200 steps bf16 vs float8 frozen LM, loss within 1% (limit $(limit 90) s)"
  run_limited "$(limit 90)" "$PY" -m bench.fp8_numerics --steps 200 --out "$SCRATCH/fp8" >> "$OUT/extras.log" 2>&1
  echo "fp8 numerics exit $?"
  tail -3 "$OUT/extras.log"
  cp "$SCRATCH/fp8/fp8_numerics.json" "$OUT/" 2>/dev/null
fi
if [ "$BUILD_RC" -eq 0 ] && want flex; then
  stage "bench: FlexAttention (limit $(limit 60) s)"
  run_limited "$(limit 60)" "$PY" -m bench --device cuda --ops attention media_cross_attention perceiver_attention \
    --impls flex cuda --json "$SCRATCH/bench_flex.json" >> "$OUT/bench.log" 2>&1
  tail -12 "$OUT/bench.log"
fi

if [ "$BUILD_RC" -eq 0 ] && want packing; then
  # Packed self-attention runs on the torch backend until the Hopper engine has a document mask (issue 18).
  stage "bench: packing, useful tokens/s packed vs padded (limit $(limit 90) s)"
  run_limited "$(limit 90)" "$PY" -m bench --device cuda --ops packing --json "$SCRATCH/bench_packing.json" \
    >> "$OUT/bench.log" 2>&1
  tail -8 "$OUT/bench.log"
fi

if [ "$BUILD_RC" -eq 0 ] && want mllama; then
  # Llama 3.2 Vision's cross-attention shapes: span attention (torch backend until the Hopper kernel takes image
  # ranges, issue 20) against transformers' dense-mask SDPA and FlexAttention, forward and forward+backward.
  stage "bench: Mllama cross-attention (limit $(limit 60) s)"
  run_limited "$(limit 60)" "$PY" -m bench --device cuda --ops mllama --json "$SCRATCH/bench_mllama.json" \
    >> "$OUT/bench.log" 2>&1
  tail -14 "$OUT/bench.log"
fi

# 6. The demo's GPU path (FSDP + bf16 + fused kernels picked automatically), seconds-long.
if [ "$BUILD_RC" -eq 0 ] && want demo; then
  stage "demo --quick on the GPU (limit $(limit 60) s)"
  run_limited "$(limit 60)" "$PY" -m train.demo --quick --out "$SCRATCH/demo" >> "$OUT/extras.log" 2>&1
  echo "demo exit $?"
  tail -8 "$OUT/extras.log"
fi

# 5. Summary JSON and the short table (printed last).
stage "summary"
BUILD_RC=$BUILD_RC BUILD_SECONDS=$BUILD_SECONDS TEST_RC=$TEST_RC BENCH_RC=$BENCH_RC STEPS_RC=$STEPS_RC TOTAL_SECONDS=$(elapsed) \
SMOKE_FAILED="$SMOKE_FAILED" OUT_DIR="$OUT" SCRATCH="$SCRATCH" "$PY" - <<'EOF'
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

out, scratch = Path(os.environ["OUT_DIR"]), Path(os.environ["SCRATCH"])
summary = {key.lower(): int(os.environ[key]) for key in ("BUILD_RC", "BUILD_SECONDS", "TEST_RC", "BENCH_RC",
                                                          "STEPS_RC", "TOTAL_SECONDS")}
summary["smoke_failed"] = os.environ["SMOKE_FAILED"].split()
tests = {}
if (scratch / "pytest.xml").exists():
    suite = ET.parse(scratch / "pytest.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["failed"] = [case.get("classname", "") + "::" + case.get("name", "") for case in suite.iter("testcase")
                       if case.find("failure") is not None or case.find("error") is not None][:20]
summary["tests"] = tests

# One bench.json from the bench runs (the Flex run's own cuda rows repeat the first run's: dropped).
rows = []
for name in ("bench_kernels.json", "bench_e2e.json", "bench_flex.json", "bench_packing.json", "bench_mllama.json"):
    try:
        part = json.loads((scratch / name).read_text())
    except (OSError, ValueError):
        continue
    rows += [r for r in part if not (name == "bench_flex.json" and r.get("impl") == "cuda")]
(out / "bench.json").write_text(json.dumps(rows, indent=1))
table = []
for row in rows:
    if row.get("impl") != "cuda":
        continue
    peers = [r for r in rows if (r.get("op"), r.get("case"), r.get("direction")) ==
             (row.get("op"), row.get("case"), row.get("direction")) and r.get("impl") not in ("cuda", "reference")
             and r.get("status") == "ok" and r.get("ms")]
    best = min(peers, key=lambda r: r["ms"]) if peers else None
    table.append({"op": row.get("op"), "case": row.get("case"), "direction": row.get("direction"),
                  "status": row.get("status"), "note": row.get("note", ""), "cuda_ms": row.get("ms"),
                  "cuda_tflops": row.get("tflops"), "rel_err": row.get("rel_err"),
                  "best_other": best and best["impl"], "best_other_ms": best and best["ms"]})
summary["cuda_rows"] = table
steps = [{k: r.get(k) for k in ("case", "impl", "status", "note", "ms", "tokens_per_s", "mfu", "peak_mem_mb",
                                 "compile_s", "rel_err")} for r in rows if r.get("op") == "train_step"]
summary["train_step_rows"] = steps
(out / "summary.json").write_text(json.dumps(summary, indent=2))

print(f"build rc={summary['build_rc']} ({summary['build_seconds']} s)  tests rc={summary['test_rc']} {tests}  "
      f"bench rc={summary['bench_rc']}  total {summary['total_seconds']} s")
print(f"smoke failures: {summary['smoke_failed'] or 'none'}")
if table:
    print(f"{'op':<22}{'case':<30}{'dir':<8}{'status':<8}{'cuda ms':>9}{'TFLOP/s':>9}{'rel err':>10}  "
          f"{'best other':<16}{'ms':>9}{'speedup':>8}")
    for t in table:
        ms = f"{t['cuda_ms']:.3f}" if t["cuda_ms"] else "-"
        tf = f"{t['cuda_tflops']:.1f}" if t["cuda_tflops"] is not None else "-"
        err = f"{t['rel_err']:.1e}" if t["rel_err"] is not None else "-"
        other_ms = f"{t['best_other_ms']:.3f}" if t["best_other_ms"] else "-"
        speedup = f"{t['best_other_ms'] / t['cuda_ms']:.2f}x" if t["best_other_ms"] and t["cuda_ms"] else "-"
        print(f"{str(t['op'])[:21]:<22}{str(t['case'])[:29]:<30}{str(t['direction']):<8}{str(t['status']):<8}{ms:>9}"
              f"{tf:>9}{err:>10}  {str(t['best_other']):<16}{other_ms:>9}{speedup:>8}")
        if t["status"] != "ok":
            print(f"    {t['note'][:200]}")
if steps:
    print(f"{'train_step case':<34}{'impl':<18}{'status':<12}{'ms':>9}{'tokens/s':>10}{'MFU':>7}{'peak MiB':>10}"
          f"{'compile s':>10}")
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for t in steps:
        print(f"{str(t['case'])[:33]:<34}{t['impl']:<18}{str(t['status']):<12}{fmt(t['ms'], '.1f'):>9}"
              f"{fmt(t['tokens_per_s'], '.0f'):>10}{fmt(t['mfu'] and 100 * t['mfu'], '.1f'):>7}"
              f"{fmt(t['peak_mem_mb'], '.0f'):>10}{fmt(t['compile_s'], '.1f'):>10}")
        if t["status"] != "ok" and t["note"]:
            print(f"    {t['note'][:200]}")
EOF
# Exit 0 only if the build and every stage that ran passed (a stage left out by STAGES keeps its 125).
[ "$BUILD_RC" -eq 0 ] && [[ "$TEST_RC" =~ ^(0|125)$ ]] && [[ "$BENCH_RC" =~ ^(0|125)$ ]] && [[ "$STEPS_RC" =~ ^(0|125)$ ]]
