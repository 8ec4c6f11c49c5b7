"""The `dbnps.v1.Control` service on the wire: decode, check arguments, reply, map errors.

What each call does is the control plane's (`plane.ControlPlane`); the token
check is in front of it (`auth.TokenAuth`, for the calls in MUTATING).
Request bytes are decoded here, not by gRPC, so a malformed request is
INVALID_ARGUMENT, never an exception in the server.
"""

from __future__ import annotations

import math
import time
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError

from dbnps.server.control.mainthread import Unavailable
from dbnps.v1 import control_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Control"].full_name  # "dbnps.v1.Control"
MUTATING = frozenset({f"/{SERVICE}/Checkpoint", f"/{SERVICE}/Stop"})
MAX_NOTE = 256
MAX_TIMEOUT_S = 3600.0


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ControlServicer:
    """Answers the Control RPCs from `plane`'s operations (`status_message`,
    `checkpoint`, `store`, `request_stop`, `final_checkpoint`); gRPC threads only."""

    def __init__(self, plane, log=print):
        self.plane = plane
        self.log = log

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn, req_cls, resp_cls):
            def handler(raw: bytes, context: grpc.ServicerContext):
                try:
                    req = req_cls()
                    try:
                        req.ParseFromString(raw)
                    except (DecodeError, RuntimeError, ValueError) as exc:
                        raise RpcError(
                            grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}"
                        ) from None
                    return fn(req, context)
                except RpcError as exc:
                    code, msg = exc.code, exc.message
                except Unavailable as exc:
                    code, msg = grpc.StatusCode.UNAVAILABLE, str(exc)
                except Exception as exc:
                    self.log(f"[control] {fn.__name__} failed: {exc!r}")
                    code, msg = grpc.StatusCode.INTERNAL, f"internal error: {exc}"
                context.abort(code, msg)

            return grpc.unary_unary_rpc_method_handler(
                handler, request_deserializer=None, response_serializer=resp_cls.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetStatus": unary(self.get_status, pb.GetStatusRequest, pb.Status),
                "Checkpoint": unary(self.checkpoint, pb.CheckpointRequest, pb.CheckpointReply),
                "ListCheckpoints": unary(
                    self.list_checkpoints, pb.ListCheckpointsRequest, pb.ListCheckpointsReply
                ),
                "Stop": unary(self.stop, pb.StopRequest, pb.StopReply),
            },
        )

    def get_status(self, req: pb.GetStatusRequest, context) -> pb.Status:
        return self.plane.status_message(include_history=req.include_history)

    def checkpoint(self, req: pb.CheckpointRequest, context) -> pb.CheckpointReply:
        if len(req.note) > MAX_NOTE:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, f"note longer than {MAX_NOTE} characters"
            )
        t0 = time.perf_counter()
        info = self.plane.checkpoint(req.note)
        return pb.CheckpointReply(
            checkpoint=info.message(), duration_seconds=time.perf_counter() - t0
        )

    def list_checkpoints(self, req: pb.ListCheckpointsRequest, context) -> pb.ListCheckpointsReply:
        if req.limit < 0:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "limit must be >= 0")
        infos = self.plane.store.list()
        if req.limit:
            infos = infos[-req.limit :]
        return pb.ListCheckpointsReply(checkpoints=[i.message() for i in infos])

    def stop(self, req: pb.StopRequest, context) -> pb.StopReply:
        t = req.timeout_seconds
        if not math.isfinite(t) or t < 0 or t > MAX_TIMEOUT_S:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout_seconds must be in [0, {MAX_TIMEOUT_S:.0f}], got {t}",
            )
        timeout = t or 120.0
        self.plane.request_stop(timeout)
        reply = pb.StopReply(stopping=True)
        if req.wait:
            try:
                info = self.plane.final_checkpoint(timeout)
            except futures.TimeoutError:
                raise RpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"stopping, but the final checkpoint was not written within {timeout:.0f}s",
                ) from None
            if info is not None:
                reply.final_checkpoint.CopyFrom(info.message())
        return reply
