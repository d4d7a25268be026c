#!/usr/bin/env bash
# One-GPU check of the training path at the real Qwen2.5-1.5B size (random init, no download):
# tokens/s, step time and peak GPU memory at 64 completions x 512 tokens per step, and the share
# of parameters that bf16 mixed precision really changes at lr 3e-6 (exit 1 under 95 %), through
# the harness's own functions. See bench/gpu_check.py; extra arguments go to it.
#
#   bash bench/gpu_check.sh                 # GPU machine, a few minutes (budget: 8 on an H100)
#   bash bench/gpu_check.sh --cpu-test      # tiny model on CPU, to check the path anywhere
#
# Python: $GPU_CHECK_PYTHON if set, else .venv/bin/python when it sees a CUDA GPU (or with
# --cpu-test), else python3. When that python lacks trl, datasets, math-verify or python-dotenv,
# the wheels in .whl/ (those packages and their missing dependencies, pure Python) are installed
# without network into outputs/gpu_check/site-packages and put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HOME="$PWD/outputs/gpu_check/hf_home"  # no cache or token from the home directory
export PYTHONDONTWRITEBYTECODE=1 PIP_ROOT_USER_ACTION=ignore

cpu_test=0
for a in "$@"; do [[ $a == --cpu-test ]] && cpu_test=1; done

py=${GPU_CHECK_PYTHON:-}
if [[ -z $py && -x .venv/bin/python ]]; then
  if ((cpu_test)) || .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    py=.venv/bin/python
  fi
fi
py=${py:-python3}
if ! "$py" -c 'import trl, datasets, math_verify, dotenv' 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  site="$PWD/outputs/gpu_check/site-packages"
  mkdir -p "$site"
  if "$py" -m pip --version >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --disable-pip-version-check --target "$site" .whl/*.whl
  else  # no pip: these wheels are pure Python, unpacking them is installing them
    "$py" -c 'import glob, sys, zipfile
for w in sorted(glob.glob(".whl/*.whl")):
    zipfile.ZipFile(w).extractall(sys.argv[1])' "$site"
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $site"
fi

# Fail in seconds, with versions, if an import is missing.
"$py" - <<'PY'
import importlib
import importlib.metadata as md
import sys

mods = ["torch", "transformers", "accelerate", "trl", "datasets", "math_verify", "dotenv",
        "pyarrow", "huggingface_hub", "fsspec", "sympy", "matplotlib"]
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:
        bad.append(f"{m}: {type(e).__name__}: {e}")
dists = ["torch", "transformers", "accelerate", "trl", "datasets", "math-verify", "pyarrow",
         "huggingface-hub", "fsspec"]
vers = []
for d in dists:
    try:
        vers.append(f"{d} {md.version(d)}")
    except md.PackageNotFoundError:
        vers.append(f"{d} -")
print(f"python {sys.executable} {sys.version.split()[0]}: " + ", ".join(vers), flush=True)
if bad:
    sys.exit("error: cannot import " + "; ".join(bad))
PY

exec "$py" bench/gpu_check.py "$@"
