# shellcheck shell=bash
# Set-up shared by scripts/start and scripts/test (sourced, not run).
# `setup start|test` installs what is missing: Debian packages (as root, or through sudo), the
# virtual environment .venv, and the Python packages. Running it again is quick: apt is skipped
# when every package is installed, pip when the requirements files are unchanged since the last
# successful install (a hash stamp inside .venv). On return the venv is first on PATH and the
# working directory is the repository root.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
cd "$repo" || exit 1

say() { printf 'menny: %s\n' "$*"; }
die() { printf 'menny: error: %s\n' "$*" >&2; exit 1; }

# Prints the Debian packages that $1 (start|test) needs.
system_packages() {
    # cmake and g++ compile the engine's CPU kernels (whisper/kernels) against the installed mlx.
    local pkgs=(libportaudio2 libopenblas0-pthread cmake g++)
    if [[ $1 == test ]]; then
        # A virtual microphone (PulseAudio), speech synthesis and audio tools, a real browser,
        # and ffmpeg for the reference openai-whisper that some tests compare against.
        pkgs+=(pulseaudio libasound2-plugins sox espeak-ng chromium fonts-liberation ffmpeg)
    fi
    # Debian's own Python ships venv support separately.
    local python="${PYTHON:-python3}"
    if ! command -v "$python" >/dev/null ||
        [[ "$("$python" -c 'import sys; print(sys.base_prefix)')" == /usr ]]; then
        pkgs+=(python3 python3-venv python3-dev)
    fi
    printf '%s\n' "${pkgs[@]}"
}

ensure_system_packages() {
    local pkg missing=()
    if ! command -v dpkg-query >/dev/null; then
        say "not a Debian-like system: make sure these are installed: $*"
        return
    fi
    for pkg in "$@"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        say "system packages present"
        return
    fi
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null ||
            die "missing system packages: ${missing[*]}; as root run: apt-get install ${missing[*]}"
        sudo=(sudo)
    fi
    say "installing system packages: ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

ensure_venv() {
    local python="${PYTHON:-python3}"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "Menny needs Python 3.10 or newer; $python is $("$python" --version 2>&1)"
    # A venv whose interpreter no longer runs (moved, or Python upgraded) is rebuilt.
    if ! "$venv/bin/python" -c '' 2>/dev/null; then
        say "creating $venv"
        rm -rf "$venv"
        "$python" -m venv "$venv"
    fi
}

requirements_hash() {
    local sum
    sum="$(cat "$@" | sha256sum)"
    printf '%s\n' "${sum%% *}"
}

# requirements-dev.txt includes requirements.txt, so a test set-up also satisfies start. The tests
# also run the corpus on Ray (requirements-corpus.txt), which the app does not need.
ensure_python_packages() {
    local mode=$1 files=(requirements.txt) file
    [[ $mode == test ]] && files+=(requirements-dev.txt requirements-corpus.txt)
    local stamp="$venv/.menny-$mode.sha256" hash
    hash="$(requirements_hash "${files[@]}")"
    if [[ -f $stamp && "$(<"$stamp")" == "$hash" ]]; then
        say "Python packages up to date"
        return
    fi
    say "installing Python packages from ${files[*]} (the first time takes a few minutes)"
    local requirements=()
    for file in "${files[@]}"; do requirements+=(-r "$file"); done
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
    printf '%s\n' "$hash" >"$stamp"
    if [[ $mode == test ]]; then
        requirements_hash requirements.txt >"$venv/.menny-start.sha256"
    fi
}

# The engine's compiled CPU kernels: rebuilt only when their sources, mlx or nanobind changed
# (python -m whisper.kernels.build checks). Without them the engine runs, on MLX's slower ops.
ensure_kernels() {
    "$venv/bin/python" -m whisper.kernels.build ||
        say "warning: the compiled kernels did not build; the engine falls back to MLX's own (slower) ops"
}

setup() {
    local mode=$1 pkgs
    mapfile -t pkgs < <(system_packages "$mode")
    ensure_system_packages "${pkgs[@]}"
    ensure_venv
    ensure_python_packages "$mode"
    ensure_kernels
    export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
}
