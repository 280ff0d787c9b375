#!/usr/bin/env bash
# The GPU machine's side of issue 16's measurements: compile fdec's GPU builds of SmolLM2, then
# run benchmarks/gpu.py (fdec builds, PyTorch static-cache generate, onnxruntime-genai's CUDA
# builds, placement checks) and leave everything under $OUT.
#
# A session with a GPU machine (../shared/gpu/README.md has the why of each step):
#   here, once (~4 min of CPU; the fdec wheel it packs is built from THIS checkout):
#       bash ../shared/gpu/stage.sh
#   then `run` tool calls, each within 30 s of the last (the machine goes back after 30 s idle):
#     1. for N in 0 1 2 3 4 5 (as many as .gpu/parts holds):
#          command  mkdir -p /tmp/og && cp .gpu/parts/pN /tmp/og/      carry [".gpu/parts/pN"]
#     2. command  . .gpu/remote.sh && bash benchmarks/gpu_session.sh compile
#          carry [".gpu/remote.sh", ".gpu/placement.py", ".gpu/torch_baseline.py"], timeout_s 590
#     3. command  . .gpu/remote.sh && bash benchmarks/gpu_session.sh measure
#          same carry, timeout_s 590; then give the machine back.
#   `all` does 2 and 3 in one command where the device time allows one long command.
# Device time is 15 minutes a session, start (~4 min) included; this script needs ~8: compile
# ~4 min (export, fusion, fp16 typing and verification on the machine's CPU; the second build
# reuses the export), measure ~4 min (torch.compile once per batch size, two genai builds,
# two fdec builds with and without CUDA graphs). Outputs: $OUT/compile-NAME.json,
# $OUT/gpu.json, $OUT/gpu.txt (the table and issue 16's figures, met or not),
# $OUT/bench-fp16.json (`fdec bench` on the GPU), $OUT/log.txt.
#
# Builds: FDEC_GPU_BUILDS="NAME=fdec compile options;..." (default below): fp16 is the ONNX
# Runtime CUDA build (`--backend onnxruntime` on a GPU target: the onnxruntime-cuda backend's
# fused fp16 graph, its default), int4 the same with MatMulNBits int4 weights by AWQ (the int4
# recipe fdec ships: on the CPU its CUDA graph's held perplexity is 54.27 against the source's
# 54.05, RTN's 67.98), int8 the same with MatMulNBits 8-bit weights (int8-wo: the CUDA model's
# int8). gpu.py's figures look for these names. Measured against PyTorch static-cache generate (bf16) and
# onnxruntime-genai's CUDA fp16/int4 builds, batch 1 and 16, 64 new tokens; placement profiled
# (CPU and Memcpy nodes) and 32 greedy tokens against the CPU provider per build.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
BUILDS=${BUILDS:-/tmp/b}
GGUF=${GGUF:-/tmp/smol.gguf}
TARGET=${TARGET:-h200}
SPEC=${FDEC_GPU_BUILDS:-"fp16=--backend onnxruntime;int4=--backend onnxruntime --quantize int4-awq;int8=--backend onnxruntime --quantize int8"}
FDEC=${FDEC:-/tmp/fdec}
PEERS=${PEERS:-"fp16 int4"}   # onnxruntime-genai builds to make and measure
# more benchmarks/gpu.py options (later ones win): PyTorch static only (eager is measured in
# ../shared/gpu/README.md already), each fdec build again with CUDA graphs, and the int4 build
# again through ONNX Runtime's CUTLASS fpA_intB kernels (off by default in ONNX Runtime)
GPU_PY_ARGS=${GPU_PY_ARGS:-"--torch static --cuda-graph --fpa-intb"}
mkdir -p "$OUT" "$BUILDS"
exec > >(tee -a "$OUT/log.txt") 2>&1
here=$(cd "$(dirname "$0")" && pwd)

compile() {
    IFS=';' read -ra items <<< "$SPEC"
    for item in "${items[@]}"; do
        name=${item%%=*}; options=${item#*=}
        [ -f "$BUILDS/$name/report.json" ] && { echo "== $name: built already"; continue; }
        echo "== compile $name: $FDEC compile $GGUF --target $TARGET $options"
        # shellcheck disable=SC2086 # options are words
        timeout 400 "$FDEC" compile "$GGUF" --target "$TARGET" $options -o "$BUILDS/$name" \
            --json > "$OUT/compile-$name.json" || echo "== compile $name failed ($?)"
    done
}

measure() {
    hf=${HF:-$(ls -d ~/.cache/fdec/gguf/*/ 2>/dev/null | head -1)}
    [ -n "$hf" ] || { echo "no Hugging Face folder in ~/.cache/fdec/gguf: run compile first"; return 1; }
    args=()
    for peer in $PEERS; do args+=(--peer "$peer"); done
    for folder in "$BUILDS"/*/; do
        [ -f "$folder/report.json" ] && args+=(--build "$(basename "$folder")=$folder")
    done
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
    # shellcheck disable=SC2086 # GPU_PY_ARGS are words
    timeout 480 python3 "$here/gpu.py" --hf "$hf" "${args[@]}" --batches 1,16 --gen 64 \
        --rounds 2 --check-steps 32 --json "$OUT/gpu.json" $GPU_PY_ARGS | tee "$OUT/gpu.txt"
    # `fdec bench` itself on the GPU (device name, the GPU's copy bandwidth, batch-1 decode):
    # what the report's roofline is held against.
    [ -f "$BUILDS/fp16/report.json" ] && timeout 75 "$FDEC" bench "$BUILDS/fp16" --batch 1 \
        --gen-len 32 --rounds 2 --json > "$OUT/bench-fp16.json" || echo "== fdec bench failed ($?)"
}

case "${1:-all}" in
    compile) compile ;;
    measure) measure ;;
    all) compile && measure ;;
    *) echo "usage: gpu_session.sh [compile|measure|all]" >&2; exit 2 ;;
esac
