"""The embedded Ray listens on loopback only and runs with token authentication (DESIGN
promise 9, issue 13 item 3). The session's Ray is started by flowscore's own code path
(``pipelines.raycluster.ensure_ray``, the ``ray_session`` fixture)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.raycluster import LOOPBACK, _is_loopback_address

ROOT = Path(__file__).resolve().parent.parent
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp{,6}


def _addr(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def _is_loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)  # [::ffff:127.0.0.1] from a dual-stack socket
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def listening_sockets() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket of this machine."""
    out: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], int(fields[9])
                if state != _LISTEN:
                    continue
                hex_ip, hex_port = local.split(":")
                out[inode] = (str(_addr(hex_ip)), int(hex_port, 16))
    return out


def descendants(root: int) -> dict[int, str]:
    """pid -> command name of ``root`` and every process below it."""
    parent: dict[int, int] = {}
    name: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parent[int(entry)], name[int(entry)] = ppid, comm
    found = {root: name.get(root, "?")}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in found and pid not in found:
                found[pid] = name[pid]
                grew = True
    return found


def socket_owners(pids: dict[int, str]) -> dict[int, tuple[int, str]]:
    """Socket inode -> (pid, command name) for the open sockets of ``pids``."""
    out: dict[int, tuple[int, str]] = {}
    for pid, comm in pids.items():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out[int(target[8:-1])] = (pid, comm)
    return out


def test_loopback_addresses_are_recognised():
    assert _is_loopback(_addr("0100007F"))  # 127.0.0.1
    assert not _is_loopback(_addr("00000000"))  # 0.0.0.0
    assert _is_loopback(_addr("0000000000000000FFFF00000100007F"))  # ::ffff:127.0.0.1
    assert not _is_loopback(_addr("00000000000000000000000000000000"))  # ::
    assert _is_loopback(_addr("00000000000000000000000001000000"))  # ::1
    assert _is_loopback_address("127.0.0.1:6379") and _is_loopback_address("localhost:1")
    assert _is_loopback_address("[::1]:6379")
    assert not _is_loopback_address("10.0.0.5:6379")
    assert not _is_loopback_address("ray://127.0.0.1:10001")  # Ray Client: left alone


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_local_ray_listens_on_loopback_only(ray_session):
    """Every listening TCP socket of the local Ray's processes (this driver, GCS, raylet,
    agents, workers and an actor kept alive for the check) is on a loopback address."""
    import ray

    @ray.remote(num_cpus=0.1)
    class Holder:
        def ping(self) -> int:
            return os.getpid()

    @ray.remote(num_cpus=0.1)
    def task() -> str:
        return ray.util.get_node_ip_address()

    holder = Holder.remote()  # type: ignore[attr-defined]
    actor_pid = ray.get(holder.ping.remote(), timeout=120)
    node_ip = ray.get(task.remote(), timeout=120)
    try:
        procs = descendants(os.getpid())
        owners = socket_owners(procs)
        listening = listening_sockets()
        ours = {inode: (owners[inode], listening[inode]) for inode in owners if inode in listening}
        names = set(procs.values())
        assert "gcs_server" in names and "raylet" in names, names
        assert actor_pid in procs
        gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
        assert gcs_port in {port for _, (_, port) in ours.values()}
        exposed = sorted(
            f"{comm} (pid {pid}) on {ip}:{port}"
            for (pid, comm), (ip, port) in ours.values()
            if not _is_loopback(ipaddress.ip_address(ip))
        )
        assert not exposed, "listening beyond loopback: " + "; ".join(exposed)
        assert node_ip == LOOPBACK
    finally:
        ray.kill(holder)


def _join(env: dict[str, str]) -> subprocess.Popen[str]:
    code = (
        "from pipelines.raycluster import ensure_ray\n"
        "import ray\n"
        "ensure_ray()\n"
        "print('ran', ray.get(ray.remote(lambda: 40 + 2).remote(), timeout=60))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_children_join_with_the_token_and_others_are_refused(ray_session):
    """A flowscore child joining through ``RAY_ADDRESS`` with this process's environment (the
    token Ray's own processes got too) runs a task; a client without the token (auth turned
    off on its side, as an outsider would) is refused."""
    import ray

    assert os.environ.get("RAY_AUTH_MODE") == "token" and os.environ.get("RAY_AUTH_TOKEN")
    address = ray.get_runtime_context().gcs_address
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONPATH=str(ROOT))
    outsider_env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    outsider_env["RAY_AUTH_MODE"] = "disabled"
    child, outsider = _join(env), _join(outsider_env)
    try:
        out, _ = child.communicate(timeout=180)
        assert child.returncode == 0 and "ran 42" in out, out[-3000:]
        out, _ = outsider.communicate(timeout=180)
        assert outsider.returncode != 0 and "ran 42" not in out, out[-3000:]
        assert "Authentication token is missing or incorrect" in out, out[-3000:]
    finally:
        for p in (child, outsider):
            if p.poll() is None:
                p.kill()
                p.wait()
