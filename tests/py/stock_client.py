"""A stock Python gRPC client on a Cairn unix socket, as oVirt's host side
would use it: no channel options. Health, reflection through
grpcio-reflection's own descriptor database (grpc.reflection.v1alpha), and
one RPC whose message types come from reflection. Prints one JSON line."""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

socket, service, method = sys.argv[1], sys.argv[2], sys.argv[3]
channel = grpc.insecure_channel("unix:" + socket)
health = health_pb2_grpc.HealthStub(channel).Check(
    health_pb2.HealthCheckRequest(), timeout=10
)
db = ProtoReflectionDescriptorDatabase(channel)
services = sorted(db.get_services())
pool = descriptor_pool.DescriptorPool(db)
m = pool.FindServiceByName(service).FindMethodByName(method)
req_cls = message_factory.GetMessageClass(m.input_type)
resp_cls = message_factory.GetMessageClass(m.output_type)
call = channel.unary_unary(
    f"/{service}/{method}",
    request_serializer=req_cls.SerializeToString,
    response_deserializer=resp_cls.FromString,
)
resp = call(req_cls(), timeout=10)
print(
    json.dumps(
        {
            "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
            "services": services,
            "response": json_format.MessageToDict(resp),
        }
    )
)
