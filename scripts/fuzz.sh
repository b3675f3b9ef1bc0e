#!/usr/bin/env bash
# Coverage-guided fuzzing of Herald's untrusted-input parsers with cargo-fuzz
# (libFuzzer; needs a nightly toolchain). See docs/fuzzing.md.
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Builds every target, then runs each given target (default: all) for
# SECONDS (default 600) one after the other under `nice`, growing
# fuzz/corpus/<target>, and minimises the corpus afterwards. Logs go to
# ${FUZZ_LOG_DIR:-/tmp/fuzz-runs}/<target>.log; a crash leaves its input in
# fuzz/artifacts/<target>/ and the next target still runs.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${1:-600}
shift || true
if [ $# -gt 0 ]; then
  TARGETS=("$@")
else
  TARGETS=(tpm csr jwt policy sigv4 exchange_form workload_api)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
LOGS=${FUZZ_LOG_DIR:-/tmp/fuzz-runs}
mkdir -p "$LOGS"
# -O: optimised, -a: debug assertions and overflow checks on.
nice -n 19 cargo +nightly fuzz build -O -a
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t"
  echo "== $t: ${SECS}s, log $LOGS/$t.log"
  if ! nice -n 19 cargo +nightly fuzz run -O -a "$t" -- \
      -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$LOGS/$t.log" 2>&1; then
    echo "$t: FAILED (a crash or a broken invariant): see $LOGS/$t.log and fuzz/artifacts/$t/"
    status=1
  fi
  grep -E '^(#[0-9]+[[:space:]]+DONE|Done [0-9]+ runs|stat::)' "$LOGS/$t.log" || true
  nice -n 19 cargo +nightly fuzz cmin -O -a "$t" >"$LOGS/$t.cmin.log" 2>&1
  echo "$t: corpus $(ls "corpus/$t" | wc -l) files, $(du -sh "corpus/$t" | cut -f1)"
done
exit $status
