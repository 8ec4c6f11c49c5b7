"""Emulated hosts for the multi-host tests: Linux network namespaces on a bridge.

Each host is a network namespace (`ip netns`) with its own veth on a bridge
in the root namespace and its own address; every process PRRTE starts there
runs under `unshare --uts` with the host's name as hostname, so Open MPI sees
N hosts: with one `prted` per namespace, `btl/sm` and `osc/sm` decline between
them and the job uses `osc/rdma` over `btl/tcp`, as between real machines.

`mpiexec` itself runs in the root namespace (a "login node" on the bridge,
address .1) and reaches the hosts through an ssh-agent script that PRRTE
calls as `AGENT HOST COMMAND...` (`PRTE_MCA_plm_ssh_agent`; PRRTE 3 ignores
the old name `plm_rsh_agent`).  The script maps the host name to its
namespace itself, so nothing needs to resolve and /etc/hosts is untouched.

Names carry the creating process id (`dbnps<pid>-h1`, bridge `dbnps<pid>br`),
so two test sessions never collide, and `cleanup_stale()` removes what a
killed earlier session left behind (its pid is gone).  Everything needs root
and `ip` (iproute2); `requirements_error()` says why when they are missing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "dbnps"
_OWNED = re.compile(rf"^{PREFIX}(\d+)(?:-h\d+|br|v\d+)$")
HOW_TO_RUN = (
    "the multi-host tests need root and iproute2's `ip` (network namespaces): "
    "run `sudo make test`, or as root `apt-get install iproute2` then "
    "`.venv/bin/python -m pytest -m multihost` (see README, Development)"
)


def requirements_error() -> str | None:
    """Why this machine cannot emulate hosts, or None when it can."""
    if os.geteuid() != 0:
        return f"not running as root (uid {os.geteuid()}); {HOW_TO_RUN}"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found on PATH; {HOW_TO_RUN}"
    return None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_pids(ns: str) -> list[int]:
    """Every process whose network namespace is `ns`."""
    out = _ip("netns", "pids", ns, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def kill_namespace(ns: str, timeout_s: float = 10.0) -> list[int]:
    """SIGKILL every process in `ns` (a whole host going down); returns the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = namespace_pids(ns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed += [p for p in pids if p not in killed]
        time.sleep(0.05)
    return killed


def _remove(ns_names: list[str], links: list[str]) -> None:
    for ns in ns_names:
        kill_namespace(ns)
        _ip("netns", "delete", ns, check=False)  # its veth end goes with it
    for link in links:
        _ip("link", "delete", link, check=False)


def cleanup_stale() -> list[str]:
    """Remove namespaces and links of earlier sessions whose process is gone."""
    stale_ns, stale_links = [], []
    listed = _ip("netns", "list", check=False).stdout.splitlines()
    for line in listed:
        name = line.split()[0] if line.split() else ""
        m = _OWNED.match(name)
        if m and not _alive(int(m.group(1))):
            stale_ns.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        m = _OWNED.match(name)
        if m and not _alive(int(m.group(1))):
            stale_links.append(name)
    _remove(stale_ns, stale_links)
    return stale_ns + stale_links


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.X.0/24 no interface of this machine uses yet."""
    used = _ip("-4", "-o", "addr", "show", check=False).stdout
    for x in range(1, 255):
        net = ipaddress.IPv4Network(f"10.213.{x}.0/24")
        if f" 10.213.{x}." not in used:
            return net
    raise RuntimeError("no free 10.213.X.0/24 subnet for the emulated hosts")


AGENT = """#!/bin/sh
# ssh agent for PRRTE (PRTE_MCA_plm_ssh_agent): AGENT HOST COMMAND...
# runs COMMAND as `ssh HOST COMMAND` would (one shell line), inside HOST's
# network namespace with HOST as its hostname.
host=$1; shift
case "$host" in
{cases}
  *) echo "netns agent: unknown host $host" >&2; exit 255;;
esac
# Not exec: this process stays in the launching namespace, like an ssh client,
# and ends as ssh does when the remote side dies (128 + signal), so mpiexec
# learns of a host that went down with a non-zero status.
ip netns exec "$ns" unshare --uts -- /bin/sh -c 'hostname "$1"; shift; eval "$*"' sh "$host" "$@"
exit $?
"""


@dataclass
class Hosts:
    """N emulated hosts; `env()` is what mpiexec needs to start ranks on them."""

    names: list[str]  # host names, as given to --host / --hosts
    namespaces: dict[str, str]  # host -> netns name
    addresses: dict[str, str]  # host -> IPv4 address on the bridge
    subnet: str
    bridge: str
    workdir: Path
    agent: Path = field(init=False)

    def __post_init__(self) -> None:
        self.agent = self.workdir / "netns-agent.sh"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        env["PRTE_MCA_plm_ssh_agent"] = str(self.agent)
        # The daemons' and ranks' traffic stays on the bridge (mpiexec's host has other
        # interfaces the namespaces cannot reach).
        env["PRTE_MCA_oob_tcp_if_include"] = self.subnet
        env["OMPI_MCA_btl_tcp_if_include"] = self.subnet
        return env

    def kill_host(self, host: str) -> list[int]:
        """A whole host dies: SIGKILL every process in its namespace (prted and ranks)."""
        return kill_namespace(self.namespaces[host])

    def pids(self, host: str) -> list[int]:
        return namespace_pids(self.namespaces[host])

    def kill_ranks(self, host: str, module: str) -> list[int]:
        """SIGKILL the processes of `host` running `python -m module` (its daemon lives)."""
        out = []
        for pid in self.pids(host):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"-m" in cmd and module.encode() in cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                out.append(pid)
        return out

    def teardown(self) -> None:
        _remove(list(self.namespaces.values()), [self.bridge])
        shutil.rmtree(self.workdir, ignore_errors=True)


def create_hosts(n: int) -> Hosts:
    """Create hosts h1..hN (namespaces, veths, bridge, agent); torn down on any failure."""
    cleanup_stale()
    pid = os.getpid()
    bridge = f"{PREFIX}{pid}br"
    net = _free_subnet()
    addrs = list(net.hosts())
    names = [f"h{i}" for i in range(1, n + 1)]
    hosts = Hosts(
        names=names,
        namespaces={h: f"{PREFIX}{pid}-{h}" for h in names},
        addresses={h: str(addrs[i + 10]) for i, h in enumerate(names)},
        subnet=str(net),
        bridge=bridge,
        workdir=Path(tempfile.mkdtemp(prefix="dbnps-netns-")),
    )
    try:
        _ip("link", "add", "name", bridge, "type", "bridge")
        _ip("addr", "add", f"{addrs[0]}/{net.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, h in enumerate(names, 1):
            ns, veth = hosts.namespaces[h], f"{PREFIX}{pid}v{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            _ip("link", "set", f"{veth}p", "netns", ns)
            _ip("link", "set", veth, "master", bridge)
            _ip("link", "set", veth, "up")
            _ip("link", "set", f"{veth}p", "name", "eth0", ns=ns)
            _ip("addr", "add", f"{hosts.addresses[h]}/{net.prefixlen}", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
        cases = "\n".join(f"  {h}) ns={hosts.namespaces[h]};;" for h in names)
        hosts.agent.write_text(AGENT.format(cases=cases))
        hosts.agent.chmod(hosts.agent.stat().st_mode | stat.S_IXUSR)
    except BaseException:
        hosts.teardown()
        raise
    return hosts
