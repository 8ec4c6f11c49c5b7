"""The control plane's gRPC server: where it listens (TLS or not), health and reflection."""

from __future__ import annotations

from concurrent import futures

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from dbnps.common.errors import UserError

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def listen(
    handler: grpc.GenericRpcHandler,
    service: str,
    *,
    bind: str,
    port: int,
    tls: tuple | None,
    interceptors: tuple = (),
    health_servicer: Health,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server with `handler` (the service named `service`), health and
    reflection on bind:port (0: any free port); `tls` = (cert path, key path) or None.
    Returns the server and the port it got; UserError when it cannot listen."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((handler,))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_reflection(server, (service, health.SERVICE_NAME))
    target = host_port(bind, port)
    try:
        if tls:
            cert, key = (p.read_bytes() for p in tls)
            creds = grpc.ssl_server_credentials([(key, cert)])
            got = server.add_secure_port(target, creds)
        else:
            got = server.add_insecure_port(target)
    except OSError as exc:
        raise UserError(f"cannot read TLS files: {exc}") from exc
    except RuntimeError:
        got = 0
    if not got:
        raise UserError(f"cannot listen on {target} for gRPC (address in use or not local)")
    server.start()
    return server, got


class Health(health.HealthServicer):
    """grpcio-health-checking's servicer, plus `List`.

    The package's generated stubs (and so reflection) carry the newer
    health.proto with `List`, but its servicer does not implement it
    (grpc/grpc#41991): clients that ask get UNIMPLEMENTED.  This answers from
    the statuses `set` was given.
    """

    def __init__(self):
        super().__init__()
        self._statuses: dict[str, int] = {}

    def set(self, service, status):
        super().set(service, status)
        self._statuses[service] = status

    def List(self, request, context):
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in dict(self._statuses).items()
            }
        )


def add_reflection(server: grpc.Server, services: tuple[str, ...]) -> None:
    """Server reflection as `grpc.reflection.v1` and `v1alpha` (grpcio-reflection: v1alpha only).

    Current grpcurl and Postman ask for v1 first.  The two protocols are the
    same messages under two package names (grpc-proto's v1/reflection.proto
    is v1alpha's, renamed), so one servicer answers both; v1's descriptor is
    v1alpha's file with the package renamed, so a client can describe v1 too.
    """
    pool = descriptor_pool.Default()
    try:
        pool.FindFileContainingSymbol(REFLECTION_V1)
    except KeyError:
        fdp = descriptor_pb2.FileDescriptorProto()
        reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
        fdp.name, fdp.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
        old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
        for msg in fdp.message_type:
            for field in msg.field:
                if field.type_name.startswith(old):  # scalar fields have none: leave unset
                    field.type_name = new + field.type_name[len(old) :]
        for svc in fdp.service:
            for m in svc.method:
                m.input_type = m.input_type.replace(old, new)
                m.output_type = m.output_type.replace(old, new)
        pool.Add(fdp)
    servicer = reflection.ReflectionServicer((*services, REFLECTION_V1, reflection.SERVICE_NAME))
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method})
            for name in (REFLECTION_V1, reflection.SERVICE_NAME)
        )
    )


def host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def connect_host(bind: str, advertise: str | None = None) -> str:
    """The address clients use to reach a server bound to `bind`.

    A wildcard bind is reached at loopback from this host (single-host jobs, as
    before), or at `advertise` when the server runs on another host than the
    one psctl launched from (`psctl start --hosts ...` writes the placement's
    server host to the run dir's ADVERTISE_FILE): 127.0.0.1 there would point
    psctl at its own machine.
    """
    if bind in ("", "0.0.0.0", "::", "[::]") and advertise:
        return advertise
    if bind in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind in ("::", "[::]"):
        return "::1"
    return bind
