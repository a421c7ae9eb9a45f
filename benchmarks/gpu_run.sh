#!/usr/bin/env bash
# Issue 15's GPU checks in one prepared run (the device machine is lent for minutes, not hours):
#   1. pytest -m gpu tests/gpu: pinned staging, async saves never torn, CUDA RNG, exact resume of
#      a CUDA loop (fused and foreach AdamW), the NCCL examples killed and resumed (DDP, FSDP2);
#   2. bench_async.py --device cuda: stall vs the pinned D2H floor, total vs write+fsync, restore
#      to the GPU vs safetensors / torch.load / DCP, all in the same run; the state is sized from
#      the disk's measured speed and free space so the whole script ends inside one call;
#   3. bench_training_loop.py --device cuda: throughput loss with a save every 50 steps.
# Every result lands in $OUT (logs, docs/benchmarks.md with the new sections, the JSON lines).
#
#   OUT=/tmp/out bash benchmarks/gpu_run.sh [pytest] [async] [restore] [loop]   # GPU machine, repo root
#   SG_GPU_DRY=1 OUT=/tmp/out bash benchmarks/gpu_run.sh    # here: the same steps, tiny, on CPU
set -u
OUT=${OUT:-/tmp/sg-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then  # packages the GPU image lacks (torchdata, crc32c)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/sg-site .whl/*.whl && export PYTHONPATH=/tmp/sg-site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
DEVICE=cuda NODOC=
[ -n "${SG_GPU_DRY:-}" ] && DEVICE=cpu NODOC=--no-doc

{
    date -u
    nvidia-smi 2>&1 | head -20
    $PY -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    $PY -c "import torch.distributed as d; print('nccl', d.is_nccl_available())"
    nproc; free -g; df -h /tmp; ls -ld /dev/shm && df -h /dev/shm
} >"$OUT/env.txt" 2>&1
$PY -c "import savegame, torchdata, google_crc32c, safetensors, xxhash, rich; print('imports ok')" \
    >>"$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; exit 3; }

# The disk: 2 GiB written and fsynced (sizes the benchmark state).
$PY - >"$OUT/disk.txt" 2>&1 <<'EOF'
import os, shutil, time
buf = b"\1" * (64 << 20)
t0 = time.perf_counter()
with open("/tmp/sg-dd", "wb", buffering=0) as f:
    for _ in range(32):
        f.write(buf)
    os.fsync(f.fileno())
s = time.perf_counter() - t0
os.unlink("/tmp/sg-dd")
free = shutil.disk_usage("/tmp").free / 1e9
print(f"write+fsync {2 * 1.073741824 / s:.2f} GB/s; free {free:.1f} GB")
EOF
cat "$OUT/disk.txt"
GB=$($PY -c "
import re, sys
t = open('$OUT/disk.txt').read()
speed, free = map(float, re.findall(r'([\d.]+) GB', t)[:2])
print(0.05 if '${SG_GPU_DRY:-}' else round(max(0.5, min(4.0, 6 * speed, free / 12)), 1))")
GB=${SG_GPU_GB:-$GB}
echo "benchmark state: $GB GB" | tee -a "$OUT/env.txt"

SECTIONS=${*:-pytest async loop}
for section in $SECTIONS; do
case $section in
pytest)
    echo "== pytest -m gpu ($(date -u +%T))"
    timeout ${SG_GPU_PYTEST_TIMEOUT:-230} $PY -m pytest -m gpu tests/gpu/test_gpu_staging.py tests/gpu/test_gpu_restore.py \
        tests/gpu/test_gpu_exact_resume.py tests/gpu/test_gpu_nccl.py -q -p no:cacheprovider \
        -o addopts="" -rA -W default ${SG_GPU_PYTEST_K:+-k "$SG_GPU_PYTEST_K"} \
        >"$OUT/pytest_gpu.txt" 2>&1
    echo "pytest rc $?" | tee -a "$OUT/pytest_gpu.txt"
    tail -25 "$OUT/pytest_gpu.txt" ;;
async)
    echo "== bench_async --device $DEVICE --gb $GB ($(date -u +%T))"
    rm -rf /tmp/sg-bench-*
    (cd benchmarks && timeout 210 $PY bench_async.py --device $DEVICE --gb "$GB" --repeats 2 $NODOC) \
        >"$OUT/bench_async.txt" 2>&1
    echo "bench_async rc $?" | tee -a "$OUT/bench_async.txt"
    tail -40 "$OUT/bench_async.txt" ;;
restore)  # the sync saves and the restores only, with the reader's phase timings
    echo "== restores --device $DEVICE --gb $GB ($(date -u +%T))"
    rm -rf /tmp/sg-bench-*
    (cd benchmarks && timeout ${SG_GPU_RESTORE_TIMEOUT:-150} $PY bench_async.py --device $DEVICE --gb "$GB" --repeats 3 \
        --only "torch_save|st_save|dcp_save|sg_save|restore") >"$OUT/bench_restore.txt" 2>&1
    echo "restore rc $?" | tee -a "$OUT/bench_restore.txt"
    tail -30 "$OUT/bench_restore.txt" ;;
loop)
    echo "== bench_training_loop --device $DEVICE ($(date -u +%T))"
    rm -rf /tmp/sg-bench-*
    LOOP="--layers 24 --d-model 1024 --batch 8 --seq 512 --repeats ${SG_GPU_LOOP_REPEATS:-3}"
    [ -n "${SG_GPU_DRY:-}" ] && LOOP="--layers 1 --d-model 64 --batch 1 --seq 16 --every 4 --repeats 2"
    (cd benchmarks && timeout ${SG_GPU_LOOP_TIMEOUT:-120} $PY bench_training_loop.py --device $DEVICE \
        --threads 0 $LOOP $NODOC) >"$OUT/bench_loop.txt" 2>&1
    echo "bench_loop rc $?" | tee -a "$OUT/bench_loop.txt"
    tail -15 "$OUT/bench_loop.txt" ;;
esac
done
rm -rf /tmp/sg-bench-*
cp docs/benchmarks.md "$OUT/benchmarks.md"
cat bench-out/async.jsonl bench-out/training_loop.jsonl >"$OUT/bench.jsonl" 2>/dev/null
echo "== done ($(date -u +%T))"
