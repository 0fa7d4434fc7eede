#!/usr/bin/env bash
# Sets up target/sdk-venv: a Python venv with the OpenAI SDK pinned in tests/sdk/requirements.txt,
# for tests/openai_sdk.rs (which runs target/sdk-venv/bin/python, or $GATEHOUSE_SDK_PYTHON).
# Reuses the venv while the requirements are unchanged. Installs python3 / python3-venv with
# apt-get when they are missing (CI runs as root on a clean Debian); fails loudly otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${GATEHOUSE_SDK_VENV:-target/sdk-venv}"
requirements="tests/sdk/requirements.txt"
stamp="$venv/.requirements"

say() { printf 'python.sh: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

apt_install() {
    say "installing Debian packages: $* (apt-get)"
    command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
    [ "$(id -u)" = 0 ] || die "not root; run: sudo apt-get install -y $*"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && cmp -s "$stamp" "$requirements" \
    && "$venv/bin/python" -c 'import openai' 2>/dev/null; then
    say "$venv is up to date ($("$venv/bin/python" -c 'import openai; print("openai", openai.__version__)'))"
    exit 0
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null; then
    apt_install python3 python3-venv
    python=python3
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$("$python" --version 2>&1) is too old: the OpenAI SDK needs Python >= 3.10"

rm -rf "$venv"
# Debian's python3 has no venv/ensurepip without python3-venv.
if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    say "'$python -m venv' failed (no venv/ensurepip module)"
    apt_install python3-venv
    "$python" -m venv "$venv" || die "'$python -m venv $venv' still fails after installing python3-venv"
fi
say "installing $(grep -v '^#' "$requirements" | tr '\n' ' ')into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" \
    || die "pip could not install $requirements"
"$venv/bin/python" -c 'import openai; print("python.sh: ready:", openai.__version__)' >&2
cp "$requirements" "$stamp"
