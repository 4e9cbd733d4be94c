#!/bin/bash
# Builds target/whl-lmd/: the import tree `benches/peers/lmdeploy_fill.py` needs to time
# LMDeploy's PyTorch-engine fill (`fill_kv_cache`, a Triton kernel) on the GPU machine,
# without LMDeploy's package imports (pydantic, fire, its turbomind .so, ...).
#
#   bash benches/peers/lmdeploy_setup.sh path/to/lmdeploy-0.14.0-cp312-cp312-manylinux2014_x86_64.whl
#   (pip download lmdeploy==0.14.0 --no-deps -d DIR, on a machine with the internet)
#
# From the wheel it takes only LMDeploy's two kernel files, unchanged, and its licence; the
# package __init__ files and the QuantPolicy values the kernel compares against are written
# here. Nothing of LMDeploy is committed. Then carry target/whl-lmd (about 140 KiB) and run
#   cd target/whl-lmd && python3 lmdeploy_fill.py
set -euo pipefail
wheel="${1:?usage: $0 LMDEPLOY_WHEEL}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$root/target/whl-lmd"
rm -rf "$out" && mkdir -p "$out"
kdir=lmdeploy/pytorch/kernels/cuda
unzip -q -o "$wheel" "$kdir/fill_kv_cache.py" "$kdir/turbo_quant.py" -d "$out"
unzip -q -o -j "$wheel" 'lmdeploy-*.dist-info/*LICENSE*' -d "$out/license" || true
for d in lmdeploy lmdeploy/pytorch lmdeploy/pytorch/kernels "$kdir"; do
  echo "# Stand-in package for timing LMDeploy's fill kernel only (fp8kv benches/peers)." > "$out/$d/__init__.py"
done
echo "__version__ = '0.14.0+kernel-only'" >> "$out/lmdeploy/__init__.py"
cat > "$out/lmdeploy/messages.py" <<'PY'
# The quant_policy values LMDeploy 0.14.0's fill_kv_cache compares against (its public
# QuantPolicy), for timing the kernel only.
import enum


class QuantPolicy(enum.IntEnum):
    NONE = 0
    INT4 = 4
    INT8 = 8
    FP8 = 16
    FP8_E5M2 = 17
    TURBO_QUANT = 42
PY
cp "$root/benches/peers/lmdeploy_fill.py" "$out/"
echo "target/whl-lmd: $(du -sh "$out" | cut -f1)"
