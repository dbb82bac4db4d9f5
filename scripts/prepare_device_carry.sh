#!/usr/bin/env bash
# Build .devcarry/: what the GPU machine needs to import ComfyUI in-process for
# benchmarks/comfy_product.py, as plain folders (no install step there).
#
#   COMFYUI_PATH=/path/to/ComfyUI COMFY_PYTHON=/path/to/comfy-venv/bin/python scripts/prepare_device_carry.sh
#
# .devcarry/ComfyUI/  ComfyUI's source trimmed to what `import comfy.sd, comfy.sample,
#                     comfy.model_management` needs: comfy/ without the tokenizer vocabularies
#                     (text encoders are never built), node_helpers.py, folder_paths.py,
#                     comfyui_version.py, LICENSE; no .git.
# .devcarry/site/     the pure-Python requirements the GPU image lacks, copied from ComfyUI's venv:
#                     comfy_kitchen without its compiled backends/*/_C*.so (CUDA; HIP from 0.2.31), comfy_aimdo (its two ctypes libraries
#                     are Python-version independent; ComfyUI only turns dynamic VRAM on from main.py,
#                     which the benchmark does not run), torchsde, trampoline.
# .devcarry/kitchen_cuda/_C.abi3.so.xz
#                     comfy_kitchen's CUDA extension from PyPI's cp312-abi3 manylinux wheel of the same
#                     version (143 MB; xz -9e: 19 MB), which benchmarks/comfy_product.py unpacks beside
#                     the carried comfy_kitchen before ComfyUI imports it, so ComfyUI's RoPE and fp8 paths
#                     run as on a user's machine. KITCHEN_CUDA=0 skips it (kitchen then runs eager there).
# Use there:  PYTHONPATH=.devcarry/site COMFYUI_PATH=.devcarry/ComfyUI python3 benchmarks/comfy_product.py ...
# and name .devcarry in the run's carry list. Everything that travels must stay under 64 MiB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFY="${COMFYUI_PATH:?set COMFYUI_PATH to the ComfyUI checkout the tests use}"
PY="${COMFY_PYTHON:-python3}"
OUT="$ROOT/.devcarry"

if [ ! -f "$COMFY/comfy/ldm/hunyuan_video/model.py" ]; then
    echo "COMFYUI_PATH=$COMFY is not a ComfyUI checkout (no comfy/ldm/hunyuan_video/model.py)" >&2
    exit 1
fi
# Where each package lives (they may sit in different folders, e.g. a newer comfy_kitchen on PYTHONPATH).
site_of() {
    "$PY" - "$1" <<'EOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec(sys.argv[1])
where = pathlib.Path(spec.origin if spec.origin not in (None, "namespace") else list(spec.submodule_search_locations)[0])
print(where.resolve().parents[1] if where.name == "__init__.py" else where.resolve().parent)
EOF
}
declare -A SITES  # found before anything is deleted: a missing package fails with the old .devcarry intact
for pkg in comfy_kitchen comfy_aimdo torchsde trampoline; do
    SITES[$pkg]="$(site_of "$pkg")" || { echo "$PY cannot import $pkg: set COMFY_PYTHON to ComfyUI's venv python" >&2; exit 1; }
done

rm -rf "$OUT"
mkdir -p "$OUT/ComfyUI" "$OUT/site"

# -- ComfyUI source -------------------------------------------------------------------------------
# comfy/: every file except tokenizer vocabularies (comfy/sd1_tokenizer, comfy/text_encoders/*_tokenizer: 13 MB, read only when a text
# encoder is built) and caches.
(cd "$COMFY" && tar -cf - --exclude='__pycache__' --exclude='*.pyc' --exclude='comfy/text_encoders/*_tokenizer' --exclude='comfy/sd1_tokenizer' comfy) \
    | tar -xf - -C "$OUT/ComfyUI"
for f in node_helpers.py folder_paths.py comfyui_version.py LICENSE; do
    [ -f "$COMFY/$f" ] && cp "$COMFY/$f" "$OUT/ComfyUI/"
done
COMMIT="$(git -C "$COMFY" rev-parse HEAD 2>/dev/null || echo unknown)"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py")"

# -- pure-Python requirements ---------------------------------------------------------------------
for pkg in comfy_kitchen comfy_aimdo torchsde trampoline; do
    SITE="${SITES[$pkg]}"
    [ -d "$SITE/$pkg" ] || { echo "missing $SITE/$pkg in ComfyUI's venv (a package folder is expected)" >&2; exit 1; }
    (cd "$SITE" && tar -cf - --exclude='__pycache__' --exclude='*.pyc' \
        --exclude='backends/*/_C*' --exclude='*.cuh' --exclude='*.h' "$pkg" $(ls -d ${pkg}-*.dist-info 2>/dev/null)) \
        | tar -xf - -C "$OUT/site"
done
if find "$OUT/site/comfy_kitchen" -name '_C*' | grep -q .; then
    echo "comfy_kitchen's CUDA extension was not removed" >&2; exit 1
fi

# -- comfy_kitchen's CUDA extension, compressed --------------------------------------------------------
if [ "${KITCHEN_CUDA:-1}" != "0" ]; then
    KVER="$("$PY" -c "import importlib.metadata as m; print(m.version('comfy-kitchen'))")"
    WHEELS="$(mktemp -d)"
    "$PY" -m pip download -q "comfy-kitchen==$KVER" --python-version 3.12 --only-binary :all: --no-deps \
        --platform manylinux_2_28_x86_64 -d "$WHEELS"
    mkdir -p "$OUT/kitchen_cuda"
    "$PY" - "$WHEELS" "$OUT/kitchen_cuda/_C.abi3.so.xz" <<'EOF'
import glob, lzma, os, sys, zipfile
wheels, out = sys.argv[1], sys.argv[2]
(whl,) = glob.glob(f"{wheels}/comfy_kitchen-*.whl")
name = "comfy_kitchen/backends/cuda/_C.abi3.so"
with zipfile.ZipFile(whl) as z:
    data = z.read(name)
with lzma.open(out + ".tmp", "wb", preset=9 | lzma.PRESET_EXTREME) as f:  # about a minute on 2 cores
    f.write(data)
os.replace(out + ".tmp", out)
print(f"kitchen CUDA extension: {name} from {os.path.basename(whl)}: {len(data):,} bytes -> {os.path.getsize(out):,} (xz)")
EOF
    rm -rf "$WHEELS"
fi

{
    echo "ComfyUI $VERSION ($COMMIT) from $COMFY, trimmed; pure-Python packages from $PY's path:"
    for pkg in comfy_kitchen comfy_aimdo torchsde trampoline; do
        ls -d "$OUT/site/${pkg}"-*.dist-info 2>/dev/null | xargs -n1 basename || echo "$pkg"
    done
    if [ -f "$OUT/kitchen_cuda/_C.abi3.so.xz" ]; then
        echo "kitchen_cuda/_C.abi3.so.xz: comfy_kitchen's CUDA extension (cp312 abi3, manylinux_2_28 x86_64)"
    fi
    echo "built $(date -u +%Y-%m-%dT%H:%MZ) by scripts/prepare_device_carry.sh"
} > "$OUT/MANIFEST.txt"

# -- check: the carried tree imports without the venv's site-packages for these packages ---------------
"$PY" - "$OUT" <<'EOF'
import sys, importlib.abc
out = sys.argv[1]
sys.path[:0] = [f"{out}/site", f"{out}/ComfyUI"]
class Block(importlib.abc.MetaPathFinder):  # what the GPU image lacks must come from .devcarry or nowhere
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("av", "comfy_api", "alembic", "sqlalchemy", "blake3", "spandrel", "kornia"):
            raise ImportError(f"{name} is not on the GPU machine")
sys.meta_path.insert(0, Block())
from comfy.cli_args import args
args.cpu = True
import comfy.model_management, comfy.sd, comfy.sample, comfy.samplers, comfy.utils  # noqa: E401
import comfy_kitchen, torchsde, trampoline, comfy_aimdo  # noqa: E401
for m in (comfy.sd, comfy_kitchen, torchsde, trampoline, comfy_aimdo):
    where = getattr(m, "__file__", None) or list(m.__path__)[0]  # comfy_aimdo is a namespace package
    assert where.startswith(out), (m.__name__, where)
print("import check: comfy.sd / comfy.sample / comfy.model_management load from .devcarry;",
      "comfy_kitchen backends:", {k: v["available"] for k, v in comfy_kitchen.list_backends().items()})
EOF

echo "ComfyUI source: $(du -sh "$OUT/ComfyUI" | cut -f1); packages: $(du -sh "$OUT/site" | cut -f1)"
echo ".devcarry total: $(du -sh "$OUT" | cut -f1) ($(du -sb "$OUT" | cut -f1) bytes)"
TRAVEL=$(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
TOTAL=$((TRAVEL + $(du -sb "$OUT" | cut -f1)))
echo "with the repository's travelling files ($TRAVEL bytes): $TOTAL bytes of the 67108864 (64 MiB) limit"
[ "$TOTAL" -lt 67108864 ] || { echo "too large to travel" >&2; exit 1; }
