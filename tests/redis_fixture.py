"""Start a real redis-server for tests (Debian's package; scripts/test.sh
installs it). Each server gets a free port and a temporary directory.

``GSTREAM_REDIS_SERVER=/path/to/valkey-server`` runs every Redis test
against that binary instead (Valkey: docs/redis.md); sentinels are then
started as ``<that binary> <conf> --sentinel``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process on 127.0.0.1 that can be killed and restarted
    on the same port (for fault tests)."""

    def __init__(self, port: int | None = None, password: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        exe = (os.environ.get("GSTREAM_REDIS_SERVER") or shutil.which("redis-server")
               or "/usr/bin/redis-server")
        if not os.path.exists(exe):
            raise RuntimeError("redis-server is not installed (scripts/test.sh installs it)")
        self.exe = exe
        self.port = port or free_port()
        self.password = password
        self.extra_args = extra_args
        self.dir = tempfile.mkdtemp(prefix="gstream-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        args = [
            self.exe, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", self.dir, "--save", "", "--appendonly", "yes",
            "--appendfsync", "always",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += list(self.extra_args)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_command(port: int, *args: str, timeout: float = 5.0) -> bytes:
    """Send one command to 127.0.0.1:port, return the raw reply (first read)."""
    cmd = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(cmd)
        return s.recv(65536)


class SentinelGroup:
    """A master, a replica and one redis-sentinel (quorum 1) watching them as ``service``."""

    def __init__(self, service: str = "gsmaster") -> None:
        self.service = service
        self.master = RedisServer()
        self.replica = RedisServer(extra_args=("--replicaof", "127.0.0.1",
                                               str(self.master.port)))
        self.sentinel_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="gstream-sentinel-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}/0"

    def start(self, timeout: float = 15.0) -> None:
        self.master.start()
        self.replica.start()
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.dir}\n"
                    f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n"
                    f"sentinel down-after-milliseconds {self.service} 1000\n"
                    f"sentinel failover-timeout {self.service} 5000\n")
        server = os.environ.get("GSTREAM_REDIS_SERVER")
        args = [server, conf, "--sentinel"] if server else [
            shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel", conf]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Ready once the sentinel knows the replica and the replica is in sync.
            try:
                replicas = redis_command(self.sentinel_port, "SENTINEL", "REPLICAS", self.service)
                info = redis_command(self.replica.port, "INFO", "replication")
                if (str(self.replica.port).encode() in replicas
                        and b"master_link_status:up" in info):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the sentinel group did not come up")

    def master_port(self) -> int:
        """The port of the master according to the sentinel."""
        reply = redis_command(self.sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                              self.service)
        return int(reply.split(b"\r\n")[4])

    def failover(self) -> None:
        """Ask the sentinel to fail over now (no agreement needed: quorum 1)."""
        reply = redis_command(self.sentinel_port, "SENTINEL", "FAILOVER", self.service)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"SENTINEL FAILOVER answered {reply!r}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None
        self.master.stop()
        self.replica.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) exists and is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster:
    """Three redis-server masters (no replicas) joined by ``redis-cli --cluster create``."""

    def __init__(self, size: int = 3) -> None:
        self.nodes = [RedisServer(port=_cluster_port(), extra_args=("--cluster-enabled", "yes",
                                              "--cluster-config-file", "nodes.conf",
                                              "--cluster-node-timeout", "2000"))
                      for _ in range(size)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 20.0) -> None:
        for n in self.nodes:
            n.start()
        exe = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        subprocess.run([exe, "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in redis_command(n.port, "CLUSTER", "INFO")
                   for n in self.nodes):
                return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def port_of_slot(self, slot: int) -> int:
        """The port of the node serving ``slot``."""
        reply = redis_command(self.nodes[0].port, "CLUSTER", "SLOTS").decode()
        # Nested array: [start, end, [ip, port, id], ...] per range; parse loosely.
        nums = [int(x[1:]) for x in reply.split("\r\n") if x.startswith(":")]
        for i in range(0, len(nums) - 2, 3):
            start, end, port = nums[i], nums[i + 1], nums[i + 2]
            if start <= slot <= end:
                return port
        raise LookupError(slot)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
