"""deploy/k8s/mpijob.yaml: valid against the Kubeflow MPIJob v2beta1 CRD, and free of the
mistakes that keep such a job from starting on a real cluster.

The schema (tests/data/mpijob-v2beta1.schema.json) is the CRD's openAPIV3Schema from
kubeflow/mpi-operator (commit named in the file), descriptions removed.  Validation is
strict like `kubectl apply --validate=strict`: an object schema with `properties` admits
no other field unless it says `x-kubernetes-preserve-unknown-fields`.  No cluster here:
the start-up itself is walked through in deploy/README.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
SCHEMA = Path(__file__).parent / "data" / "mpijob-v2beta1.schema.json"


def _strict(schema):
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema with unknown fields refused."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((K8S / "mpijob.yaml").read_text())}


@pytest.fixture(scope="module")
def validator():
    data = json.loads(SCHEMA.read_text())
    assert (data["group"], data["kind"], data["version"]) == ("kubeflow.org", "MPIJob", "v2beta1")
    schema = _strict(data["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_mpijob_is_valid_against_the_crd(docs, validator):
    job = docs["MPIJob"]
    assert job["apiVersion"] == "kubeflow.org/v2beta1"
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job)
    ]
    assert errors == []


def test_the_validator_can_fail(docs, validator):
    """A misspelt field, a wrong type, a bad enum value: each is an error."""
    job = json.loads(json.dumps(docs["MPIJob"]))
    job["spec"]["slotsPerWorkers"] = 5
    job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] = "one"
    job["spec"]["mpiImplementation"] = "OpenMPI5"
    job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0][
        "readinesProbe"
    ] = {}
    messages = " ".join(e.message for e in validator.iter_errors(job))
    for needle in ("slotsPerWorkers", "'one'", "OpenMPI5", "readinesProbe"):
        assert needle in messages, (needle, messages)


def _pod(job: dict, role: str) -> dict:
    return job["spec"]["mpiReplicaSpecs"][role]["template"]["spec"]


def _sections(args: list[str]) -> tuple[list[str], list[str], list[str]]:
    """mpiexec args -> (mpiexec options, server rank's command, worker ranks' command)."""
    colon = args.index(":")
    first, workers = args[:colon], args[colon + 1 :]
    n = first.index("-n")
    return first[:n], first[n:], workers


def test_the_job_would_start(docs):
    """The start-up failures of the old manifest (issue 17), one check each."""
    job = docs["MPIJob"]
    launcher, worker = _pod(job, "Launcher"), _pod(job, "Worker")
    [lc], [wc] = launcher["containers"], worker["containers"]
    mpi, server, workers = _sections(lc["args"])
    # Open MPI 5 ignores the operator's OMPI_MCA_orte_default_hostfile: name the file.
    assert mpi[mpi.index("--hostfile") + 1] == "/etc/mpi/hostfile"
    assert "--oversubscribe" not in mpi  # would let mpiexec put ranks on the launcher pod
    # Slots: every rank fits the worker pods (none on the launcher).
    n_server, n_workers = int(server[1]), int(workers[1])
    replicas = job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"]
    assert job["spec"]["slotsPerWorker"] * replicas == n_server + n_workers
    # The worker pod runs sshd (the launcher's prted gets there over ssh), as non-root.
    assert wc["command"] == ["/usr/sbin/sshd"] and wc["args"][:1] == ["-De"]
    home = job["spec"]["sshAuthMountPath"].rsplit("/", 1)[0]
    assert (
        home == "/home/dbnps" and wc["args"][wc["args"].index("-f") + 1] == f"{home}/.sshd_config"
    )
    for pod in (launcher, worker):
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] and ctx["runAsUser"] != 0
    # No readiness deadlock: the worker is Ready when sshd answers, and the launcher
    # waits for that; gRPC (served only once the launcher started the ranks) is no probe.
    assert job["spec"]["launcherCreationPolicy"] == "WaitForWorkersReady"
    ssh_port = next(p["containerPort"] for p in wc["ports"] if p["name"] == "ssh")
    assert wc["readinessProbe"] == {"tcpSocket": {"port": ssh_port}, "periodSeconds": 2}
    # Runs on a PersistentVolumeClaim (cleanPodPolicy deletes the pods, not the data).
    volumes = {v["name"]: v for v in worker["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in wc["volumeMounts"]}
    run_dir = server[server.index("--run-dir") + 1]
    runs = volumes[mounts["/" + run_dir.split("/")[1]]]
    assert (
        runs["persistentVolumeClaim"]["claimName"]
        == docs["PersistentVolumeClaim"]["metadata"]["name"]
    )
    for flag in ("--out", "--summary"):
        assert server[server.index(flag) + 1].startswith(run_dir + "/")
    # /dev/shm sized: ~112 MiB for 1 server + 4 workers of this model, 64 MiB by default.
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and _mib(shm["sizeLimit"]) >= 112
    # The config the ranks read is mounted where they read it, and is a valid job config.
    config = server[server.index("--config") + 1]
    assert workers[workers.index("--config") + 1] == config
    assert volumes[mounts[str(Path(config).parent)]]["configMap"]["name"] == "dbnps-config"
    # Reachable: bound to the pod's address, ports match the Service and the annotations.
    assert server[server.index("--bind") + 1] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in wc["ports"]}
    assert ports["grpc"] == int(server[server.index("--grpc-port") + 1])
    assert ports["metrics"] == int(server[server.index("--metrics-port") + 1])
    svc = docs["Service"]["spec"]
    assert (
        svc["selector"].items()
        <= job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"].items()
    )
    assert {p["targetPort"] for p in svc["ports"]} == {"grpc", "metrics"}
    notes = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == ports["metrics"]


def _mib(quantity: str) -> float:
    m = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert m, quantity
    return int(m[1]) * (1024 if m[2] == "Gi" else 1)


def test_the_rank_command_lines_parse(docs, tmp_path):
    """Every option given to the ranks is one `python -m dbnps.server/worker` knows."""
    from dbnps.common.config import load

    [lc] = _pod(docs["MPIJob"], "Launcher")["containers"]
    _, server, workers = _sections(lc["args"])
    config = tmp_path / "job.toml"
    config.write_text(docs["ConfigMap"]["data"]["job.toml"])
    load(config)  # a bad key or value raises ConfigError
    # `--help` imports mpi4py; its shared-memory segment goes to tmp, not /dev/shm.
    env = {**os.environ, "OMPI_MCA_btl_sm_backing_directory": str(tmp_path)}
    for cmd in (server, workers):
        module = cmd[cmd.index("-m") + 1]
        res = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert res.returncode == 0, res.stderr
        known = set(re.findall(r"--[a-z][a-z-]+", res.stdout))
        given = {a for a in cmd if a.startswith("--")}
        assert given <= known, (module, given - known)


def test_containerfile_matches_the_manifest(docs):
    text = (REPO / "Containerfile").read_text()
    job = docs["MPIJob"]
    [lc] = _pod(job, "Launcher")["containers"]
    [wc] = _pod(job, "Worker")["containers"]
    mpi, server, _ = _sections(lc["args"])
    prefix = mpi[mpi.index("--prefix") + 1]
    assert lc["command"] == [f"{prefix}/bin/mpiexec"] and server[2] == f"{prefix}/bin/python"
    assert f"python -m venv {prefix}" in text and f"{prefix}/bin/pip install" in text
    assert "openssh-server" in text and "openssh-client" in text
    ssh_port = next(p["containerPort"] for p in wc["ports"] if p["name"] == "ssh")
    assert f"ARG SSH_PORT={ssh_port}" in text
    uid = _pod(job, "Worker")["securityContext"]["runAsUser"]
    assert f"useradd --uid {uid}" in text and f"USER {uid}" in text
    home = job["spec"]["sshAuthMountPath"].rsplit("/", 1)[0]
    assert f"HostKey {home}/.ssh/id_rsa" in text and f"> {home}/.sshd_config" in text
    # the data travels in the image (package data), checked at build time
    assert "COPY data /src/data" in text and "psctl data verify" in text


def test_kubernetes_discovery_keeps_the_annotated_pods(docs):
    """The kubernetes_sd example's relabelling applied to the worker pod's annotations."""
    config = yaml.safe_load((K8S / "prometheus-kubernetes.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    meta = docs["MPIJob"]["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["metadata"]
    labels = {
        f"__meta_kubernetes_pod_annotation_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
        for k, v in meta["annotations"].items()
    }
    labels["__address__"] = "10.0.0.7:2222"  # a pod target: its IP and first declared port
    for rule in job["relabel_configs"]:
        values = ";".join(labels.get(s, "") for s in rule.get("source_labels", []))
        m = re.fullmatch(rule.get("regex", "(.*)"), values)
        if rule.get("action") == "keep":
            assert m, rule
        elif m and "target_label" in rule:
            repl = rule.get("replacement", "$1")
            labels[rule["target_label"]] = re.sub(r"\$(\d+)", lambda g, m=m: m[int(g[1])], repl)
    assert labels["__address__"] == "10.0.0.7:9464"
    assert labels["__metrics_path__"] == "/metrics"
