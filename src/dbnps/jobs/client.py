"""The job's gRPC control plane from the client side: whom to call, the call, readiness.

grpc is imported inside the functions: `psctl list` and `psctl logs` never need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dbnps.common.errors import UserError
from dbnps.jobs.registry import Run, find_run
from dbnps.runfiles import TOKEN_FILE, read_token

TOKEN_ENV = "DBNPS_TOKEN"


@dataclass
class Target:
    """A control plane to call: its address, the bearer token, the CA to trust, its run."""

    address: str
    token: str | None
    tls_ca: bytes | None
    run: Run | None

    def channel(self):
        import grpc

        if self.tls_ca is not None:
            return grpc.secure_channel(self.address, grpc.ssl_channel_credentials(self.tls_ca))
        return grpc.insecure_channel(self.address)

    def call(self, method: str, request, *, timeout: float = 10.0, auth: bool = False):
        """`method` of the Control service; every RPC error is one UserError line."""
        import grpc

        from dbnps.v1 import control_pb2_grpc

        metadata = ()
        if auth:
            if not self.token:
                raise UserError(f"no token for {self.address}: give --token-file (or ${TOKEN_ENV})")
            metadata = (("authorization", f"Bearer {self.token}"),)
        with self.channel() as ch:
            stub = control_pb2_grpc.ControlStub(ch)
            try:
                return getattr(stub, method)(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise UserError(f"bad token for {self.address}: {details}") from None
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise UserError(
                        f"cannot reach the job at {self.address} ({code.name}: {details})"
                    ) from None
                raise UserError(f"{method} failed: {code.name}: {details}") from None


def resolve_target(
    run_id: str | None,
    address: str | None,
    token_file: Path | None,
    tls_ca: Path | None,
) -> Target:
    """The control plane at `address`, or that of run `run_id` (default: the latest run).

    Token: `token_file`, else $DBNPS_TOKEN, else the run's own.  CA: `tls_ca`,
    else the certificate the run was started with.
    """
    token = os.environ.get(TOKEN_ENV) or None
    if token_file is not None:
        token = read_token(token_file)
    ca = None
    if tls_ca is not None:
        try:
            ca = tls_ca.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {tls_ca}: {exc.strerror}") from exc
    if address is not None:
        if ":" not in address:
            raise UserError(f"--address must be HOST:PORT, got {address!r}")
        return Target(address, token, ca, None)
    run = find_run(run_id)
    if not run.running():
        raise UserError(f"job {run.id} is not running: {run.describe_end()}")
    # endpoints.json first: a job restarted after a failure listens on a new port.
    address = run.endpoints().get("grpc") or run.info.get("grpc")
    if not address:
        raise UserError(
            f"job {run.id} has no control-plane address yet (starting or restarting; "
            "see `psctl logs`)"
        )
    if token is None and (run.dir / TOKEN_FILE).exists():
        token = read_token(run.dir / TOKEN_FILE)
    if ca is None and run.info.get("tls_cert"):
        try:
            ca = Path(run.info["tls_cert"]).read_bytes()
        except OSError as exc:  # moved or removed since `psctl start`
            raise UserError(
                f"job {run.id} serves TLS, but its certificate {run.info['tls_cert']} cannot "
                f"be read ({exc.strerror}); give the CA with --tls-ca"
            ) from None
    return Target(address, token, ca, run)


def health(address: str, tls_ca: bytes | None, timeout: float = 2.0) -> str | None:
    """The grpc.health.v1 status name of `address` ("SERVING", ...), or None if unreachable."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with Target(address, None, tls_ca, None).channel() as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def get_status(target: Target):
    """The job's GetStatusResponse."""
    from dbnps.v1 import control_pb2 as pb

    return target.call("GetStatus", pb.GetStatusRequest())


def checkpoint_now(target: Target, note: str = ""):
    """Write a checkpoint now (Checkpoint RPC); its CheckpointResponse."""
    from dbnps.v1 import control_pb2 as pb

    return target.call("Checkpoint", pb.CheckpointRequest(note=note), timeout=120, auth=True)


def list_checkpoints(
    run_id: str | None, address: str | None, token_file: Path | None, tls_ca: Path | None
) -> tuple[list, str]:
    """(CheckpointInfo messages, whose): from the job, or from its run directory once
    it has ended (the store is read in this process then)."""
    if address is None:
        run = find_run(run_id)
        if not run.running():
            from dbnps.server.checkpoint.store import CheckpointStore

            store = CheckpointStore(run.dir / "checkpoints")
            return [i.message() for i in store.list()], f"job {run.id}"
    from dbnps.v1 import control_pb2 as pb

    target = resolve_target(run_id, address, token_file, tls_ca)
    reply = target.call("ListCheckpoints", pb.ListCheckpointsRequest())
    return list(reply.checkpoints), f"job {target.run.id}" if target.run else target.address
