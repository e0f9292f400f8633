#!/usr/bin/env bash
# Create (or reuse) the project virtual environment, idempotently, using only package registries.
#
#   VENV=.venv PYTHON=python3 bash tools/setup_env.sh
#   bash tools/setup_env.sh --export     # also the optional export extras (or GRIDCLIP_EXPORT=1)
#
# - Reuses a detectron2 that is already importable in the chosen interpreter (a user's own build
#   with compiled ops). Point VENV at an existing environment to use it: nothing is replaced.
# - Otherwise installs the offline fallback: the `sal-detectron2` wheel (upstream detectron2 main,
#   pure-Python parts work on CPython 3.11; its compiled `_C` is for 3.10 and is simply not loaded).
# - A stamp file records a hash of this script and setup.cfg, so a second run is a no-op.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.gridclip-env-stamp"
HASH="$(cat "$ROOT/tools/setup_env.sh" "$ROOT/setup.cfg" | sha256sum | cut -c1-16)"

log() { printf '[setup_env] %s\n' "$*"; }

# Optional step: what tools/export.py needs for ONNX (torch.onnx's dynamo exporter needs onnx and
# onnxscript; onnxruntime runs the exported model on the CPU). `make test` does not need them: the
# ONNX test skips without them. Asked for with --export or GRIDCLIP_EXPORT=1.
WITH_EXPORT="${GRIDCLIP_EXPORT:-0}"
for arg in "$@"; do
  [[ "$arg" == "--export" ]] && WITH_EXPORT=1
done
install_export_extras() {
  [[ "$WITH_EXPORT" == "1" ]] || return 0
  if ! "$VENV/bin/python" -c "import onnx, onnxscript, onnxruntime" >/dev/null 2>&1; then
    log "installing the export extras: onnx, onnxscript, onnxruntime"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q onnx onnxscript onnxruntime
  fi
}

# Optional extra, not a core dependency: `bash tools/setup_env.sh --app` (what `make app` runs
# after the base environment) adds Gradio for the demo page and Selenium for its browser test
# (the browser is a system package: apt-get install -y chromium chromium-driver). Gradio pins
# Pillow below 13, so pip may move Pillow down a major version in this environment.
if [[ "${1:-}" == "--app" ]]; then
  if ! "$VENV/bin/python" -c "import gradio, selenium" >/dev/null 2>&1; then
    printf '[setup_env] %s\n' "installing the demo page's optional extras: gradio, selenium"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q gradio selenium
  fi
  exit 0
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
  install_export_extras
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtual environment at $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# pip's find-links/extra-index notes about absent local mirrors are noise here: filter them.
pip_install() {
  "$PY" -m pip install --disable-pip-version-check -q "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# torch/torchvision: ranges that accept what this machine offers (2.14.1 / 0.29.1 import together).
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  log "installing torch + torchvision (about a minute)"
  pip_install "torch>=2.1,<=2.14.1" "torchvision>=0.16,<=0.29.1"
fi
# torch pulls the newest setuptools, which dropped pkg_resources (needed by clip and model_zoo).
pip_install "setuptools<81"

# detectron2's runtime dependencies (the fallback wheel's metadata omits some and pins numpy<2).
pip_install fvcore iopath yacs termcolor tabulate cloudpickle tensorboard omegaconf hydra-core \
  matplotlib pycocotools Pillow packaging tqdm opencv-python-headless ftfy regex pytest \
  pytest-timeout nbformat nbclient ipykernel safetensors

if "$PY" -c "import detectron2" >/dev/null 2>&1; then
  log "using the detectron2 already installed: $("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
else
  log "no detectron2 found: installing the offline fallback wheel sal-detectron2==0.7.2"
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --python-version 3.10 sal-detectron2==0.7.2 -d "$TMP" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  mv "$TMP"/sal_detectron2-0.7.2-*.whl "$TMP/sal_detectron2-0.7.2-py3-none-any.whl"
  pip_install --no-deps "$TMP/sal_detectron2-0.7.2-py3-none-any.whl"
  # The wheel ships a top-level `tools` package; drop it so it can never shadow the project's tools/.
  "$PY" - <<'PYEOF'
import os, shutil, site
for sp in site.getsitepackages():
    t = os.path.join(sp, "tools")
    if os.path.isfile(os.path.join(t, "train_net.py")):
        shutil.rmtree(t)
PYEOF
fi

# OpenAI's CLIP code. clip-anytorch is the maintained fork of openai/CLIP (same `clip` module,
# ships the BPE vocab). Skip if a `clip` module with `clip.model.CLIP` already exists.
if ! "$PY" -c "import clip.model; clip.model.CLIP" >/dev/null 2>&1; then
  pip_install --no-deps clip-anytorch
fi

# lvis: --no-deps so it does not pull GUI opencv next to the headless one. Its numpy-2
# incompatibility is handled by gridclip.evaluation.lvis_compat (one place, tested).
pip_install --no-deps lvis

# The project itself, editable, so nothing depends on the working directory.
pip_install --no-deps --no-build-isolation -e "$ROOT"

log "detectron2 in use:"
"$PY" - <<'PYEOF'
import detectron2, os
print(f"  detectron2 {detectron2.__version__} at {os.path.dirname(detectron2.__file__)}")
try:
    from detectron2 import _C  # noqa: F401
    print("  compiled ops (_C): available")
except Exception as e:  # noqa: BLE001
    print("  compiled ops (_C): MISSING -> deformable conv, rotated boxes and the fast COCO eval")
    print("  are unavailable; everything this project uses runs on torchvision ops.")
PYEOF
install_export_extras
echo "$HASH" > "$STAMP"
log "environment ready: $VENV"
