#!/usr/bin/env bash
# Sets up and runs the dev server on its embedded defaults and shows every
# flow, a few lines each:
#   1. a join token minting an X.509 SVID, renewed over mTLS;
#   2. a CI job's token (from the dev server's DEV-ONLY local OIDC issuer,
#      `herald dev token`) exchanged for AWS-shaped session credentials
#      through the STS API with boto3, and for a JWT-SVID through RFC 8693;
#   3. with swtpm installed (scripts/install-deps.sh installs it): an agent
#      on a fresh software TPM attesting its node and serving a workload its
#      SVID over the SPIFFE Workload API (`herald workload fetch`);
# then `herald report` and where each piece lives. Ctrl-C stops the server.
# HERALD_DEV_DEMO_ONLY=1 stops everything after the demo (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
bash scripts/install-deps.sh
cargo build --locked --bin herald
HERALD="$ROOT/target/debug/herald"
DEV="$ROOT/.herald-dev"
PY="$ROOT/.venv/bin/python"
HTTP=http://127.0.0.1:8080
mkdir -p "$DEV"

PIDS=()
cleanup() {
  # Last started first: the agent before the server and its TPM.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill "${PIDS[$i]}" 2>/dev/null || true
    wait "${PIDS[$i]}" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

# The dev server's policies: the examples in ./attestation-policies (linked,
# so edits hot-reload) plus, with swtpm, a node policy trusting the local
# CA of the software TPM provisioned below. The dev-ci policy for the dev
# issuer is built into --dev.
POLICIES="$DEV/policies"
rm -rf "$POLICIES"
mkdir -p "$POLICIES"
for f in "$ROOT"/attestation-policies/*.yaml; do ln -s "$f" "$POLICIES/"; done
# And every directory of files they name (EK roots, AWS certificates, ...).
for d in "$ROOT"/attestation-policies/*/; do ln -s "${d%/}" "$POLICIES/"; done

TPM=""
if command -v swtpm >/dev/null && command -v swtpm_setup >/dev/null && command -v swtpm_localca >/dev/null; then
  TPM="$DEV/swtpm"
  rm -rf "$TPM"
  mkdir -p "$TPM/ca" "$TPM/state" "$TPM/ekcerts"
  # swtpm_setup's own config files, so its local CA (the "TPM vendor" whose
  # root the policy trusts) lives here and not in /var/lib.
  cat > "$TPM/swtpm_setup.conf" <<EOF
create_certs_tool = $(command -v swtpm_localca)
create_certs_tool_config = $TPM/localca.conf
create_certs_tool_options = /etc/swtpm-localca.options
active_pcr_banks = sha256
EOF
  cat > "$TPM/localca.conf" <<EOF
statedir = $TPM/ca
signingkey = $TPM/ca/signkey.pem
issuercert = $TPM/ca/issuercert.pem
certserial = $TPM/ca/certserial
EOF
  swtpm_setup --tpm2 --create-ek-cert --create-platform-cert --pcr-banks sha256 --overwrite \
    --tpmstate "$TPM/state" --config "$TPM/swtpm_setup.conf" \
    --write-ek-cert-files "$TPM/ekcerts" </dev/null >"$TPM/setup.log" 2>&1
  cp "$TPM/ca/swtpm-localca-rootca-cert.pem" "$POLICIES/dev-swtpm-root.pem"
  cp "$TPM/ca/issuercert.pem" "$POLICIES/dev-swtpm-intermediate.pem"
  cat > "$POLICIES/dev-swtpm-node.yaml" <<EOF
# DEV ONLY (scripts/dev.sh): the software TPM provisioned in $TPM.
name: dev-swtpm-node
description: DEV ONLY - nodes whose EK chains to this checkout's swtpm local CA
evidence:
  tpm:
    ek_roots: [dev-swtpm-root.pem]
    ek_intermediates: [dev-swtpm-intermediate.pem]
    pcrs: [0, 7]
    golden:
      - { name: pristine-swtpm, pcrs: { 0: "$(printf '0%.0s' $(seq 64))", 7: "$(printf '0%.0s' $(seq 64))" } }
spiffe_id:
  prefix: spiffe://dev.herald.test/dev-node/
  template: "spiffe://dev.herald.test/dev-node/{ek_hash}"
grants:
  x509_svid: { max_ttl: 1h }
workloads:
  - spiffe_id: spiffe://dev.herald.test/workload/dev-demo
    selectors: ["unix:uid:$(id -u)"]
    ttl: 30m
    hint: dev-demo
EOF
  TPM_PORT=$(( 20000 + RANDOM % 20000 ))
  swtpm socket --tpm2 --tpmstate dir="$TPM/state" \
    --server type=tcp,port=$TPM_PORT,bindaddr=127.0.0.1 \
    --ctrl type=tcp,port=$((TPM_PORT + 1)),bindaddr=127.0.0.1 \
    --flags not-need-init,startup-clear >"$TPM/swtpm.log" 2>&1 &
  PIDS+=($!)
fi

HERALD_POLICY_DIR="$POLICIES" $HERALD server --dev &
SERVER=$!
PIDS+=($SERVER)
for _ in $(seq 1 300); do
  curl -fsS "$HTTP/readyz" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { echo "dev.sh: the server exited" >&2; exit 1; }
  sleep 0.1
done
curl -fsS "$HTTP/readyz" >/dev/null

echo
echo "== 1. join token: an X.509 SVID minted, then renewed over mTLS =="
T=$($HERALD token create --dev --spiffe-id spiffe://dev.herald.test/bootstrap/demo --ttl 10m)
HERALD_JOIN_TOKEN="$T" $HERALD svid mint --server https://127.0.0.1:8443 --bundle "$DEV/bundle.pem" --out "$DEV/demo-svid"
$HERALD svid show "$DEV/demo-svid/svid.pem"
$HERALD svid renew --server https://127.0.0.1:8443 --out "$DEV/demo-svid"
openssl verify -CAfile "$DEV/demo-svid/bundle.pem" -purpose sslclient "$DEV/demo-svid/svid.pem"
echo "ok: join token → X.509 SVID → renewed"

echo
echo "== 2a. CI job token → AWS-shaped session credentials (STS AssumeRoleWithWebIdentity, boto3) =="
"$PY" - "$($HERALD dev token)" "$HTTP" <<'PY'
import sys
import boto3
from botocore import UNSIGNED
from botocore.config import Config

token, endpoint = sys.argv[1], sys.argv[2]
sts = boto3.client("sts", endpoint_url=endpoint, region_name="us-east-1",
                   config=Config(signature_version=UNSIGNED))
r = sts.assume_role_with_web_identity(
    RoleArn="arn:aws:iam::000000000000:role/dev-deploy",
    RoleSessionName="dev-sh", WebIdentityToken=token)
c = r["Credentials"]
print(f"  role        {r['AssumedRoleUser']['Arn']}")
print(f"  subject     {r['SubjectFromWebIdentityToken']}")
print(f"  key id      {c['AccessKeyId']}  (secret and session token not shown)")
print(f"  expires     {c['Expiration'].isoformat()}")
print("ok: CI token → STS session credentials")
PY

echo
echo "== 2b. CI job token → JWT-SVID (RFC 8693 token exchange) =="
RESP=$(curl -fsS "$HTTP/v1/token" \
  -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
  --data-urlencode "subject_token=$($HERALD dev token)" \
  -d subject_token_type=urn:ietf:params:oauth:token-type:id_token \
  -d audience=demo-service)
"$PY" - "$RESP" <<'PY'
import base64, json, sys
r = json.loads(sys.argv[1])
p = r["access_token"].split(".")[1]
c = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
print(f"  type        {r['issued_token_type']}, expires in {r['expires_in']} s")
print(f"  sub         {c['sub']}")
print(f"  aud         {c['aud']}")
print("ok: CI token → JWT-SVID")
PY

if [ -n "$TPM" ]; then
  echo
  echo "== 3. node agent on a fresh software TPM → a workload's SVID over the Workload API =="
  AGENT="$DEV/agent"
  rm -rf "$AGENT"
  mkdir -p "$AGENT"
  cat > "$AGENT/agent.toml" <<EOF
servers = ["https://127.0.0.1:8443"]
trust_bundle = "$DEV/bundle.pem"
data_dir = "$AGENT/state"
[tpm]
tcti = "swtpm:host=127.0.0.1,port=$TPM_PORT"
[workload_api]
socket = "$AGENT/agent.sock"
EOF
  HERALD_LOG=warn $HERALD agent --config "$AGENT/agent.toml" &
  PIDS+=($!)
  fetched=""
  for _ in $(seq 1 300); do
    if [ -S "$AGENT/agent.sock" ] && fetched=$($HERALD workload fetch --socket "$AGENT/agent.sock" --out "$AGENT/workload-svid" 2>/dev/null); then
      break
    fi
    sleep 0.1
  done
  [ -n "$fetched" ] || { echo "dev.sh: the agent served no SVID (see above)" >&2; exit 1; }
  STATUS=$($HERALD agent --config "$AGENT/agent.toml" status 2>&1 || true)
  echo "  node        $(grep -o 'spiffe://[^ ]*' <<<"$STATUS" | head -n1)"
  echo "  workload    $fetched"
  echo "ok: TPM attestation → node SVID → workload SVID (herald workload fetch)"
else
  echo
  echo "== 3. (skipped: swtpm is not installed; scripts/install-deps.sh installs it) =="
fi

echo
echo "== report =="
$HERALD report --dev --since 1h
$HERALD audit verify --dev
echo
echo "== where each piece lives =="
cat <<EOF
  server data, SQLite, dev KEK   $DEV/  (bundle.pem: the trust bundle)
  policies in effect             $POLICIES/ (links to attestation-policies/) + built-in dev-ci
  dev OIDC issuer key (0600)     $DEV/dev-oidc/  (DEV ONLY; herald dev token reads it)
  SVID of step 1                 $DEV/demo-svid/
EOF
if [ -n "$TPM" ]; then
cat <<EOF
  software TPM and its EK CA     $TPM/
  agent config, state, socket    $DEV/agent/  (workload SVID: $DEV/agent/workload-svid/)
EOF
fi
cat <<EOF
  endpoints                      gRPC https://127.0.0.1:8443, HTTP $HTTP (see README "Endpoints")
EOF

if [ "${HERALD_DEV_DEMO_ONLY:-}" = 1 ]; then
  exit 0
fi
echo
echo "== the server keeps running (Ctrl-C to stop) =="
wait $SERVER
