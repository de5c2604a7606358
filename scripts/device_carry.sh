#!/usr/bin/env bash
# Move a bundle (scripts/bundle.py) to a machine reached only through the workplace's device tool,
# which carries at most 64 MiB per call: trim vLLM, store the wheels uncompressed (so that xz
# sees raw bytes), tar | xz, and split into chunks of 60 MB, one folder per call.
#   bash scripts/device_carry.sh pack BUNDLE OUT     # here: OUT/c00, OUT/c01, ... (carry one per call)
#   bash scripts/device_carry.sh unpack DIR BUNDLE   # there: DIR holds every chunk; BUNDLE is rebuilt
# Trimmed from vLLM: the FlashAttention-2 kernels (Hopper uses FA3; float32 uses Triton) and the
# vllm-rs serving binary. Other wheels are left whole.
set -euo pipefail
TRIM='vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs'

case ${1:-} in
  pack)
    bundle=${2:?bundle dir}; out=${3:?output dir}
    stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage/bundle/wheels" "$out"
    cp "$bundle"/manifest.tsv "$bundle"/requirements.txt "$stage/bundle/"
    TRIM=$TRIM python3 - "$bundle/wheels" "$stage/bundle/wheels" <<'EOF'
import os, sys, zipfile
from pathlib import Path
trim = set(os.environ["TRIM"].split())
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(Path(sys.argv[2]) / wheel.name, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if info.filename in trim:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(True) if l.split(b",")[0].decode() not in trim)
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
EOF
    rm -f "$out"/c*/bundle.tar.xz.*
    tar -C "$stage" -cf - bundle | nice xz -6 -T2 | split -b 60000000 -d -a 2 - "$stage/bundle.tar.xz."
    for part in "$stage"/bundle.tar.xz.*; do
      mkdir -p "$out/c${part##*.}" && mv "$part" "$out/c${part##*.}/"
    done
    ls -l "$out"/c*/ ;;
  unpack)
    dir=${2:?chunk dir}; bundle=${3:?bundle dir}
    mkdir -p "$bundle"
    cat "$dir"/bundle.tar.xz.* | xz -dc | tar -C "$bundle" --strip-components=1 -xf -
    echo "device_carry: $(ls "$bundle"/wheels | wc -l) wheels in $bundle" ;;
  *) sed -n 2,9p "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
