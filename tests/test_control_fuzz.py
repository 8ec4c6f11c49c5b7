"""Fuzz of the gRPC control plane of a real, training job.

Garbage bytes to every method through a generic channel (raw bytes, no stubs),
oversized messages, every wrong or absent token form, and bursts of concurrent
calls.  Every call must end with a proper status code (never UNKNOWN, never a
hang), and the job must keep training throughout: its version advances and it
still serves at the end.  One job, ~20 s on 2 cores.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from jobctl import start_job, stop_quietly

from dbnps.v1 import control_pb2 as pb

C = grpc.StatusCode
CONTROL = "/dbnps.v1.Control/"
MUTATING = {"Checkpoint": pb.CheckpointRequest, "Stop": pb.StopRequest}
READ_ONLY = {"GetStatus": pb.GetStatusRequest, "ListCheckpoints": pb.ListCheckpointsRequest}
HEALTH = ["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/List"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    j = start_job(tmp_path_factory.mktemp("fuzz"), "fuzz")
    yield j
    stop_quietly(j)


def _call(ch, path: str, raw: bytes, metadata=(), timeout: float = 10.0):
    """(status code, details) of one unary call with raw request bytes."""
    fn = ch.unary_unary(path)  # no serializers: bytes in, bytes out
    try:
        fn(raw, metadata=metadata, timeout=timeout)
        return C.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def _parses(cls, raw: bytes) -> bool:
    try:
        cls().ParseFromString(raw)
        return True
    except Exception:
        return False


def _version(ch) -> int:
    code, _ = _call(ch, CONTROL + "GetStatus", b"")
    assert code == C.OK
    fn = ch.unary_unary(
        CONTROL + "GetStatus",
        request_serializer=pb.GetStatusRequest.SerializeToString,
        response_deserializer=pb.Status.FromString,
    )
    return fn(pb.GetStatusRequest(), timeout=10).version


def _garbage(rng, n: int) -> list[bytes]:
    sizes = [0, 1, 2, 5, 17, 100, 1000, 65536]
    out = [b"\xff" * k for k in (1, 7, 64)]  # invalid varints / wire types
    out += [b"\x0a\xff\xff\xff\xff\x0f"]  # a length prefix far past the end
    out += [b"\x12\x03\xc3\x28\x41"]  # a string field that is not UTF-8
    out += [rng.bytes(int(rng.choice(sizes))) for _ in range(n)]
    return out


def test_garbage_tokens_sizes_and_bursts_never_hurt_the_job(job):
    rng = np.random.default_rng(14)
    good = (("authorization", f"Bearer {job.token}"),)
    bad_tokens = [
        (),
        (("authorization", "Bearer wrong"),),
        (("authorization", job.token),),  # no scheme
        (("authorization", f"Basic {job.token}"),),
        (("authorization", f"Bearer {job.token}x"),),
        (("authorization", f"Bearer {job.token[:-1]}"),),
        (("authorization", "Bearer "),),
        (("authorization", "Bearer " + "A" * 4000),),
        (("authorization", "Bearer wrong"), ("authorization", f"Bearer {job.token}")),
    ]
    seen: dict[str, set] = {}
    t0 = time.monotonic()
    with grpc.insecure_channel(
        job.grpc, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as ch:
        v0 = _version(ch)
        payloads = _garbage(rng, 40)
        # 1. garbage to every method: read-only ones, mutating ones with every bad token
        for name, cls in READ_ONLY.items():
            for raw in payloads:
                code, details = _call(ch, CONTROL + name, raw)
                want = {C.OK} if _parses(cls, raw) else {C.INVALID_ARGUMENT}
                assert code in want | {C.INVALID_ARGUMENT}, (name, raw[:20], code, details)
                seen.setdefault(name, set()).add(code)
        for name in MUTATING:
            for md in bad_tokens:
                for raw in payloads[:8]:
                    code, details = _call(ch, CONTROL + name, raw, md)
                    assert code == C.UNAUTHENTICATED, (name, md, code, details)
        # with the real token, only bytes that cannot parse: a Stop that parsed would stop
        for name, cls in MUTATING.items():
            for raw in (r for r in payloads if not _parses(cls, r)):
                code, details = _call(ch, CONTROL + name, raw, good)
                assert code == C.INVALID_ARGUMENT, (name, raw[:20], code, details)
        for path in HEALTH:
            for raw in payloads[:20]:
                code, details = _call(ch, path, raw)
                # grpc's own servicers: undecodable bytes are its INTERNAL "deserialize" error
                assert code in (C.OK, C.INVALID_ARGUMENT, C.INTERNAL, C.NOT_FOUND), (path, code)
        code, _ = _call(ch, "/dbnps.v1.Control/NoSuchMethod", b"")
        assert code == C.UNIMPLEMENTED
        code, _ = _call(ch, "/no.such.Service/Call", b"\x00")
        assert code == C.UNIMPLEMENTED
        # 2. oversized: past the server's 4 MiB receive limit, for every method
        big = rng.bytes(5 * 1024 * 1024)
        for name in [*READ_ONLY, *MUTATING]:
            code, _ = _call(ch, CONTROL + name, big, good)
            assert code == C.RESOURCE_EXHAUSTED, (name, code)
        # a note past MAX_NOTE, valid protobuf
        raw = pb.CheckpointRequest(note="n" * 10_000).SerializeToString()
        assert _call(ch, CONTROL + "Checkpoint", raw, good)[0] == C.INVALID_ARGUMENT
        # metadata past the header limit
        code, _ = _call(ch, CONTROL + "GetStatus", b"", (("x-pad", "p" * 20_000),))
        assert code in (C.RESOURCE_EXHAUSTED, C.INTERNAL, C.UNAVAILABLE), code
        # 3. bursts: 200 GetStatus, 20 Checkpoints, 100 garbage calls, all at once
        calls = [(CONTROL + "GetStatus", b"", ())] * 200
        calls += [(CONTROL + "Checkpoint", b"", good)] * 20
        calls += [(CONTROL + "ListCheckpoints", b"\xff\xff", ())] * 50
        calls += [(CONTROL + "Stop", rng.bytes(30), ())] * 50
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(lambda c: _call(ch, *c, timeout=60), calls))
        codes = [r[0] for r in results]
        assert codes[:200] == [C.OK] * 200, set(codes[:200])
        assert set(codes[200:220]) == {C.OK}, [r for r in results[200:220] if r[0] != C.OK]
        assert set(codes[220:270]) == {C.INVALID_ARGUMENT}
        assert set(codes[270:]) == {C.UNAUTHENTICATED}
        # the job trained through all of it and still serves
        time.sleep(0.5)
        v1 = _version(ch)
        health = ch.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )(health_pb2.HealthCheckRequest(), timeout=10)
    elapsed = time.monotonic() - t0
    print(f"\nfuzz: {elapsed:.1f}s, version {v0} -> {v1}, codes {seen}")
    assert v1 > v0, (v0, v1)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    log = (job.run_dir / "job.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert not (job.run_dir / "stop-requested").exists()
    status = json.loads(job.psctl("status", "--run", job.job_id, "--json").stdout)
    assert status["ready"] and not status["stopping"]
