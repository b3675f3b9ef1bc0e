#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# The store's suite and the replica tests run against a real PostgreSQL.
if [ -z "${HERALD_TEST_PG_URL:-}" ]; then
  bash scripts/ensure-postgres.sh
fi
# The house rules first: formatting and lints, as CI enforces them.
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The README's first command, as a newcomer runs it: every flow must succeed.
bash scripts/check-dev.sh
