"""An OTLP/gRPC receiver for the tests, from the official protos (the opentelemetry-proto
package) served with grpcio. Prints one JSON line per log record it receives and one per
metrics export, flushed at once, so the test reads what arrived as it arrives.

Usage: otlp_receiver.py PORT  (listens on 127.0.0.1:PORT; prints "listening" when it does)
"""
import json
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def emit(line):
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request, context):
        for resource_logs in request.resource_logs:
            resource = {a.key: value(a.value) for a in resource_logs.resource.attributes}
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    emit({
                        "kind": "log",
                        "resource": resource,
                        "event_name": record.event_name,
                        "time_unix_nano": record.time_unix_nano,
                        "body": value(record.body),
                        "attributes": {a.key: value(a.value) for a in record.attributes},
                    })
        return logs_service_pb2.ExportLogsServiceResponse()


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request, context):
        points = {}
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    data = getattr(metric, kind)
                    for point in data.data_points:
                        labels = ",".join(
                            f"{a.key}={value(a.value)}" for a in point.attributes
                        )
                        if kind == "histogram":
                            number = point.count
                        else:
                            number = point.as_int
                        points[f"{metric.name}{{{labels}}}"] = number
        emit({"kind": "metrics", "points": points})
        return metrics_service_pb2.ExportMetricsServiceResponse()


def main():
    port = int(sys.argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    emit({"kind": "listening", "port": port})
    server.wait_for_termination()


if __name__ == "__main__":
    main()
