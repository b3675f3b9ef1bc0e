"""An SDS client built from Envoy's own API types (PyPI envoy-data-plane)
over grpcio, against the agent's socket: one StreamSecrets stream (a
first request with the Envoy node, an ACK that names other resources) and
a FetchSecrets call whose node asks for trusted_ca instead of the SPIFFE
validator. Usage: envoy_sds.py SOCKET SPIFFE_ID. Prints one JSON object."""
import json
import queue
import sys

import grpc
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    Secret,
    SpiffeCertValidatorConfig,
)
from envoy_data_plane.envoy.service.discovery.v3 import (
    DiscoveryRequest,
    DiscoveryResponse,
)

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"


def describe(response: DiscoveryResponse) -> dict:
    out = {"version": response.version_info, "nonce": response.nonce, "secrets": {}}
    for any_ in response.resources:
        assert any_.type_url == SECRET, any_.type_url
        s = Secret.parse(any_.value)
        if s.tls_certificate is not None:
            chain = s.tls_certificate.certificate_chain.inline_bytes
            key = s.tls_certificate.private_key.inline_bytes
            out["secrets"][s.name] = {
                "certificates": chain.count(b"-----BEGIN CERTIFICATE-----"),
                "private_key": key.startswith(b"-----BEGIN PRIVATE KEY-----"),
            }
        elif s.validation_context is not None:
            v = s.validation_context
            if v.custom_validator_config is not None:
                cfg = SpiffeCertValidatorConfig.parse(
                    v.custom_validator_config.typed_config.value
                )
                out["secrets"][s.name] = {
                    "validator": v.custom_validator_config.name,
                    "trust_domains": [t.name for t in cfg.trust_domains],
                }
            else:
                out["secrets"][s.name] = {
                    "trusted_ca": v.trusted_ca.inline_bytes.count(
                        b"-----BEGIN CERTIFICATE-----"
                    )
                }
    return out


def main() -> int:
    socket, spiffe_id = sys.argv[1], sys.argv[2]
    out = {}
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stream = channel.stream_stream(
            f"{SERVICE}/StreamSecrets",
            request_serializer=bytes,
            response_deserializer=DiscoveryResponse.parse,
        )
        requests: "queue.Queue[DiscoveryRequest | None]" = queue.Queue()

        def outgoing():
            while (r := requests.get()) is not None:
                yield r

        responses = stream(outgoing(), timeout=30)
        requests.put(
            DiscoveryRequest(
                node=Node(id="py-envoy", cluster="test"),
                resource_names=[spiffe_id, "ROOTCA"],
                type_url=SECRET,
            )
        )
        first = next(responses)
        out["first"] = describe(first)
        requests.put(
            DiscoveryRequest(
                version_info=first.version_info,
                response_nonce=first.nonce,
                resource_names=["default", "ALL"],
                type_url=SECRET,
            )
        )
        out["second"] = describe(next(responses))
        requests.put(None)
        responses.cancel()

        fetch = channel.unary_unary(
            f"{SERVICE}/FetchSecrets",
            request_serializer=bytes,
            response_deserializer=DiscoveryResponse.parse,
        )
        node = Node.from_dict(
            {"id": "py-envoy", "metadata": {"disable_spiffe_cert_validation": True}}
        )
        out["fetch"] = describe(
            fetch(
                DiscoveryRequest(node=node, resource_names=["ROOTCA"], type_url=SECRET),
                timeout=30,
            )
        )
        try:
            fetch(
                DiscoveryRequest(
                    resource_names=["spiffe://elsewhere.test/x"], type_url=SECRET
                ),
                timeout=30,
            )
            out["foreign"] = "served"
        except grpc.RpcError as e:
            out["foreign"] = e.code().name
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
