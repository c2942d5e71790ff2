#!/usr/bin/env bash
# One GPU-machine session: install the carried wheel, run the GPU tests, the sanitizers on a
# subset, and the benchmark. Usage: bash benchmarks/device_run.sh WHEEL_DIR OUT_DIR [--quick]
set -u
wheels="$1"; out="$2"; shift 2
repo="$(pwd)"
site=/tmp/spqt-site
python3 -m pip install -q --no-index --no-deps --target "$site" "$wheels"/spqt_mlx-*cp312*.whl || exit 1
export PYTHONPATH="$site:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cd /tmp || exit 1
python3 -c "import mlx.core as mx, spqt_mlx; print('mlx', mx.__version__, 'cuda', mx.cuda.is_available())"
python3 -m pytest "$repo/tests/test_cuda.py" -q -p no:cacheprovider 2>&1 | tee "$out/test_cuda.log" | tail -15
for tool in memcheck racecheck synccheck; do
  timeout 300 compute-sanitizer --tool $tool --target-processes all python3 -m pytest "$repo/tests/test_cuda.py" -q \
    -p no:cacheprovider -k "test_unsorted or test_deterministic or (every_format and 4-64) or (tensor_core and 8192x4096 and float16) or (bulk_copy_path and 8192x4096 and float16 and 64)" 2>&1 \
    | tee "$out/sanitizer_$tool.log" | grep -E "ERROR SUMMARY|passed|failed" | tail -3
done
if command -v ncu >/dev/null; then
  timeout 120 ncu --clock-control none -k regex:"spqt|qmv" --csv --metrics gpu__time_duration.sum \
    python3 "$repo/benchmarks/kernel_times.py" > "$out/ncu.csv" 2>&1
  python3 - "$out/ncu.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
hdr = rows[0]; t = collections.defaultdict(list)
for r in rows[1:]:
    d = dict(zip(hdr, r)); t[(d["Kernel Name"][:45], d.get("Grid Size", ""))].append(float(d["Metric Value"].replace(",", "")))
for k, v in t.items(): print(f"{k[0]:45s} {k[1]:>14s} n={len(v):3d} median_ns={sorted(v)[len(v)//2]:.0f}")
PY
fi
echo "== default kernels"
python3 "$repo/benchmarks/gemv_cuda.py" --json "$out/gemv.json" --plot "$out/gemv.png" "$@" 2>&1 | tee "$out/bench.log" | tail -75
