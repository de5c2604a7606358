#!/usr/bin/env bash
# Move a bundle (scripts/bundle.py) to a machine reached only through the workplace's device tool,
# which carries at most 64 MiB per call: trim what the runs never load, tar, and split into
# chunks of 60 MB, one folder per call.
#   bash scripts/device_carry.sh pack BUNDLE OUT [--xz]   # here: OUT/c00, OUT/c01, ... (carry one per call)
#   bash scripts/device_carry.sh unpack DIR BUNDLE        # there: DIR holds every chunk; BUNDLE is rebuilt
# Wheels are zip-deflated already, so the tar is not compressed unless --xz (xz -6 gains ~20%,
# at minutes of CPU). Trimmed (TRIM, one "wheel-glob member..." per line; set TRIM= to keep all):
# vLLM's FlashAttention-2 kernels (Hopper runs FA3, float32 runs Triton), its vllm-rs serving
# binary, xgrammar's static C++ library (for builds only), and Triton's static libraries, its
# Blackwell-only ptxas and CUPTI and a test library (~260 MB unpacked; Triton 3.8, the torch 2.14
# stack of vLLM 0.33). CHUNK_BYTES sets the chunk size (default 60000000): a call carries the
# checkout too, 64 MiB in all. vLLM's MoE kernels stay: vLLM
# imports them under contextlib.suppress, so without them an MoE model fails at its first forward
# with "'_moe_C' object has no attribute 'topk_softmax'" (measured on the H200, 2026-12-02).
set -euo pipefail
TRIM=${TRIM-"vllm-*.whl vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs
xgrammar-*.whl xgrammar/lib/libxgrammar.a
triton-3.8.*.whl triton/backends/nvidia/bin/ptxas-blackwell triton/backends/nvidia/lib/cupti/libcupti_static.a triton/backends/nvidia/lib/cupti/libnvperf_host_static.a triton/backends/nvidia/lib/cupti-blackwell/ triton/backends/nvidia/lib/cupti-blackwell/libcheckpoint.so triton/backends/nvidia/lib/cupti-blackwell/libcupti.so triton/backends/nvidia/lib/cupti-blackwell/libcupti.so.13 triton/backends/nvidia/lib/cupti-blackwell/libcupti.so.2026.2.0 triton/backends/nvidia/lib/cupti-blackwell/libcupti_static.a triton/backends/nvidia/lib/cupti-blackwell/libnvperf_host.so triton/backends/nvidia/lib/cupti-blackwell/libnvperf_host_static.a triton/backends/nvidia/lib/cupti-blackwell/libnvperf_target.so triton/backends/nvidia/lib/cupti-blackwell/libpcsamplingutil.so triton/instrumentation/libGPUInstrumentationTestLib.so"}

case ${1:-} in
  pack)
    bundle=${2:?bundle dir}; out=${3:?output dir}; xz=${4:-}
    stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
    cp -r "$bundle" "$stage/bundle"
    while read -r glob members; do
      [ -n "$glob" ] || continue
      for wheel in "$stage"/bundle/wheels/$glob; do
        [ -e "$wheel" ] || continue  # a bundle without this wheel
        zip -q -d "$wheel" $members || [ $? -eq 12 ]  # deletes members (12: none there), copies the rest without recompressing
        record=$(unzip -Z1 "$wheel" | grep '\.dist-info/RECORD$')
        mkdir -p "$stage/rec/$(dirname "$record")"
        unzip -p "$wheel" "$record" | grep -v -F -f <(tr ' ' '\n' <<<"$members" | sed 's/$/,/') >"$stage/rec/$record"
        (cd "$stage/rec" && zip -q "$wheel" "$record")
      done
    done <<<"$TRIM"
    rm -rf "$out"/c[0-9][0-9]
    mkdir -p "$out"
    if [ "$xz" = --xz ]; then compress=(nice xz -6 -T0); else compress=(cat); fi
    tar -C "$stage" -cf - bundle | "${compress[@]}" | split -b "${CHUNK_BYTES:-60000000}" -d -a 2 - "$stage/bundle.tar.part"
    for part in "$stage"/bundle.tar.part*; do
      mkdir -p "$out/c${part##*.part}" && mv "$part" "$out/c${part##*.part}/"
    done
    du -sh "$out"/c* ;;
  unpack)
    dir=${2:?chunk dir}; bundle=${3:?bundle dir}
    mkdir -p "$bundle"
    if head -c 6 "$dir/bundle.tar.part00" | grep -q 7zXZ; then decompress=(xz -dc -T0); else decompress=(cat); fi
    cat "$dir"/bundle.tar.part* | "${decompress[@]}" | tar -C "$bundle" --strip-components=1 -xf -
    echo "device_carry: $(ls "$bundle"/wheels | wc -l) wheels in $bundle" ;;
  *) sed -n 2,11p "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
