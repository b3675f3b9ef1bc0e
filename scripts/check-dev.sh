#!/usr/bin/env bash
# Runs the README's first command (scripts/dev.sh) the way a newcomer does,
# stopping after the demo, within a time bound, and checks that every flow
# printed its success line. scripts/test.sh runs it after the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rm -rf .herald-dev
if ! HERALD_DEV_DEMO_ONLY=1 timeout 600 bash scripts/dev.sh >"$log" 2>&1; then
  tail -40 "$log" >&2
  echo "check-dev: scripts/dev.sh failed or timed out" >&2
  exit 1
fi
want=(
  "ok: join token → X.509 SVID → renewed"
  "ok: CI token → STS session credentials"
  "ok: CI token → JWT-SVID"
  "ok: TPM attestation → node SVID → workload SVID (herald workload fetch)"
  "Herald coverage report"
  "audit chain intact"
  "== where each piece lives =="
)
missing=0
for line in "${want[@]}"; do
  if ! grep -qF "$line" "$log"; then
    echo "check-dev: missing from scripts/dev.sh output: $line" >&2
    missing=1
  fi
done
if grep -q $'\x1b\[' "$log"; then
  echo "check-dev: colour codes in piped output" >&2
  missing=1
fi
[ "$missing" = 0 ] || { tail -40 "$log" >&2; exit 1; }
echo "check-dev: every flow of scripts/dev.sh succeeded"
