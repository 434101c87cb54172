"""A multi-node Ray cluster on one machine, and a node-loss drill for `moe launch` on it.

Each node is a real ``ray start --block`` (its own raylet, object store and agents) with its own
temp dir, ports and resources, as on separate machines; only the file system is shared, which is
what a shared run folder gives a real cluster. The drill submits a `moe launch` job with ``ray job
submit``, kills the second node's raylet while the job is mid-run, starts the node again, and
records what happened (placement per attempt, timings, the job's status).

Everything this module starts carries ``DYNAMOE_LOCAL_CLUSTER=<root>`` in its environment, which
Ray passes on to the processes it starts in turn (raylet, agents, workers, the job driver), so
:meth:`LocalRayCluster.shutdown` finds and stops exactly those, by pid, and no other Ray on the
machine (``ray stop`` would stop them all). The cluster uses token authentication with its own
token file under ``root``, never ``~/.ray/auth_token``.

    python -m dynamoe.launch.local_cluster --root /tmp/drill     # the drill, a JSON record at the end
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MARKER_ENV = "DYNAMOE_LOCAL_CLUSTER"


class ClusterError(RuntimeError):
    """The local cluster did not start or did not behave; the message says what was seen."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    # The `ray` beside this interpreter, so every node runs the same Ray and the same dynamoe.
    path = Path(sys.executable).parent / "ray"
    if not path.exists():
        raise ClusterError(f"no `ray` command beside {sys.executable}; fix: install ray[default] in this environment")
    return str(path)


@dataclass
class LocalNode:
    """One ``ray start --block`` process, the leader of its own process group."""

    name: str
    proc: subprocess.Popen
    log: Path
    resources: dict

    def raylet_pid(self) -> int | None:
        import psutil

        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        return next((p.pid for p in children if _name(p) == "raylet"), None)

    def node_id(self) -> str | None:
        """Ray's id of this node, from its raylet's command line."""
        import psutil

        pid = self.raylet_pid()
        if pid is None:
            return None
        try:
            args = psutil.Process(pid).cmdline()
        except psutil.NoSuchProcess:
            return None
        return next((a.split("=", 1)[1] for a in args if a.startswith("--node_id=")), None)


def _name(proc) -> str:
    try:
        return proc.name()
    except Exception:  # a process that exits while we look is simply not a match
        return ""


class LocalRayCluster:
    """Ray nodes on this machine, started one at a time; a context manager that stops them all."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        # Ray's socket paths live under the temp dir and a Unix socket path is limited to 107 bytes.
        if len(str(self.root)) > 40:
            raise ClusterError(f"root {self.root} is too long for Ray's socket paths; fix: use a short path in /tmp")
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {
            **os.environ,
            MARKER_ENV: str(self.root),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):  # another cluster's, from the calling shell
            self.env.pop(key, None)
        self.gcs_port, self.dashboard_port, self.client_port = _free_port(), _free_port(), _free_port()
        self.nodes: dict[str, LocalNode] = {}
        self.ray = _ray_bin()

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start_node(self, name: str, *, num_cpus: int, resources: dict, head: bool = False) -> LocalNode:
        """Start (or start again) node ``name``; returns once its raylet has registered."""
        if name in self.nodes and self.nodes[name].proc.poll() is None:
            raise ClusterError(f"node {name!r} is already running")
        temp_dir = self.root / name
        log = self.root / f"{name}.{len(list(self.root.glob(f'{name}.*.log')))}.log"
        args = [
            self.ray,
            "start",
            "--block",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={temp_dir}",
            # Two nodes on one IP: every fixed default port would collide, so each gets its own.
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--object-store-memory={100 * 1024**2}",
            "--disable-usage-stats",
        ]
        if head:
            args += [
                "--head",
                f"--port={self.gcs_port}",
                f"--dashboard-port={self.dashboard_port}",
                "--dashboard-host=127.0.0.1",
                f"--ray-client-server-port={self.client_port}",
            ]
        else:
            args.append(f"--address={self.gcs_address}")
        with open(log, "w") as out:
            proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = self.nodes[name] = LocalNode(name, proc, log, resources)
        self._wait(lambda: self._registered(node), 120, f"node {name!r} to register (log: {log})", node)
        return node

    def _registered(self, node: LocalNode) -> bool:
        node_id = node.node_id()
        return node_id is not None and node_id in (self.alive_nodes() or {})

    def _wait(self, ready, timeout: float, what: str, node: LocalNode | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if node is not None and node.proc.poll() is not None:
                raise ClusterError(f"waiting for {what}: `ray start` exited with {node.proc.returncode}")
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(1)

    def _cli(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [self.ray, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.root
        )
        if check and out.returncode:
            raise ClusterError(f"`ray {' '.join(args)}` failed ({out.returncode}): {out.stderr[-2000:]}")
        return out

    def alive_nodes(self) -> dict[str, dict] | None:
        """Ray's view: node id -> its total resources, for the nodes Ray counts as alive; None
        while the head's state API does not answer (starting, or busy)."""
        reply = self._api("/api/v0/nodes?detail=true&limit=1000")
        if not reply or not reply.get("result"):
            return None
        rows = reply["data"]["result"]["result"]
        return {r["node_id"]: r.get("resources_total", {}) for r in rows if r["state"] == "ALIVE"}

    def kill_raylet(self, name: str) -> int:
        """Crash node ``name`` as a lost machine would: SIGKILL its raylet, nothing graceful.
        Its workers and agents notice the raylet is gone and exit; `ray start --block` follows."""
        pid = self.nodes[name].raylet_pid()
        if pid is None:
            raise ClusterError(f"node {name!r} has no raylet to kill")
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_dead(self, node_id: str, timeout: float = 120) -> None:
        def dead() -> bool:
            alive = self.alive_nodes()
            return alive is not None and node_id not in alive

        self._wait(dead, timeout, f"Ray to mark node {node_id[:8]} dead")

    def submit(self, entrypoint: list[str], *, submission_id: str, env_vars: dict, driver_resources: dict) -> None:
        """``ray job submit`` without waiting; ``driver_resources`` pins the driver to a node."""
        self._cli(
            "job",
            "submit",
            "--address",
            self.dashboard_url,
            "--submission-id",
            submission_id,
            "--runtime-env-json",
            json.dumps({"env_vars": env_vars}),
            "--entrypoint-resources",
            json.dumps(driver_resources),
            "--no-wait",
            "--",
            *entrypoint,
        )

    def _api(self, path: str) -> dict | None:
        """GET from the head's dashboard (the job and state APIs `ray job` and `ray list` use),
        with this cluster's token."""
        import urllib.error
        import urllib.request

        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        request = urllib.request.Request(self.dashboard_url + path, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError):
            return None  # the dashboard is busy or restarting: the caller polls again

    def job_status(self, submission_id: str) -> str:
        info = self._api(f"/api/jobs/{submission_id}")
        return info["status"] if info else "UNKNOWN"

    def wait_job(self, submission_id: str, timeout: float) -> str:
        final = ("SUCCEEDED", "FAILED", "STOPPED")
        status = ["UNKNOWN"]

        def done() -> bool:
            status[0] = self.job_status(submission_id)
            return status[0] in final

        self._wait(done, timeout, f"job {submission_id} to finish")
        return status[0]

    def job_logs(self, submission_id: str) -> str:
        info = self._api(f"/api/jobs/{submission_id}/logs")
        return info["logs"] if info else ""

    def _our_processes(self) -> list:
        import psutil

        ours = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARKER_ENV) == str(self.root) and proc.status() != psutil.STATUS_ZOMBIE:
                    ours.append(proc)
            except (psutil.Error, OSError):
                continue
        return ours

    def shutdown(self, grace: float = 15) -> None:
        """Stop every process this cluster started (nodes, workers, job drivers), by pid."""
        import psutil

        for node in self.nodes.values():
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(n.proc.poll() is None for n in self.nodes.values()):
            time.sleep(0.5)
        left = self._our_processes()
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
        for node in self.nodes.values():
            try:
                node.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                node.proc.kill()


def node_loss_drill(
    root: Path,
    *,
    config: str = "debug_tiny",
    hold_step: int = 6,
    overrides: tuple[str, ...] = (),
    reference: bool = True,
    timeout: float = 900,
) -> dict:
    """Two single-CPU nodes, a 2-worker `moe launch` job spread over them, the second node killed
    after step ``hold_step`` and started again; then (with ``reference``) the same job again on the
    intact cluster. Returns a record of what happened; the run folders are under ``root/shared``."""
    from dynamoe.config import load_config

    cfg = load_config(config, list(overrides))
    every, steps = cfg.train.checkpoint_every, cfg.train.steps
    if not (0 < every <= hold_step < steps):
        raise ClusterError(
            f"hold step {hold_step} must come after a checkpoint and before the end (train.checkpoint_every "
            f"{every}, train.steps {steps}), or there is nothing to resume from or nothing left to run; "
            f"fix: pick a hold step in [{max(every, 1)}, {steps - 1}] or change the config"
        )
    started, started_unix = time.monotonic(), time.time()
    record: dict = {"events": []}

    def event(what: str, **info) -> None:
        record["events"].append({"t": round(time.monotonic() - started, 1), "what": what, **info})
        print(f"[{time.monotonic() - started:7.1f} s] {what} {info or ''}", flush=True)

    shared = Path(root).resolve() / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    moe = str(Path(sys.executable).parent / "moe")
    job = [
        moe,
        "launch",
        config,
        "--workers",
        "2",
        "--ep-size",
        "2",
        "--address",
        "auto",
        "--quiet",
        "--set",
        "train.log_every=1",
        "--set",
        "launch.max_failures=1",
        "--set",
        "launch.placement_strategy=STRICT_SPREAD",
        *[a for o in overrides for a in ("--set", o)],
    ]
    env_vars = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with LocalRayCluster(root) as cluster:
        head = cluster.start_node("head", num_cpus=1, resources={"head_node": 1}, head=True)
        event("head node up", node_id=head.node_id())
        worker = cluster.start_node("worker", num_cpus=1, resources={"worker_node": 1})
        event("worker node up", node_id=worker.node_id())
        node_names = {head.node_id(): "head", worker.node_id(): "worker"}

        run = shared / "run"
        cluster.submit(
            [*job, "--run-dir", str(run)],
            submission_id="drill",
            env_vars={**env_vars, "DYNAMOE_HOLD_WORKERS_AT_STEP": str(hold_step), "DYNAMOE_HOLD_SECONDS": "600"},
            driver_resources={"head_node": 0.01},
        )
        event("job submitted", run=str(run))
        markers = [run / f".held_at_step_{hold_step}_rank_{r}" for r in (0, 1)]

        def held() -> bool:
            if cluster.job_status("drill") in ("FAILED", "STOPPED"):
                raise ClusterError(f"the job ended before step {hold_step}:\n{cluster.job_logs('drill')[-4000:]}")
            return all(m.exists() for m in markers)

        cluster._wait(held, timeout, f"both workers to reach step {hold_step}")
        event(f"both workers held after step {hold_step}")
        old_id = worker.node_id()
        pid = cluster.kill_raylet("worker")
        event("worker node's raylet killed", pid=pid)
        cluster.wait_dead(old_id)
        event("Ray marked the worker node dead")
        worker = cluster.start_node("worker", num_cpus=1, resources={"worker_node": 1})
        node_names[worker.node_id()] = "worker (restarted)"
        event("worker node started again", node_id=worker.node_id())
        record["status"] = cluster.wait_job("drill", timeout)
        event("job finished", status=record["status"])
        record["logs"] = cluster.job_logs("drill")
        record["placement"] = _placement(run, node_names, started_unix)
        if reference and record["status"] == "SUCCEEDED":
            cluster.submit(
                [*job, "--run-dir", str(shared / "reference")],
                submission_id="reference",
                env_vars=env_vars,
                driver_resources={"head_node": 0.01},
            )
            record["reference_status"] = cluster.wait_job("reference", timeout)
            event("reference job finished", status=record["reference_status"])
    event("cluster stopped")
    record["run"], record["reference"] = str(shared / "run"), str(shared / "reference")
    return record


def _placement(run: Path, node_names: dict, t0: float) -> list[dict]:
    """RUN/placement.jsonl with node names in place of ids, one row per worker start, ``t`` in
    seconds since the drill began (as in its events)."""
    path = run / "placement.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [
        {"rank": r["rank"], "node": node_names.get(r["node_id"], r["node_id"]), "t": round(r["time"] - t0, 1)}
        for r in rows
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynamoe.launch.local_cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="a short new folder in /tmp: temp dirs, logs, the shared run folders")
    p.add_argument("--config", default="debug_tiny")
    p.add_argument("--hold-step", type=int, default=6, help="kill the second node after this step")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = p.parse_args(argv)

    def stop(signum, frame):  # so that `kill` or a timeout still stops the cluster on the way out
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    record = node_loss_drill(Path(args.root), config=args.config, hold_step=args.hold_step, overrides=tuple(args.set))
    logs = record.pop("logs")
    print(json.dumps(record, indent=2))
    if record["status"] != "SUCCEEDED":
        print(logs[-6000:], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
