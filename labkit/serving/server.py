"""Starting, redeploying and stopping Ray Serve on 127.0.0.1, and a two-node cluster on one machine.

`Server` is the one place that starts Ray and Serve for the book's serving: a local Ray bound to
127.0.0.1 (or a running cluster given its address), Serve's HTTP proxy on 127.0.0.1:port, the app
from labkit.serving.app, and a stop that leaves no process behind: every process Ray starts
inherits an environment tag (LABKIT_RAY_JOB), so ray_serving.job_processes finds any left over.
`two_node_cluster` starts a head and a worker node here with Ray's own ray.cluster_utils.Cluster.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import replace

import psutil
import ray
import requests
from ray import serve
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from labkit.distributed.ray_serving import RayUnavailable, job_processes, start_ray
from labkit.serving.app import Settings, application

HOST = "127.0.0.1"
APP_NAME = "mnist"
START_TIMEOUT_S = 120.0   # a busy 2-core machine can take a minute to start Ray and a TF replica
PREFER_LOCAL = "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"


@contextlib.contextmanager
def loopback_only(address: str | None = None):
    """While inside, a Ray started or joined from here uses 127.0.0.1 (unless `address` is remote).

    labkit.serving sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported, which Ray reads
    once, at import. If something imported Ray earlier (another notebook's cell, another test), Ray
    would advertise the machine's network address, and would even turn "127.0.0.1:port" into it when
    joining a cluster; so the flag Ray read is set here too, and put back afterwards.
    """
    remote = address is not None and address.split(":")[0] not in ("127.0.0.1", "localhost")
    saved = ray_constants.ENABLE_RAY_CLUSTER
    if not remote:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _quiet_serve_logs() -> None:
    """Keep Serve's INFO lines (deployments starting, replicas stopping) out of notebook outputs."""
    for name in ("ray", "ray.serve", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Server:
    """Ray Serve with the book's app on 127.0.0.1: `with Server(model_path) as server: ...`.

    address None starts a local Ray (num_cpus logical CPUs) owned by this object; an address joins
    a running cluster, which stop() leaves running. deploy() replaces the app with new settings.
    """

    def __init__(self, model_path, *, port: int | None = None, address: str | None = None,
                 num_cpus: int = 2, cluster_tag: str | None = None, **deploy_options):
        self.settings = Settings(model_path=str(model_path))
        self.port = port or free_port()
        self.address, self.num_cpus = address, num_cpus
        self.url = f"http://{HOST}:{self.port}"
        self.tag = f"serve-{os.getpid()}-{time.time_ns()}"
        self.cluster_tag = cluster_tag   # a cluster started on this machine: its processes' tag
        self.deploy_options = deploy_options
        self.started = False

    # -- start and stop
    def start(self) -> "Server":
        _quiet_serve_logs()
        # Every process Ray starts from here on inherits the tag, which is how stop() finds them.
        with environment(LABKIT_RAY_JOB=self.tag), loopback_only(self.address):
            start_ray(self.address, num_cpus=self.num_cpus)
        self.started = True
        try:
            serve.start(http_options={"host": HOST, "port": self.port}, proxy_location="HeadOnly")
            self.deploy(**self.deploy_options)
        except BaseException:
            self.stop()
            raise
        return self

    def deploy(self, *, model_path=None, batching: bool | None = None,
               max_batch_size: int | None = None, batch_wait_timeout_s: float | None = None,
               replicas: int = 1, max_ongoing_requests: int = 32, max_queued_requests: int = -1,
               max_replicas_per_node: int | None = None, num_cpus: float = 1.0) -> dict:
        """(Re)deploy the app with fresh replicas; returns once they all run and /health answers."""
        changes = dict(model_path=None if model_path is None else str(model_path),
                       batching=batching, max_batch_size=max_batch_size,
                       batch_wait_timeout_s=batch_wait_timeout_s)
        self.settings = replace(self.settings,
                                **{k: v for k, v in changes.items() if v is not None})
        app = application(self.settings, replicas=replicas,
                          max_ongoing_requests=max_ongoing_requests,
                          max_queued_requests=max_queued_requests,
                          max_replicas_per_node=max_replicas_per_node, num_cpus=num_cpus)
        if APP_NAME in serve.status().applications:
            serve.delete(APP_NAME)   # old replicas gone before new ones start: no mixed answers
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        self.deployed = dict(self.settings.__dict__, replicas=replicas,
                             max_ongoing_requests=max_ongoing_requests,
                             max_queued_requests=max_queued_requests)
        self.wait_healthy(replicas)
        return self.deployed

    def wait_healthy(self, replicas: int = 1, timeout_s: float = START_TIMEOUT_S) -> dict:
        """Wait until Serve reports `replicas` running replicas and GET /health answers 200.

        Returns that answer.
        """
        deadline = time.monotonic() + timeout_s
        with requests.Session() as session:
            while True:
                app = serve.status().applications.get(APP_NAME)
                states = (app.deployments["Classifier"].replica_states
                          if app and app.deployments else {})
                if states.get("RUNNING", 0) == replicas and sum(states.values()) == replicas:
                    try:
                        answer = session.get(self.url + "/health", timeout=5)
                        if answer.status_code == 200:
                            return answer.json()
                    except requests.RequestException:
                        pass
                if time.monotonic() > deadline:
                    raise RayUnavailable(f"Serve did not report {replicas} running replicas "
                                         f"answering /health within {timeout_s:.0f} s "
                                         f"(replica states: {states})")
                time.sleep(0.2)

    def replica_pids(self) -> list:
        """Process ids of this server's replicas here (Ray titles them ray::ServeReplica:...)."""
        pids = []
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                if "ServeReplica" in " ".join(process.cmdline()):
                    pids.append(process.pid)
        return sorted(pids)

    def stop(self, grace_s: float = 20.0) -> list:
        """Shut Serve and Ray down; end, by id, any process of ours still alive after `grace_s`.

        Returns the processes that had to be killed (empty when everything exited on its own).
        """
        if not self.started:
            return []
        self.started = False
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
        left = job_processes(self.tag) if self.address is None else []
        _, alive = psutil.wait_procs(left, timeout=grace_s)
        killed = []
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                killed.append(f"{process.pid} {process.name()}")
                process.kill()
        psutil.wait_procs(alive, timeout=5)
        return killed

    def processes(self) -> list:
        """This server's Ray processes alive now (raylet, GCS, Serve's controller, replicas...)."""
        return job_processes(self.cluster_tag or self.tag)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- failures
    def kill_replica(self, pid: int) -> None:
        """Kill one replica's process with SIGKILL, as a crash would (its pid: from /predict).

        Only a process of this server is killed: the pid must carry this server's tag.
        """
        if pid not in {p.pid for p in self.processes()}:
            raise ValueError(f"process {pid} is not one of this server's Ray processes")
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def two_node_cluster(cpus_per_node: int = 1):
    """A head and one worker node on this machine (ray.cluster_utils.Cluster, as Ray's tests do).

    Yields the cluster; `cluster.address` is what Server(address=...) and
    ray_serving.batch_inference take. Every process of both nodes is stopped on exit,
    stragglers killed by id.
    """
    tag = f"cluster-{os.getpid()}-{time.time_ns()}"
    # Serve's proxy sends requests to replicas on its own node first and spills over only when
    # they are full. On one machine "its own node" means nothing, so the demo spreads them.
    with loopback_only(), environment(LABKIT_RAY_JOB=tag, **{PREFER_LOCAL: "0"}):
        cluster = None
        try:
            node = dict(num_cpus=cpus_per_node, node_ip_address=HOST, include_dashboard=False)
            cluster = Cluster(initialize_head=True, head_node_args=node)
            cluster.add_node(num_cpus=cpus_per_node, node_ip_address=HOST)
            cluster.wait_for_nodes()
        except Exception as error:
            if cluster is not None:
                cluster.shutdown()
            raise RayUnavailable("the two-node Ray cluster did not start "
                                 f"({type(error).__name__}: {error})") from None
    cluster.tag = tag
    try:
        with loopback_only():   # joining "127.0.0.1:port" must not become the machine's address
            yield cluster
    finally:
        cluster.shutdown()
        _, alive = psutil.wait_procs(job_processes(tag), timeout=20)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


@contextlib.contextmanager
def environment(**variables):
    """Set environment variables for the block (processes started in it inherit them)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
