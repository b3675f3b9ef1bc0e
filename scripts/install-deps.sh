#!/usr/bin/env bash
# Installs the Debian packages Herald's build and tests need (idempotent).
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
# libtss2-dev: the node agent links tpm2-tss (tss-esapi); swtpm, swtpm-tools and
# tpm2-tools: the TPM tests run a real software TPM and cross-check with tpm2-tools.
pkgs=(build-essential pkg-config openssl ca-certificates git curl python3 python3-venv libtss2-dev swtpm swtpm-tools tpm2-tools)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "cargo (Rust >= 1.94) is required: https://rustup.rs" >&2; exit 1; }

# Independent clients the end-to-end tests drive (boto3, PyJWT), in a venv
# at the repository root so nothing touches the system Python.
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$(command -v python3)"
if [ ! -x "$root/.venv/bin/python" ]; then
  "$py" -m venv "$root/.venv"
fi
"$root/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/tests/python/requirements.txt"
