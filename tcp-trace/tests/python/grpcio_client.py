"""Calls every service of a tcp-trace agent with stock grpcio, as any user's script would.

Usage: grpcio_client.py TARGET NETNS CLOSED PROTO_DIR

TARGET is a grpcio target (unix:/path/to.sock or 127.0.0.1:PORT); no channel option is set, so
grpcio sends its own default :authority. The TcpTrace stubs are generated from PROTO_DIR with
grpc_tools.protoc into a temporary directory. Prints "subscribed" once its Subscribe call
(connections closed in network namespace NETNS) is open, then reads CLOSED ConnectionClosed events
of connections it opened (direction ACTIVE), and prints as its last line one JSON object with
what each call returned. Exits non-zero on the first call that fails.
"""

import importlib
import importlib.resources
import json
import sys
import tempfile
import time

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_tools import protoc

TIMEOUT = 30
# Timed one after another: a reply held back for a delayed ACK (Nagle) shows as ~40 ms each.
UNARY_CALLS = 20


def generate_stubs(proto_dir, out):
    """tcptrace_pb2 and tcptrace_pb2_grpc, generated now from the .proto file."""
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "tcptrace/v1/tcptrace.proto",
        ]
    )
    if rc != 0:
        sys.exit(f"grpc_tools.protoc failed ({rc}) on {proto_dir}/tcptrace/v1/tcptrace.proto")
    sys.path.insert(0, out)
    return (
        importlib.import_module("tcptrace.v1.tcptrace_pb2"),
        importlib.import_module("tcptrace.v1.tcptrace_pb2_grpc"),
    )


def reflection_v1_services(channel):
    """grpc.reflection.v1 has the same messages as v1alpha under another service name, and
    grpcio-reflection ships only v1alpha's stubs: a generic call with those messages."""
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(call(iter([request]), timeout=TIMEOUT))
    return sorted(s.name for r in responses for s in r.list_services_response.service)


def undecodable_request_status(channel):
    """GetStats with bytes that are no protobuf message (a field 1 of wire type 7)."""
    call = channel.unary_unary("/tcptrace.v1.TcpTrace/GetStats")
    try:
        call(b"\x0f\xff\xff", timeout=TIMEOUT)
    except grpc.RpcError as err:
        return err.code().name
    return "OK"


def main():
    target, netns, closed, proto_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    result = {"target": target}
    with tempfile.TemporaryDirectory() as out:
        pb, rpc = generate_stubs(proto_dir, out)
        channel = grpc.insecure_channel(target)
        stub = rpc.TcpTraceStub(channel)

        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT
        )
        result["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(check.status)
        result["reflection_v1alpha"] = sorted(
            ProtoReflectionDescriptorDatabase(channel).get_services()
        )
        result["reflection_v1"] = reflection_v1_services(channel)

        request = pb.SubscribeRequest(
            filter=pb.Filter(
                netns=[netns],
                kinds=[pb.EVENT_KIND_CONNECTION_CLOSED],
                directions=[pb.DIRECTION_ACTIVE],
            )
        )
        events = stub.Subscribe(request, timeout=TIMEOUT)
        print("subscribed", flush=True)
        result["events"] = []
        for event in events:
            result["events"].append(json_format.MessageToDict(event))
            if len(result["events"]) == closed:
                break

        listed = stub.ListConnections(
            pb.ListConnectionsRequest(filter=pb.Filter(netns=[netns])), timeout=TIMEOUT
        )
        result["connections"] = json_format.MessageToDict(listed).get("connections", [])
        # While this client's own subscription is still open.
        stats = stub.GetStats(pb.GetStatsRequest(), timeout=TIMEOUT)
        result["stats"] = json_format.MessageToDict(stats)
        events.cancel()
        start = time.perf_counter()
        for _ in range(UNARY_CALLS):
            stub.GetStats(pb.GetStatsRequest(), timeout=TIMEOUT)
        result["unary_call_seconds"] = (time.perf_counter() - start) / UNARY_CALLS
        result["undecodable_request"] = undecodable_request_status(channel)
        channel.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
