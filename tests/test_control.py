"""Control plane end to end: `psctl start/status/checkpoint/stop` on a real detached job.

One job serves the whole module (starting one costs seconds); the tests run
in file order and the last one stops it gracefully.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import write_config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobctl import (
    LONG_JOB,
    free_port,
    job_env,
    psctl,
    session_alive,
    start_job,
    stop_quietly,
)

from dbnps.common.errors import DataError
from dbnps.server.checkpoint.format import load_checkpoint
from dbnps.v1 import control_pb2 as pb
from dbnps.v1 import control_pb2_grpc as pbg

REPO = Path(__file__).resolve().parents[1]
JOB_ID = "ctl-test"


def test_generated_proto_code_is_current(tmp_path):
    """`make proto` output is checked in: regenerate and compare byte for byte."""
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iproto",
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        "proto/dbnps/v1/control.proto",
    ]
    subprocess.run(cmd, cwd=REPO, check=True)
    names = ["control_pb2.py", "control_pb2.pyi", "control_pb2_grpc.py"]
    match, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "dbnps" / "v1", REPO / "src" / "dbnps" / "v1", names, shallow=False
    )
    assert match == names, f"stale generated files {mismatch + errors}: run `make proto`"


def test_user_errors_are_one_line(tmp_path):
    env = job_env(tmp_path / "state")
    res = psctl("status", "--run", "nope", env=env)
    assert res.returncode != 0
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "nope" in res.stderr
    with socket.socket() as s:  # a port that is taken
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = psctl("start", "--grpc-port", str(port), "--job-id", "x", env=env)
    assert res.returncode != 0
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert str(port) in res.stderr
    assert not (tmp_path / "state" / "runs" / "x").exists()


def test_start_reports_a_job_that_dies(tmp_path):
    """192.0.2.1 (TEST-NET-1) is not local: rank 0 cannot listen, the job ends, psctl says why."""
    cfg = write_config(tmp_path / "c.toml", LONG_JOB)
    env = job_env(tmp_path / "state")
    res = psctl("start", "--config", str(cfg), "--bind", "192.0.2.1", "--job-id", "dies", env=env)
    log = (tmp_path / "state" / "runs" / "dies" / "job.log").read_text()
    assert res.returncode != 0
    assert res.stderr.startswith("error: job dies exited"), res.stderr + log
    assert res.stderr.count("\n") == 1, res.stderr
    assert "job.log" in res.stderr and "192.0.2.1" in res.stderr
    info = json.loads((tmp_path / "state" / "runs" / "dies" / "job.json").read_text())
    assert not session_alive(info["sid"])


class HealthWatcher(threading.Thread):
    """Watches grpc.health.v1 from the moment rank 0 publishes its endpoint."""

    def __init__(self, run_dir: Path):
        super().__init__(daemon=True)
        self.run_dir = run_dir
        self.seen: list[str] = []
        self.stop_at = time.monotonic() + 120

    def run(self):
        ep = self.run_dir / "endpoints.json"
        while not ep.exists() and time.monotonic() < self.stop_at:
            time.sleep(0.01)
        addr = json.loads(ep.read_text())["grpc"]
        with grpc.insecure_channel(addr) as ch:
            stream = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service="dbnps.v1.Control"), timeout=110
            )
            try:
                for resp in stream:
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                    if not self.seen or self.seen[-1] != name:
                        self.seen.append(name)
            except grpc.RpcError:
                pass  # the server went away


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ctl")
    watcher = HealthWatcher(tmp / "state" / "runs" / JOB_ID)
    watcher.start()
    # Fixed ports: test_resume_keeps_the_addresses checks a resumed run gets them again.
    ports = ("--grpc-port", str(free_port()), "--metrics-port", str(free_port()))
    j = start_job(tmp, JOB_ID, args=ports)
    j.watcher = watcher
    yield j
    stop_quietly(j)


def _status(job) -> dict:
    res = job.psctl("status", "--run", job.job_id, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_status_reports_progress(job):
    assert job.watcher.seen[:2] == ["NOT_SERVING", "SERVING"], job.watcher.seen
    a = _status(job)
    time.sleep(0.5)
    b = _status(job)
    assert a["job_id"] == JOB_ID and a["ready"] and not a["stopping"]
    assert a["config"]["sizes"] == [784, 32, 32] and a["config"]["n_workers"] == 2
    assert int(b["version"]) > int(a["version"]) > 0
    assert int(b["updates_applied"]) > int(a["updates_applied"])
    assert (b["progress"]["phase_index"], b["progress"]["epoch"]) > (
        a["progress"]["phase_index"],
        a["progress"]["epoch"],
    )
    assert set(b["updates_rejected"]) >= {"stale", "nonfinite", "phase"}
    assert sum(int(c) for c in b["staleness"]["counts"]) == int(b["staleness"]["count"]) > 0
    assert [w["rank"] for w in b["workers"]] == [1, 2]
    for w in b["workers"]:
        assert w["alive"] and w["state"] == "running" and int(w["steps"]) > 0
        assert 0 <= w["heartbeat_age_seconds"] < 10
    assert b["has_loss"] and np.isfinite(b["loss"])
    table = job.psctl("status", "--run", job.job_id)
    assert table.returncode == 0 and "WORKER" in table.stdout and JOB_ID in table.stdout
    none = job.psctl("checkpoints", "--run", job.job_id)  # none yet: says so
    assert none.returncode == 0 and none.stdout.startswith("no checkpoints yet"), none.stdout


def test_cli_commands_are_the_lazy_map():
    """`psctl` imports a command's module on first use: the map must name every command."""
    from dbnps.cli import LAZY_COMMANDS, bench, data, jobs, plot, run, train

    found = {}
    for mod in (bench, data, jobs, plot, run, train):
        found.update({c.name: mod.__name__.rsplit(".", 1)[1] for c in mod.COMMANDS})
    assert found == LAZY_COMMANDS


def test_cli_never_touches_mpi(job, tmp_path):
    """Every command that does not launch mpiexec runs without mpi4py and leaves no shm file.

    `mpi4py.MPI` initialises a singleton MPI process on import (over a second and a
    16 MiB sm_segment file).  The segment directory is pointed at an empty folder
    (btl/sm's backing directory), so a file from this process, and only from it,
    would show up there; the import log shows whether mpi4py was loaded at all.
    """
    shm = tmp_path / "shm"
    shm.mkdir()
    env = {**job.env, "OMPI_MCA_btl_sm_backing_directory": str(shm)}
    run = ("--run", job.job_id)
    for args in [
        ("status", *run),
        ("status", "--json", *run),
        ("checkpoints", *run),
        ("list",),
        ("logs", *run),
        ("--help",),
        ("status", "--run", "no-such-run"),  # the error path too
    ]:
        code = (
            f"import sys; sys.argv = ['psctl', *{list(args)!r}]; from dbnps.cli import main; main()"
        )
        res = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        modules = {line.split("|")[-1].strip() for line in res.stderr.splitlines()}
        assert res.returncode == (2 if "no-such-run" in args else 0), (args, res.stderr[-2000:])
        assert not {m for m in modules if m.startswith("mpi4py")}, args
        if args[0] in ("status", "list"):
            assert "numpy" not in modules, args  # the lazy command map keeps these light
        assert list(shm.iterdir()) == [], args
    # the check can fail: a process that imports mpi4py.MPI leaves its segment there
    subprocess.run(
        [sys.executable, "-c", "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"],
        env=env,
        check=True,
        timeout=60,
    )
    assert [p.name for p in shm.iterdir() if p.name.startswith("sm_segment")], "no segment"


def test_mutating_rpcs_need_the_token(job):
    with grpc.insecure_channel(job.grpc) as ch:
        stub = pbg.ControlStub(ch)
        for md in [(), (("authorization", "Bearer wrong"),), (("authorization", job.token),)]:
            for call, req in [
                (stub.Checkpoint, pb.CheckpointRequest()),
                (stub.Stop, pb.StopRequest()),
            ]:
                with pytest.raises(grpc.RpcError) as e:
                    call(req, metadata=md, timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # read-only calls need no token
        assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).ready
        stub.ListCheckpoints(pb.ListCheckpointsRequest(), timeout=10)
        # invalid fields and undecodable bytes, with a good token: INVALID_ARGUMENT, job lives on
        good = (("authorization", f"Bearer {job.token}"),)
        with pytest.raises(grpc.RpcError) as e:
            stub.Stop(pb.StopRequest(timeout_seconds=-1), metadata=good, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            stub.ListCheckpoints(pb.ListCheckpointsRequest(limit=-2), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for method in ("GetStatus", "Stop"):
            raw = ch.unary_unary(f"/dbnps.v1.Control/{method}")
            with pytest.raises(grpc.RpcError) as e:
                raw(b"\xff\xff\xff\xff", metadata=good, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).ready
    bad = job.run_dir.parent / "bad-token"
    bad.write_text("nope\n")
    res = job.psctl("checkpoint", "--run", job.job_id, "--token-file", str(bad))
    assert res.returncode != 0 and res.stderr.startswith("error: bad token"), res.stderr


def _reflect(channel, version: str, request):
    """One reflection request over `grpc.reflection.<version>` (v1 and v1alpha share messages)."""
    from grpc_reflection.v1alpha import reflection_pb2

    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return next(iter(call(iter([request]), timeout=10)))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_the_services(job, version):
    """What grpcurl does: list the services, then fetch a service's descriptor."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(job.grpc) as ch:
        resp = _reflect(ch, version, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in resp.list_services_response.service}
        assert names == {
            "dbnps.v1.Control",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        for symbol in sorted(names):
            req = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
            resp = _reflect(ch, version, req)
            assert resp.WhichOneof("message_response") == "file_descriptor_response", symbol
            files = [
                descriptor_pb2.FileDescriptorProto.FromString(b)
                for b in resp.file_descriptor_response.file_descriptor_proto
            ]
            package, _, service = symbol.rpartition(".")
            [own] = [f for f in files if f.package == package]
            assert service in [s.name for s in own.service]


def test_health_list_answers(job):
    """List is in the health service's descriptor, so it is served, not UNIMPLEMENTED."""
    with grpc.insecure_channel(job.grpc) as ch:
        resp = health_pb2_grpc.HealthStub(ch).List(health_pb2.HealthListRequest(), timeout=10)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert {k: v.status for k, v in resp.statuses.items()} == {
        "": serving,
        "dbnps.v1.Control": serving,
    }


def test_checkpoint_writes_a_verified_file(job):
    res = job.psctl("checkpoint", "--run", job.job_id, "--note", "by test")
    assert res.returncode == 0, res.stderr
    path = Path(res.stdout.split()[0])
    assert path.parent == job.run_dir / "checkpoints" and path.is_file()
    params, rule, meta = load_checkpoint(path)
    assert params.dtype == np.float32 and params.size == meta["n_params"] > 0
    assert np.isfinite(params).all()
    assert set(rule) == {"v"} and meta["update_rule"] == "momentum"  # the default rule
    assert meta["note"] == "by test" and meta["version"] > 0 and meta["phase_name"] == "finetune"
    listed = job.psctl("checkpoints", "--run", job.job_id, "--json")
    assert str(path) in [c["path"] for c in json.loads(listed.stdout)]
    # a damaged file, or a well-formed one whose contents do not match the digest, is refused
    bad = job.run_dir.parent / "bad.npz"
    shutil.copy(path, bad)
    with open(bad, "r+b") as f:
        f.seek(-200, 2)
        f.write(b"\0" * 8)
    with pytest.raises(DataError):
        load_checkpoint(bad)
    with np.load(path) as z:
        entries = {k: z[k] for k in z.files}
    entries["params"][0] += 1
    np.savez(bad, **entries)
    with pytest.raises(DataError, match="checksum"):
        load_checkpoint(bad)


def test_graceful_stop(job):
    sid = job.info["sid"]
    assert session_alive(sid)
    res = job.psctl("stop", "--run", job.job_id)
    assert res.returncode == 0, res.stderr
    assert "exit status 0" in res.stdout
    final = Path(res.stdout.split("final checkpoint ")[1].split()[0])
    _, _, meta = load_checkpoint(final)
    assert meta["stopped"] and meta["note"] == "stop" and meta["phase_name"] == "finetune"
    assert json.loads((job.run_dir / "exit.json").read_text())["returncode"] == 0
    assert json.loads((job.run_dir / "summary.json").read_text())["applied"] >= meta["version"]
    deadline = time.monotonic() + 10
    while session_alive(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not session_alive(sid), "processes of the job are left over"
    job.watcher.join(10)
    assert job.watcher.seen == ["NOT_SERVING", "SERVING", "NOT_SERVING"]
    res = job.psctl("status", "--run", job.job_id)
    assert res.returncode != 0 and "not running" in res.stderr
    listed = json.loads(job.psctl("list", "--json").stdout)
    assert [(r["job_id"], r["state"]) for r in listed] == [(JOB_ID, "exited 0")]


def test_run_files_are_private(job):
    """Like the token: the run dir is 0700 and every file in it 0600 (checkpoints, log,
    endpoints, job.json, summary, model, exit.json); the Prometheus target stays
    readable (a Prometheus of another user reads it) while the job runs."""
    assert job.run_dir.stat().st_mode & 0o777 == 0o700
    files = [p for p in job.run_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"job.json", "token", "job.log", "exit.json", "summary.json", "model.npz"} <= names
    assert any(p.parent.name == "checkpoints" for p in files)
    loose = {str(p.relative_to(job.run_dir)): oct(p.stat().st_mode & 0o777) for p in files}
    assert {k: v for k, v in loose.items() if v != "0o600"} == {}, loose
    for d in (p for p in job.run_dir.rglob("*") if p.is_dir()):
        assert d.stat().st_mode & 0o077 == 0, d


def test_resume_keeps_the_addresses(job):
    """`start --resume` without port options listens where the resumed run did."""
    res = job.psctl("start", "--resume", job.job_id, "--job-id", "ctl-resumed", "--timeout", "80")
    assert res.returncode == 0, res.stdout + res.stderr
    info = json.loads((job.run_dir.parent / "ctl-resumed" / "job.json").read_text())
    try:
        assert (info["grpc"], info["metrics"]) == (job.grpc, job.metrics)
        # the Prometheus target is the one file meant for another user (Prometheus)
        assert Path(info["prometheus_target"]).stat().st_mode & 0o777 == 0o644
        text = job.psctl("status", "--run", "ctl-resumed")
        assert text.returncode == 0, text.stderr
        assert "(since resume)" in text.stdout and "resumed from" in text.stdout, text.stdout
        status = json.loads(job.psctl("status", "--run", "ctl-resumed", "--json").stdout)
        # fully structured: the resolved config is an object, not JSON text in a string
        assert status["config"]["resolved"]["model"]["sizes"] == [784, 32, 32]
        assert "config_json" not in status["config"]
    finally:
        job.psctl("stop", "--force", "--run", "ctl-resumed")
    assert (
        json.loads((job.run_dir.parent / "ctl-resumed" / "exit.json").read_text())["stopped_by"]
        == "psctl stop --force"
    )


def _self_signed(cert: Path, key: Path) -> None:
    """A self-signed certificate for 127.0.0.1 (the `cryptography` package, a dev
    dependency: a fresh machine may have no `openssl` binary, and the test must not skip)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    pk = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    crt = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pk.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(pk, hashes.SHA256())
    )
    cert.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        pk.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def test_tls_control_plane(tmp_path):
    """The control plane alone (no MPI): TLS with a self-signed certificate; not-ready answers."""
    from dbnps.common.config import Config
    from dbnps.server.control.plane import ControlPlane

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    _self_signed(cert, key)
    cp = ControlPlane(
        Config(),
        job_id="tls",
        run_dir=tmp_path,
        token="t0k",
        tls_cert=cert,
        tls_key=key,
        log=lambda *a: None,
    )
    cp.start()
    try:
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(cp.grpc_address, creds) as ch:
            stub = pbg.ControlStub(ch)
            s = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
            assert (s.job_id, s.ready, s.phase) == ("tls", False, "starting")
            h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert h.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as e:  # windows not ready yet
                stub.Checkpoint(
                    pb.CheckpointRequest(), metadata=(("authorization", "Bearer t0k"),), timeout=10
                )
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(cp.grpc_address) as ch, pytest.raises(grpc.RpcError):
            pbg.ControlStub(ch).GetStatus(pb.GetStatusRequest(), timeout=3)
    finally:
        cp.close(grace_s=0)


def test_control_plane_says_where_it_listens(tmp_path):
    """Bound to every interface: the log names 0.0.0.0, and the address local clients use;
    before the windows exist, status shows no made-up phase or worker count."""
    from dbnps.common.config import Config
    from dbnps.jobs.format import status_text as _fmt_status
    from dbnps.server.control.plane import ControlPlane

    lines: list[str] = []
    cp = ControlPlane(
        Config(), job_id="wild", run_dir=tmp_path, bind="0.0.0.0", metrics_port=0, log=lines.append
    )
    cp.start()
    try:
        port = int(cp.grpc_address.rsplit(":", 1)[1])
        mport = int(cp.metrics_address.rsplit(":", 1)[1])
        [line] = [x for x in lines if "listening" in x]
        assert f"gRPC listening on 0.0.0.0:{port}" in line, line
        assert f"metrics on http://0.0.0.0:{mport}/metrics" in line, line
        assert f"from this host: 127.0.0.1:{port}" in line, line
        text = _fmt_status(cp.status_message(), {"servers": 1, "workers": 4})
        assert "starting" in text and "1 server(s), 4 worker(s) requested" in text, text
        assert "(1/0)" not in text and "0 worker(s)" not in text, text
    finally:
        cp.close(grace_s=0)


def test_a_refused_stop_leaves_no_stop_marker(tmp_path):
    """Stop before the windows exist is refused (UNAVAILABLE): the supervisor must not
    find a `stop-requested` marker, or it would take a later crash for a requested stop
    and not restart the job (the marker was written before the request was accepted)."""
    from dbnps.common.config import Config
    from dbnps.runfiles import STOP_MARKER
    from dbnps.server.control.plane import ControlPlane

    cp = ControlPlane(Config(), job_id="early", run_dir=tmp_path, token="t0k", log=lambda *a: None)
    cp.start()
    try:
        with grpc.insecure_channel(cp.grpc_address) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pbg.ControlStub(ch).Stop(
                    pb.StopRequest(), metadata=(("authorization", "Bearer t0k"),), timeout=10
                )
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        cp.close(grace_s=0)
    assert not (tmp_path / STOP_MARKER).exists()


def test_a_remote_wildcard_server_advertises_its_host_name(tmp_path):
    """`psctl start --hosts` with the server on another host writes that host's name to
    the run dir; rank 0 bound to 0.0.0.0 then advertises it in endpoints.json (was
    127.0.0.1: psctl on the launching host would dial itself).  Here the "other host"
    is this machine under its own name, so a client can follow the address."""
    from dbnps.common.config import Config
    from dbnps.runfiles import write_advertise
    from dbnps.server.control.plane import ControlPlane

    host = socket.gethostname()
    write_advertise(tmp_path, host)
    lines: list[str] = []
    cp = ControlPlane(
        Config(), job_id="far", run_dir=tmp_path, bind="0.0.0.0", metrics_port=0, log=lines.append
    )
    cp.start()
    try:
        ep = json.loads((tmp_path / "endpoints.json").read_text())
        assert ep["grpc"].rsplit(":", 1)[0] == host, ep
        assert ep["metrics"].rsplit(":", 1)[0] == host, ep
        assert any(f"advertised as {host}:" in x for x in lines), lines
        with grpc.insecure_channel(ep["grpc"]) as ch:
            s = pbg.ControlStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10)
        assert s.job_id == "far"
    finally:
        cp.close(grace_s=0)
    # an explicit bind address is advertised as it is, file or not
    cp = ControlPlane(Config(), job_id="lo", run_dir=tmp_path, bind="127.0.0.1", log=lines.append)
    cp.start()
    try:
        assert cp.grpc_address.startswith("127.0.0.1:")
    finally:
        cp.close(grace_s=0)
