#!/usr/bin/env bash
# Sets up and runs the dev server on its embedded defaults, and shows an
# X.509 SVID being minted and renewed. Ctrl-C stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --locked --bin herald
HERALD=./target/debug/herald
$HERALD server --dev &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 100); do
  curl -fsS http://127.0.0.1:8080/readyz >/dev/null 2>&1 && break
  sleep 0.1
done
echo
echo "== demo: a join token, an SVID minted with it, then renewed over mTLS =="
T=$($HERALD token create --dev --spiffe-id spiffe://dev.herald.test/bootstrap/demo --ttl 10m)
$HERALD svid mint --join-token "$T" --server https://127.0.0.1:8443 --bundle .herald-dev/bundle.pem --out ./.herald-dev/demo-svid
$HERALD svid show ./.herald-dev/demo-svid/svid.pem
$HERALD svid renew --server https://127.0.0.1:8443 --out ./.herald-dev/demo-svid
openssl verify -CAfile ./.herald-dev/demo-svid/bundle.pem -purpose sslclient ./.herald-dev/demo-svid/svid.pem
$HERALD audit verify --dev
echo
echo "== the server keeps running (Ctrl-C to stop) =="
wait $SERVER
