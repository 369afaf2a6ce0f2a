"""`shoal serve MODEL --data-parallel-size N`: N Shoal replicas behind the SGLang Model Gateway.

    clients --> smg (--port, cache_aware) --+--> shoal serve (--port + 1)
                                            +--> shoal serve (--port + 2) ...

Each replica is a whole `shoal serve` process with the same flags; the gateway (`smg`, a Rust
router) sends a prompt to the replica that already holds its prefix. API keys go to the
replicas and the gateway through `$SHOAL_API_KEY`, never their command lines; the gateway
forwards the client's key, so both hops accept the same keys. SIGTERM or SIGINT drains:
every replica and the gateway are told at once, requests in flight finish (up to
`--drain-timeout`), and the command exits 0. A replica that exits on its own (or is drained
alone, with its own SIGTERM) is left out by the gateway, which routes to the others; once the
gateway or the last replica is gone, the rest are stopped and the command exits 1, so a
supervisor restarts the set.

Standard library only; `python -m shoal.cluster SMG-ARGS` is the gateway process itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

API_KEY_ENV = "SHOAL_API_KEY"  # as in cli.py
POLICIES = ("cache_aware", "round_robin", "power_of_two", "least_load", "prefix_hash",
            "consistent_hashing", "random")
SMG_LOG_LEVELS = {"debug": "debug", "info": "info", "warning": "warn", "error": "error"}
EXIT_GRACE = 30.0  # seconds past --drain-timeout before a process that will not stop is killed
log = logging.getLogger("shoal")


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """`shoal serve`'s flags for running several replicas behind a gateway."""
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N",
                   help="run N replicas behind the smg gateway, which listens on --host/--port "
                        "(replicas on the next N ports unless --replica-ports)")
    p.add_argument("--replica-ports", type=ports, default=None, metavar="P1,P2,...",
                   help="the replicas' ports (default: --port + 1 ... --port + N)")
    p.add_argument("--gateway-policy", default="cache_aware", choices=POLICIES,
                   help="smg's routing policy")
    p.add_argument("--gateway-metrics-port", type=int, default=29000, metavar="PORT",
                   help="where smg serves its own Prometheus metrics (on --host)")


def ports(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ports: {text!r}") from None


def replica_ports(args: argparse.Namespace) -> tuple[int, ...]:
    """The replicas' ports, checked against each other and the gateway's (ValueError)."""
    n = args.data_parallel_size
    chosen = args.replica_ports or tuple(args.port + 1 + i for i in range(n))
    if len(chosen) != n:
        raise ValueError(f"--replica-ports names {len(chosen)} ports for --data-parallel-size {n}")
    if len({*chosen, args.port, args.gateway_metrics_port}) != n + 2:
        raise ValueError("the replicas, the gateway and its metrics need distinct ports")
    return chosen


def replica_argv(serve_argv: list[str]) -> list[str]:
    """`shoal serve`'s own arguments less the cluster's, the address and the keys."""
    strip = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--host", "--port", "--replica-ports", "--gateway-policy", "--gateway-metrics-port"):
        strip.add_argument(flag)
    strip.add_argument("--data-parallel-size", "-dp")
    strip.add_argument("--api-key", action="append")
    return strip.parse_known_args(serve_argv)[1]


def run_cluster(args: argparse.Namespace, keys: tuple[str, ...]) -> int:
    """Start the replicas, then the gateway; supervise them until a signal or a death."""
    if importlib.util.find_spec("smg") is None:
        log.error("--data-parallel-size needs the smg gateway: pip install smg")
        return 2
    try:
        chosen = replica_ports(args)
    except ValueError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    env = {**os.environ, API_KEY_ENV: ",".join(keys)} if keys else dict(os.environ)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    urls = [f"http://{host}:{port}" for port in chosen]
    serve_argv = replica_argv(args.raw_argv)
    processes = [spawn(["-m", "shoal", "serve", *serve_argv, "--host", args.host, "--port", str(port)], env)
                 for port in chosen]
    try:
        if not wait_healthy(urls, processes, stop):
            return 0 if stop.is_set() else 1
        processes.append(spawn(["-m", "shoal.cluster", *gateway_argv(args, urls)], env))
        log.info("cluster: %d replicas (%s) behind smg (%s) on http://%s:%d, its metrics on port %d",
                 len(urls), ", ".join(urls), args.gateway_policy, args.host, args.port,
                 args.gateway_metrics_port)
        replicas, gateway = processes[:-1], processes[-1]
        gone: set[int] = set()
        while not stop.wait(0.5):
            for url, process in zip(urls, replicas):
                if process.poll() is not None and process.pid not in gone:
                    gone.add(process.pid)
                    log.error("replica %s exited with %d; the gateway routes around it",
                              url, process.returncode)
            if gateway.poll() is not None or len(gone) == len(replicas):
                log.error("the gateway or every replica has exited; stopping the cluster")
                return 1
        return 0
    finally:
        stop_all(processes, args.drain_timeout + EXIT_GRACE)


def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    # Its own session: a terminal's Ctrl-C reaches only this process, which forwards one SIGTERM
    # (a second signal would make a replica skip its drain).
    return subprocess.Popen([sys.executable, *argv], env=env, start_new_session=True)


def wait_healthy(urls: list[str], processes: list[subprocess.Popen], stop: threading.Event) -> bool:
    """True once every replica's /health says 200; False on a signal or a replica's exit."""
    waiting = dict(zip(urls, processes))
    while waiting and not stop.wait(0.5):
        for url, process in list(waiting.items()):
            if process.poll() is not None:
                log.error("replica %s exited with %d before it was ready", url, process.returncode)
                return False
            if healthy(url):
                del waiting[url]
    return not waiting


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def gateway_argv(args: argparse.Namespace, urls: list[str]) -> list[str]:
    return ["--host", args.host, "--port", str(args.port), "--worker-urls", *urls,
            "--policy", args.gateway_policy, "--prometheus-host", args.host,
            "--prometheus-port", str(args.gateway_metrics_port),
            "--shutdown-grace-period-secs", str(int(args.drain_timeout) + 5),
            "--log-level", SMG_LOG_LEVELS[args.log_level]]


def stop_all(processes: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM to every process still running (they drain at once), SIGKILL past `timeout`."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("process %d did not stop within %.0f s; killing it", process.pid, timeout)
            process.kill()
            process.wait()


def gateway_main(argv: list[str]) -> None:
    """The gateway process: `smg launch ARGV`, its keys from $SHOAL_API_KEY (the first one is
    smg's --api-key, which it also sends to the replicas; any others are accepted as tenants')."""
    from smg.launch_router import launch_router, parse_router_args

    router_args = parse_router_args(argv)
    keys = [key for key in os.environ.get(API_KEY_ENV, "").split(",") if key]
    if keys:
        router_args.api_key = keys[0]
        router_args.tenant_api_keys = [(f"key-{i}", key) for i, key in enumerate(keys[1:], 2)]
    launch_router(router_args)


if __name__ == "__main__":
    gateway_main(sys.argv[1:])
