#!/usr/bin/env bash
# The one prepared check for a lent H200 (see /work/.library/device/README.md): build flamingo_fast._C there,
# run the GPU tests, time the kernels, and bring back logs plus one JSON summary. Finishes in under 8 minutes
# (each stage has its own time limit); the short table it prints last is the part to read first.
#
# Run from the repository root on the device machine, carrying the wheels folder:
#   device tool: run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
# Wheels needed in .whl/ (the device has no network; everything else is in its image, see KINDS.md):
#   nvidia_cutlass-4.2.0.0-py3-none-any.whl   (CUTLASS/CuTe headers for the build; imported --no-deps)
#   torchdata-0.11.0-py3-none-any.whl         (flamingo_fast.data imports it; test collection needs it)
# Files written under $OUT (at most 8 come back): env.txt build.log pytest.log pytest.xml bench.log bench.json
# summary.json.
set -uo pipefail

OUT=${OUT:-/tmp/flamingo_fast_device_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
BUILD_LIMIT=${BUILD_LIMIT:-240}
TEST_LIMIT=${TEST_LIMIT:-150}
BENCH_LIMIT=${BENCH_LIMIT:-75}
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }
stage() { echo "== [$(elapsed) s] $*"; }

# 1. Carried wheels into a private site folder (never the image's own environment).
stage "installing carried wheels"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ff_site .whl/*.whl \
    || { echo "wheel install failed"; exit 2; }
  export PYTHONPATH=/tmp/ff_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PYTHONPATH

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  nvcc --version 2>&1 | tail -2
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 2. Build the extension in place with every core (torch's BuildExtension runs ninja with MAX_JOBS jobs).
stage "building flamingo_fast._C (limit ${BUILD_LIMIT} s)"
BUILD_START=$(date +%s)
MAX_JOBS=$(nproc) timeout "$BUILD_LIMIT" "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1
BUILD_RC=$?
BUILD_SECONDS=$(( $(date +%s) - BUILD_START ))
echo "build exit $BUILD_RC after ${BUILD_SECONDS} s"
tail -5 "$OUT/build.log"

# 3. GPU tests: every test marked gpu (kernels vs float64, opcheck, determinism, model GPU tests).
TEST_RC=125
if [ "$BUILD_RC" -eq 0 ]; then
  stage "pytest -m gpu (limit ${TEST_LIMIT} s)"
  # The kernel tests first (smallest shapes first inside the file), then every other gpu-marked test.
  timeout "$TEST_LIMIT" "$PY" -m pytest tests/test_kernels_gpu.py tests -m gpu -q --no-header -p no:cacheprovider \
    --junitxml="$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1
  TEST_RC=$?
  tail -15 "$OUT/pytest.log"
fi

# 4. Kernel benchmarks (the bench CLI checks each implementation against float64 before timing it).
BENCH_RC=125
if [ "$BUILD_RC" -eq 0 ]; then
  stage "python -m bench --device cuda (limit ${BENCH_LIMIT} s)"
  # BENCH_ARGS (e.g. "--quick" or "--ops attention") narrows the run when time is short.
  timeout "$BENCH_LIMIT" "$PY" -m bench --device cuda --json "$OUT/bench.json" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  BENCH_RC=$?
  tail -5 "$OUT/bench.log"
fi

# 5. Summary JSON and the short table (printed last).
stage "summary"
BUILD_RC=$BUILD_RC BUILD_SECONDS=$BUILD_SECONDS TEST_RC=$TEST_RC BENCH_RC=$BENCH_RC TOTAL_SECONDS=$(elapsed) \
OUT_DIR="$OUT" "$PY" - <<'EOF'
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(os.environ["OUT_DIR"])
summary = {key.lower(): int(os.environ[key]) for key in ("BUILD_RC", "BUILD_SECONDS", "TEST_RC", "BENCH_RC",
                                                          "TOTAL_SECONDS")}
tests = {}
if (out / "pytest.xml").exists():
    suite = ET.parse(out / "pytest.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["failed"] = [case.get("classname", "") + "::" + case.get("name", "") for case in suite.iter("testcase")
                       if case.find("failure") is not None or case.find("error") is not None][:20]
summary["tests"] = tests

rows = []
if (out / "bench.json").exists():
    try:
        rows = json.loads((out / "bench.json").read_text())
    except ValueError:
        rows = []
table = []
for row in rows:
    if row.get("impl") != "cuda" or not row.get("available", True) or row.get("ms") is None:
        continue
    peers = [r for r in rows if (r.get("op"), r.get("case"), r.get("direction")) ==
             (row.get("op"), row.get("case"), row.get("direction")) and r.get("impl") != "cuda"
             and r.get("available", True) and r.get("ms")]
    best = min(peers, key=lambda r: r["ms"]) if peers else None
    table.append({"op": row.get("op"), "case": row.get("case"), "direction": row.get("direction"),
                  "cuda_ms": row["ms"], "cuda_tflops": row.get("tflops"), "rel_err": row.get("rel_err"),
                  "best_other": best and best["impl"], "best_other_ms": best and best["ms"]})
summary["cuda_rows"] = table
(out / "summary.json").write_text(json.dumps(summary, indent=2))

print(f"build rc={summary['build_rc']} ({summary['build_seconds']} s)  tests rc={summary['test_rc']} {tests}  "
      f"bench rc={summary['bench_rc']}  total {summary['total_seconds']} s")
if table:
    print(f"{'op':<24}{'case':<28}{'dir':<5}{'cuda ms':>9}{'TFLOP/s':>9}{'rel err':>10}  {'best other':<16}{'ms':>9}")
    for t in table:
        tf = f"{t['cuda_tflops']:.1f}" if t["cuda_tflops"] is not None else "-"
        err = f"{t['rel_err']:.1e}" if t["rel_err"] is not None else "-"
        other_ms = f"{t['best_other_ms']:.3f}" if t["best_other_ms"] else "-"
        print(f"{str(t['op']):<24}{str(t['case'])[:27]:<28}{str(t['direction']):<5}{t['cuda_ms']:>9.3f}{tf:>9}"
              f"{err:>10}  {str(t['best_other']):<16}{other_ms:>9}")
EOF
[ "$BUILD_RC" -eq 0 ] && [ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
