#!/usr/bin/env bash
# One-shot GPU check (issue 20): every GPU-only check of the project in one prepared run, Ray-free
# (Ray does not fit on the GPU benchmark machine: ../shared/PITFALLS.md). Budget: <= 8 minutes on one
# H100/H200. Writes $OUT/gpu_check.json (everything) and $OUT/gpu_check.md (tables for BENCHMARKS.md).
#
#   OUT=/tmp/gpu bash bench/gpu_check.sh                     # on the device machine, from the repo root
#
# Parts, each with its own time limit so one slow part cannot eat the others':
#   1. the CUDA branches of the test suite: pytest -m gpu (collected on CPU too, skipped there)   ~1 min
#   2. bench/bench_gpu.py --quick: engine vs paper loop grid (fp32/tf32/bf16, compile, device
#      cache) and the deterministic repeat                                                        ~3 min
#   3. bench/bench_population.py --only steps --device cuda: fused population step rate,
#      K = 1, 7, 35, fp32 / bf16, as a fraction of the bare matmul chain in the same dtype        ~2 min
# Needs: torch with CUDA, numpy, pydantic (cp312 wheels sent along, see PITFALLS.md), PYTHONPATH=repo.
set -u
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} AEM_SHARED_DIR=${AEM_SHARED_DIR:-$PWD/shared}
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
status=0
part() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$OUT/parts.jsonl"
  [ $rc -eq 0 ] || status=1
  echo "$name: rc=$rc, $((SECONDS - t0)) s"
}
: > "$OUT/parts.jsonl"
part pytest-gpu 90 $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/engine/test_gpu.py
part bench-gpu 200 $PY bench/bench_gpu.py --quick --skip e2e --out "$OUT/bench_gpu.json"
part population-steps 150 $PY bench/bench_population.py --only steps --device cuda --wsi-steps 20 --json "$OUT/population_steps.json"
$PY - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
parts = [json.loads(line) for line in (out / "parts.jsonl").read_text().splitlines() if line.strip()]
record = {"parts": parts, "nvidia_smi": (out / "nvidia-smi.csv").read_text() if (out / "nvidia-smi.csv").exists() else None}
for name in ("bench_gpu", "population_steps"):
    p = out / f"{name}.json"
    record[name] = json.loads(p.read_text()) if p.exists() else None
(out / "gpu_check.json").write_text(json.dumps(record, indent=2))
lines = ["| part | rc | s |", "|---|---|---|"] + [f"| {p['part']} | {p['rc']} | {p['seconds']} |" for p in parts]
steps = (record["population_steps"] or {}).get("steps", [])
if steps:
    lines += ["", "| dataset | precision | K | step (ms) | member-steps/s | GFLOP/s | of bare (same dtype) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['precision']} | {r['K']} | {r['step_ms']:.2f} | {r['member_steps_per_s']:.0f} | {r['gflops']:.1f} | {r['of_bare']:.0%} |" for r in steps]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
exit $status
