"""gRPC server reflection on the agent's socket, as grpcio clients use it:
v1alpha through grpcio-reflection's descriptor database (what grpcurl
before 1.9 and many tools speak) and v1 through the same messages on the
v1 method (the two are wire-identical). Prints one JSON object."""
import json
import os
import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> int:
    target = os.environ["SPIFFE_ENDPOINT_SOCKET"]
    out = {}
    with grpc.insecure_channel(target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        out["v1alpha_services"] = sorted(db.get_services())
        pool = DescriptorPool(db)
        service = pool.FindServiceByName("SpiffeWorkloadAPI")
        out["v1alpha_methods"] = sorted(m.name for m in service.methods)
        v1 = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        responses = v1(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            timeout=20,
        )
        names = []
        for r in responses:
            names.extend(s.name for s in r.list_services_response.service)
            break
        out["v1_services"] = sorted(names)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
