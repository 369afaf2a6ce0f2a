"""Shoal behind the SGLang Model Gateway (`smg`, installed by the `test` extras):
`shoal serve -dp 2` starts two tiny replicas and smg in front (cache_aware), on loopback.

An agent swarm (4 long system prompts x 8 agents) through the gateway computes each prompt
on one replica: the replicas' summed prefix-cache hits match what one replica alone gets.
A replica drained mid-wave loses no request sent after its SIGTERM; SIGTERM to the command
drains everything and exits 0. Unit tests pin the load JSON smg parses (api/loads.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytest.register_assert_rewrite("server_util")
from server_util import API_KEYS, REPO_ROOT, Server, free_port, metric, tiny_args  # noqa: E402

from shoal.api.loads import WINDOW_SECONDS, LoadTracker
from shoal.cluster import replica_argv, replica_ports
from shoal.engine.stats import IterationStats, SchedulerStats

pytest_plugins = ["server_util"]
AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}
BLOCK = 16  # tiny_args' block size (the default)
DRAIN_TIMEOUT = 20
WORDS = "reef tide kelp gill fin scale current shoal drift coral sand swim".split()


@dataclass(frozen=True)
class Cluster:
    process: subprocess.Popen
    log_path: Path
    gateway: str
    replicas: tuple[Server, ...]

    def replica_pid(self, replica: Server) -> int | None:
        port = replica.base_url.rsplit(":", 1)[1]
        found = subprocess.run(["pgrep", "-P", str(self.process.pid), "-f", "--", f"--port {port}$"],
                               capture_output=True, text=True).stdout.split()
        return int(found[0]) if found else None

    def hits(self) -> list[float]:
        return [metric(r.metrics(), "vllm:prefix_cache_hits_total") for r in self.replicas]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    gateway, a, b, gateway_metrics = (free_port() for _ in range(4))
    log_path = tmp_path_factory.mktemp("logs") / "cluster.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SHOAL_API_KEY": ",".join(API_KEYS)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "shoal", "serve", *tiny_args(tiny_model_dir), "--port", str(gateway),
             "--data-parallel-size", "2", "--replica-ports", f"{a},{b}",
             "--gateway-metrics-port", str(gateway_metrics), "--drain-timeout", str(DRAIN_TIMEOUT)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    replicas = tuple(Server(f"http://127.0.0.1:{port}", process, log_path) for port in (a, b))
    result = Cluster(process, log_path, f"http://127.0.0.1:{gateway}", replicas)
    try:
        wait_for_workers(result, 2)
        yield result
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=DRAIN_TIMEOUT + 40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_workers(cluster: Cluster, count: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert cluster.process.poll() is None, cluster.log_path.read_text()[-4000:]
        try:
            ready = httpx.get(cluster.gateway + "/readiness", headers=AUTH, timeout=2)
            if ready.status_code == 200 and ready.json().get("healthy_workers") == count:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the gateway never had {count} healthy workers:\n"
                         f"{cluster.log_path.read_text()[-4000:]}")


def gateway_workers(cluster: Cluster) -> list[dict]:
    return httpx.get(cluster.gateway + "/workers", headers=AUTH).json()["workers"]


def system_prompt(team: int) -> str:
    """About 40 blocks, different from its first characters on (no block shared across teams)."""
    rng = random.Random(team)
    return f"{'ABCDEFGH'[team]}-team rules: " + " ".join(rng.choice(WORDS) for _ in range(130))


def chat(system: str, user: str, max_tokens: int = 4) -> dict:
    return {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


async def post_all(url: str, bodies: list[dict]) -> list[tuple[int, str]]:
    """Every body at once to `url`'s chat completions: (status, body text) each."""
    async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
        async def one(body: dict) -> tuple[int, str]:
            try:
                response = await client.post(url + "/v1/chat/completions", json=body)
                return response.status_code, response.text
            except httpx.HTTPError as exc:
                return 0, repr(exc)
        return await asyncio.gather(*(one(body) for body in bodies))


def swarm(url: str, teams: range, agents: int, wave: str) -> list[tuple[int, str]]:
    """Each team's first agent (all teams at once), then every other agent at once."""
    def bodies(agent_ids: range) -> list[dict]:
        return [chat(system_prompt(t), f"{wave}: agent {a} of team {t}, report.")
                for t in teams for a in agent_ids]
    return asyncio.run(post_all(url, bodies(range(1)))) + asyncio.run(post_all(url, bodies(range(1, agents))))


# --- the load JSON, without a server ---------------------------------------------------

def test_load_tracker_reports_the_last_step_and_a_recent_window():
    now = [100.0]
    tracker = LoadTracker(max_total_num_tokens=1000, max_running_requests=8, clock=lambda: now[0])
    assert tracker.snapshot()["num_running_reqs"] == 0 and tracker.snapshot()["cache_hit_rate"] == 0.0
    tracker.record(SchedulerStats(num_running=3, num_waiting=2, kv_cache_usage=0.25),
                   IterationStats(num_generation_tokens=50, prefix_cache_queries=200, prefix_cache_hits=150))
    body = tracker.loads()
    assert body["dp_rank_count"] == 1 and body["timestamp"] and body["version"]
    assert body["loads"] == [{"dp_rank": 0, "num_running_reqs": 3, "num_waiting_reqs": 2, "num_total_reqs": 5,
                              "num_used_tokens": 250, "max_total_num_tokens": 1000, "token_usage": 0.25,
                              "gen_throughput": 50 / WINDOW_SECONDS, "cache_hit_rate": 0.75,
                              "max_running_requests": 8}]
    now[0] += WINDOW_SECONDS + 1  # the window forgets old steps; the scheduler state stays
    snapshot = tracker.snapshot()
    assert snapshot["gen_throughput"] == 0.0 and snapshot["cache_hit_rate"] == 0.0
    assert snapshot["num_running_reqs"] == 3


def test_replica_argv_drops_the_cluster_flags_the_address_and_the_keys():
    argv = ["model", "--port", "8000", "-dp", "2", "--api-key", "secret", "--host=0.0.0.0",
            "--replica-ports", "1,2", "--gateway-policy", "round_robin", "--gateway-metrics-port", "9",
            "--max-num-seqs", "4", "--data-parallel-size=2"]
    assert replica_argv(argv) == ["model", "--max-num-seqs", "4"]


def test_replica_ports_are_consecutive_or_given_and_distinct():
    def args(**kw):
        defaults = {"port": 8000, "data_parallel_size": 2, "replica_ports": None, "gateway_metrics_port": 29000}
        return type("Args", (), {**defaults, **kw})
    assert replica_ports(args()) == (8001, 8002)
    assert replica_ports(args(replica_ports=(9001, 9005))) == (9001, 9005)
    for bad in ({"replica_ports": (9001,)}, {"replica_ports": (8000, 9001)}, {"gateway_metrics_port": 8002}):
        with pytest.raises(ValueError):
            replica_ports(args(**bad))


# --- a real cluster --------------------------------------------------------------------

def test_loads_and_server_info_as_smg_reads_them(cluster: Cluster):
    replica = cluster.replicas[0]
    loads = httpx.get(replica.url("/v1/loads?include=core,disagg,queues,memory"))  # open, like /metrics
    assert loads.status_code == 200
    (rank,) = loads.json()["loads"]
    assert httpx.get(replica.url("/server_info")).status_code == 401  # like /version
    info = httpx.get(replica.url("/server_info"), headers=AUTH).json()
    assert info["served_model_name"] == "tiny" and info["context_length"] == 1024 and info["dp_size"] == 1
    assert rank["max_total_num_tokens"] == info["max_total_tokens"] > 0
    assert rank["max_running_requests"] == info["max_running_requests"] == 64
    # smg parsed it: its worker list carries each replica's load report (not a /metrics guess).
    deadline = time.monotonic() + 30  # smg polls every 10 s (--load-monitor-interval)
    workers = gateway_workers(cluster)
    while not all("engine_load" in w for w in workers):
        assert time.monotonic() < deadline, workers
        time.sleep(0.5)
        workers = gateway_workers(cluster)
    assert sorted(w["url"] for w in workers) == sorted(r.base_url for r in cluster.replicas)
    for worker in workers:
        assert worker["runtime_type"] == "vllm"  # detected through /version
        assert worker["engine_load"]["loads"][0]["max_total_num_tokens"] == info["max_total_tokens"]


def test_swarm_computes_each_system_prompt_on_one_replica(cluster: Cluster):
    teams, agents = range(4), 8
    first = cluster.hits()
    alone = swarm(cluster.replicas[0].base_url, teams, agents, "alone")
    assert [status for status, _ in alone] == [200] * 32, alone
    one_replica = cluster.hits()[0] - first[0]
    full_prompt = len(system_prompt(0)) // BLOCK * BLOCK
    assert one_replica >= (agents - 1) * len(teams) * (full_prompt - 2 * BLOCK)  # the followers hit
    for replica in cluster.replicas:
        assert httpx.post(replica.url("/reset_prefix_cache"), headers=AUTH).status_code == 200

    before = cluster.hits()
    through_gateway = swarm(cluster.gateway, teams, agents, "gateway")
    assert [status for status, _ in through_gateway] == [200] * 32, through_gateway
    per_replica = [after - b for after, b in zip(cluster.hits(), before)]
    # A team split across the replicas would compute its prompt twice: ~40 blocks fewer hits.
    assert abs(sum(per_replica) - one_replica) <= 4 * BLOCK, (per_replica, one_replica)


def test_a_replica_drained_mid_wave_loses_no_request(cluster: Cluster):
    victim, survivor = cluster.replicas[1], cluster.replicas[0]
    pid = cluster.replica_pid(victim)
    assert pid is not None

    async def wave() -> tuple[list, list]:
        during = asyncio.create_task(post_all(cluster.gateway, [
            chat(system_prompt(t), f"long job {i} of team {t}", max_tokens=200) for t in range(4) for i in range(3)]))
        deadline = time.monotonic() + 60
        while httpx.get(victim.url("/v1/loads")).json()["loads"][0]["num_running_reqs"] == 0:
            assert time.monotonic() < deadline and not during.done(), "the victim never got work"
            await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
        after = await post_all(cluster.gateway, [
            chat(system_prompt(t), f"after the kill, agent {i} of team {t}") for t in range(4) for i in range(4)])
        return await during, after

    in_flight, after_kill = asyncio.run(wave())
    assert [status for status, _ in after_kill] == [200] * 16, after_kill
    assert [status for status, _ in in_flight] == [200] * 12, in_flight  # drained, not cut
    deadline = time.monotonic() + DRAIN_TIMEOUT + 10
    while cluster.replica_pid(victim) is not None:
        assert time.monotonic() < deadline, "the drained replica never exited"
        time.sleep(0.2)
    assert cluster.process.poll() is None  # the gateway routes to the survivor
    assert httpx.get(survivor.url("/health")).status_code == 200
    status, _ = asyncio.run(post_all(cluster.gateway, [chat(system_prompt(1), "one more")]))[0]
    assert status == 200


def test_sigterm_drains_the_cluster_and_exits_0(cluster: Cluster):
    children = subprocess.run(["pgrep", "-P", str(cluster.process.pid)], capture_output=True, text=True)
    assert children.stdout.split(), "no replica or gateway process under the command"
    cluster.process.send_signal(signal.SIGTERM)
    assert cluster.process.wait(timeout=DRAIN_TIMEOUT + 40) == 0, cluster.log_path.read_text()[-4000:]
    for pid in map(int, children.stdout.split()):
        with pytest.raises(ProcessLookupError):  # reaped by the command: none is left behind
            os.kill(pid, 0)
