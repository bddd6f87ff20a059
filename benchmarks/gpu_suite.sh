#!/usr/bin/env bash
# The GPU benchmark suite: one command, one GPU, meant to finish in under 8 minutes on an H100 or
# H200 (not yet timed on one). A training step of AltCLIP ViT-L/14 and of align-base
# (benchmarks/train_step.py), altjax bf16 with the layers unrolled and scanned against PyTorch
# eager under autocast bf16 and torch.compile bf16: throughput, MFU against the GPU's dense bf16
# peak, compile times and peak memory, written as JSON files, logs and a plot (benchmarks/plot.py)
# into OUT_DIR.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]                         # default: benchmarks/results_gpu
#   ALTJAX_SUITE_CPU=1 bash benchmarks/gpu_suite.sh /tmp/suite     # the same commands, tiny, on CPU
#
# The environment it expects, on a CUDA 12 machine:
#
#   pip install -e . "jax[cuda12]" torch==2.13.0 transformers==5.23.0
#
# (jax[cuda12] brings CUDA, cuDNN and NCCL as wheels; torch's default Linux wheel is a CUDA build.)
#
# Settings, from the environment: L14_BATCH (default 128), ALIGN_BATCH (64), REPEATS (10), WARMUP
# (2), VARIANTS (train_step.py's --variants, default jax-bf16,jax-bf16-scan,torch-bf16,
# torch-compile-bf16), PEAK_TFLOPS (default from the GPU's name: H100 / H200 SXM 989, H100 / H200
# NVL 835, H100 PCIe 756, A100 312; other GPUs need it set). The variants run one after another
# (--sequential), each alone on the GPU, so that four full-size training states never have to fit
# at once. ALTJAX_SUITE_CPU=1 runs the same commands on the CPU with tiny models (altclip-tiny, the
# demo ALIGN) at batch 2 and a nominal peak of 1 TFLOP/s, to check the suite end to end without a
# GPU (about 5 minutes on 2 cores).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m -- "${1:-$root/benchmarks/results_gpu}")"
cd "$root"
variants="${VARIANTS:-jax-bf16,jax-bf16-scan,torch-bf16,torch-compile-bf16}"
cpu_mode="${ALTJAX_SUITE_CPU:-0}"

fail() {
    echo "gpu_suite.sh: $*" >&2
    exit 1
}

if [[ "$cpu_mode" == 1 ]]; then
    export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
    models=(altclip-tiny demo)
    batches=(2 2)
    repeats=2 warmup=1 peak="${PEAK_TFLOPS:-1}"
    device="CPU (ALTJAX_SUITE_CPU=1)"
else
    # One GPU: the first visible one, unless CUDA_VISIBLE_DEVICES names another.
    export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
    gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader -i "${CUDA_VISIBLE_DEVICES%%,*}" 2>/dev/null)" || gpu=""
    [[ -n "$gpu" ]] || fail "no NVIDIA GPU found (nvidia-smi lists none); run it on a GPU machine, or with ALTJAX_SUITE_CPU=1 for the tiny CPU check"
    case "$gpu" in
        *H100*PCIe*) default_peak=756 ;;
        *H100*NVL* | *H200*NVL*) default_peak=835 ;;
        *H100* | *H200*) default_peak=989 ;;
        *A100*) default_peak=312 ;;
        *) default_peak="" ;;
    esac
    peak="${PEAK_TFLOPS:-$default_peak}"
    [[ -n "$peak" ]] || fail "no known dense bf16 peak for '$gpu'; set PEAK_TFLOPS (TFLOP/s) for the MFU column"
    # Both frameworks must be on the GPU: a JAX without its CUDA wheel would run the altjax side on the CPU.
    python - <<'EOF' || exit 1
import sys

try:
    import jax
    import torch
except ImportError as e:
    sys.exit(f"gpu_suite.sh: {e}; see the pip line at the top of benchmarks/gpu_suite.sh")
if jax.default_backend() != "gpu":
    sys.exit(f'gpu_suite.sh: JAX runs on {jax.default_backend()}, not the GPU; pip install "jax[cuda12]"')
if not torch.cuda.is_available():
    sys.exit(f"gpu_suite.sh: PyTorch {torch.__version__} sees no GPU; install a CUDA build of torch")
EOF
    models=(altclip-l14 align-base)
    batches=("${L14_BATCH:-128}" "${ALIGN_BATCH:-64}")
    repeats="${REPEATS:-10}" warmup="${WARMUP:-2}"
    device="$gpu, dense bf16 peak $peak TFLOP/s"
fi

mkdir -p "$out"
echo "gpu_suite.sh: $device; variants $variants; results in $out"
if [[ "$cpu_mode" != 1 ]]; then
    nvidia-smi > "$out/nvidia-smi.txt"
fi
jsons=()
for i in "${!models[@]}"; do
    model="${models[$i]}"
    start=$SECONDS
    python benchmarks/train_step.py --model "$model" --batch-size "${batches[$i]}" --repeats "$repeats" \
        --warmup "$warmup" --variants "$variants" --peak-tflops "$peak" --sequential \
        --json "$out/train_$model.json" | tee "$out/train_$model.txt"
    echo "gpu_suite.sh: $model took $((SECONDS - start)) s"
    jsons+=("$out/train_$model.json")
done
python benchmarks/plot.py "${jsons[@]}" --out "$out/performance.png"
echo "gpu_suite.sh: done in $SECONDS s; JSON, logs and performance.png in $out"
