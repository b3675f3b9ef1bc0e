"""py-spiffe (PyPI `spiffe`, grpcio underneath) against the agent's
Workload API: X.509-SVIDs, X.509 bundles, a JWT-SVID, JWT bundles and a
JWT-SVID validation, with the socket named as SPIFFE_ENDPOINT_SOCKET says
(`unix:///abs/path` or `unix:/abs/path`). With FOREIGN_JWT and
FOREIGN_AUDIENCE set, also validates that token (a federated trust
domain's JWT-SVID) through the agent. Prints one JSON object."""
import json
import os
import sys

from spiffe import WorkloadApiClient


def main() -> int:
    socket = os.environ["SPIFFE_ENDPOINT_SOCKET"]
    audience = sys.argv[1] if len(sys.argv) > 1 else "api.internal"
    out = {}
    with WorkloadApiClient(socket_path=socket) as client:
        svids = client.fetch_x509_svids(timeout=20)
        out["x509_ids"] = sorted(str(s.spiffe_id) for s in svids)
        out["x509_chain_lengths"] = [len(s.cert_chain) for s in svids]
        bundles = client.fetch_x509_bundles(timeout=20)
        out["x509_bundle_domains"] = sorted(
            str(b.trust_domain) for b in bundles.bundles
        )
        out["x509_authorities"] = sum(
            len(b.x509_authorities) for b in bundles.bundles
        )
        jwt = client.fetch_jwt_svid(audience={audience}, timeout=20)
        out["jwt_id"] = str(jwt.spiffe_id)
        out["jwt_audience"] = sorted(jwt.audience)
        jwt_bundles = client.fetch_jwt_bundles(timeout=20)
        out["jwt_bundle_domains"] = sorted(
            str(b.trust_domain) for b in jwt_bundles.bundles
        )
        validated = client.validate_jwt_svid(jwt.token, audience, timeout=20)
        out["validated_id"] = str(validated.spiffe_id)
        foreign = os.environ.get("FOREIGN_JWT")
        if foreign:
            checked = client.validate_jwt_svid(
                foreign, os.environ["FOREIGN_AUDIENCE"], timeout=20
            )
            out["foreign_validated_id"] = str(checked.spiffe_id)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
