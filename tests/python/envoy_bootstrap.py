"""Checks an Envoy bootstrap (JSON on stdin, converted from the YAML by the
test) against Envoy's own API types (PyPI envoy-data-plane): unknown
fields and unregistered typed configs are errors. Prints the SDS secret
names it references and the Unix socket paths of its clusters."""
import json
import sys

# Importing a package registers its messages for typed_config (Any).
import envoy_data_plane.envoy.extensions.filters.network.tcp_proxy.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.transport_sockets.tls.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.upstreams.http.v3  # noqa: F401
from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap


def walk(value, found):
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("tls_certificate_sds_secret_configs",):
                found["sds"].extend(c["name"] for c in v)
            elif k == "validation_context_sds_secret_config":
                found["sds"].append(v["name"])
            elif k == "pipe":
                found["pipes"].append(v["path"])
            walk(v, found)
    elif isinstance(value, list):
        for v in value:
            walk(v, found)


def main() -> int:
    config = json.load(sys.stdin)
    Bootstrap.from_dict(config)
    found = {"sds": [], "pipes": []}
    walk(config, found)
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
