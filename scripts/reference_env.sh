#!/usr/bin/env bash
# Creates .venv-ref: the reference implementations (openai-whisper on PyTorch CPU,
# faster-whisper on CTranslate2) next to everything our own `whisper/` package needs,
# so one interpreter can run both for parity fixtures and the engine benchmark.
# Idempotent: re-running only installs what is missing.
#
# Name clash: openai-whisper installs a top-level package called `whisper`, like ours.
# The reference scripts put the repo root first on sys.path (so `import whisper` is ours)
# and load OpenAI's package from this venv's site-packages under the name
# `openai_whisper` (see tests/reference/openai_ref.py). Its submodules use relative
# imports only, so they register as `openai_whisper.*` and never touch ours.
#
# Usage: scripts/reference_env.sh        then  .venv-ref/bin/python tests/reference/make_fixtures.py
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv-ref"
python="${PYTHON:-python3.11}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet)

# torch first and alone: pip's find-links (/opt/wheels here) holds the CPU build, and the
# local version 2.13.0+cpu outranks PyPI's CUDA build of the same release.
"${pip[@]}" "torch==2.13.0"
"$venv/bin/python" - <<'EOF'
import torch
if torch.version.cuda is not None:
    raise SystemExit(f"expected a CPU build of torch, got {torch.__version__} (CUDA {torch.version.cuda})")
EOF

# openai-whisper goes in last and without its dependencies: they would pull triton
# (GPU-only kernels, hundreds of MB) on Linux x86_64; its real needs are listed in
# requirements-bench.txt. On re-runs pip may print that triton is missing: expected.
# (nested -r paths are made absolute because pip reads them relative to the copy)
sed -e '/^openai-whisper==/d' -e "s#^-r #-r $repo/#" "$repo/requirements-bench.txt" \
    > "$venv/requirements-bench.nodeps.txt"
"${pip[@]}" -r "$venv/requirements-bench.nodeps.txt"
"${pip[@]}" --no-deps "$(grep -E '^openai-whisper==' "$repo/requirements-bench.txt")"

# Checked from outside the repo, where `import whisper` must find OpenAI's package.
cd "$venv"
"$venv/bin/python" - <<'EOF'
import importlib.util
spec = importlib.util.find_spec("whisper")
assert spec is not None and "site-packages" in spec.origin, spec
import ctranslate2, faster_whisper, mlx.core, torch  # noqa: F401
print(f"reference venv ready: torch {torch.__version__}, ctranslate2 {ctranslate2.__version__}, "
      f"faster-whisper {faster_whisper.__version__}")
EOF
