"""A real two-node Ray cluster on this machine, every port of it on loopback, for
tests/test_ray.py and bench/ray_extract.py (docs/scaling-out.md).

Found with `ss -ltnp` while the cluster ran: `ray start --node-ip-address=127.0.0.1`
alone leaves the GCS, the raylets (node manager and object manager ports) and each
worker listening on every interface, and the runtime-env agent on the machine's
routable address, because Ray rewrites a 127.0.0.1 node address to that routable one;
Ray's servers bind loopback only when the node's address stays 127.0.0.1. No port
flag changes that (they choose ports, not interfaces): LOOPBACK_ONLY does, in
`ray start`, in every process it spawns and in the driver.
"""

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

START_TIMEOUT_S = 120

# Named for the platforms where it is the default: with it Ray keeps 127.0.0.1 as the node's address.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# The same setting makes `ray start --address` refuse to add a second node; this wrapper
# lets it, and keeps the node's 127.0.0.1 as given. Two nodes on one machine is a test's need only.
SECOND_NODE = """
import ray._private.ray_constants as constants
import ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
main()
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def loopback_env(env: dict[str, str] | None = None) -> dict[str, str]:
    return {**(os.environ if env is None else env), **LOOPBACK_ONLY}


@dataclass
class Cluster:
    address: str
    temp_dir: str
    startup_s: float = 0.0

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those started with its temp dir, and their children."""
        found = {}
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                arguments = process.info["cmdline"] or []
                if process.pid != os.getpid() and any(self.temp_dir in arg for arg in arguments):
                    found[process.pid] = process
                    for child in process.children(recursive=True):
                        found[child.pid] = child
        return list(found.values())

    def raylets(self) -> list[psutil.Process]:
        """The nodes' raylets, oldest (the head's) first."""
        raylets = [p for p in self.processes() if p.name() == "raylet"]
        return sorted(raylets, key=lambda p: p.create_time())

    def listening(self) -> list[str]:
        """host:port of every socket the cluster's processes listen on."""
        pids = {p.pid for p in self.processes()}
        return [
            f"{c.laddr.ip}:{c.laddr.port}"
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids
        ]

    def rss(self) -> int:
        """Bytes resident in the cluster's processes together."""
        total = 0
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total


def on_loopback(host_port: str) -> bool:
    address = ipaddress.ip_address(host_port.rsplit(":", 1)[0])
    mapped = getattr(address, "ipv4_mapped", None)  # [::ffff:127.0.0.1]: a dual-stack socket on loopback
    return (mapped or address).is_loopback


def ray_start(*args: str, second_node: bool = False) -> None:
    ray = [sys.executable, "-c", SECOND_NODE] if second_node else [str(Path(sys.executable).parent / "ray")]
    command = [*ray, "start", *args, "--num-cpus=1", "--disable-usage-stats"]
    result = subprocess.run(
        command, env=loopback_env(), capture_output=True, text=True, timeout=START_TIMEOUT_S
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")


@contextlib.contextmanager
def two_node_cluster() -> Iterator[Cluster]:
    """A head node and a second node, one CPU each, stopped and removed after."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    cluster = Cluster(f"127.0.0.1:{port}", temp_dir)
    started = time.monotonic()
    try:
        head = ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false"]
        ray_start(*head, f"--temp-dir={temp_dir}")
        ray_start(f"--address={cluster.address}", "--node-ip-address=127.0.0.1", second_node=True)
        cluster.startup_s = time.monotonic() - started
        yield cluster
    finally:
        stop(cluster)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop(cluster: Cluster) -> None:
    """SIGKILL to this cluster's processes, by id: `ray stop` would end every Ray
    process of the machine, another cluster's too."""
    processes = cluster.processes()
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(processes, timeout=30)
    left = [p.pid for p in alive if still_running(p)]
    if left:
        raise RuntimeError(f"Ray processes {left} outlived SIGKILL")


def still_running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # a zombie is dead, its parent not yet told
    except psutil.NoSuchProcess:
        return False
