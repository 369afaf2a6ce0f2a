"""A real Prometheus (Debian's `prometheus` package, installed by .ci/run) scrapes Shoal
while it serves, and every query of vLLM's Grafana dashboard (tests/data, copied from
shared/grafana-vllm-queries.txt) returns data."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.register_assert_rewrite("server_util")
from server_util import Server, free_port  # noqa: E402

pytest_plugins = ["server_util"]
QUERIES = Path(__file__).parent / "data" / "grafana-vllm-queries.txt"
MODEL_NAME = "tiny"  # tiny_server's --served-model-name


@pytest.fixture(scope="module")
def prometheus(tiny_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "the prometheus binary is missing: apt-get install prometheus (see .ci/run)"
    workdir = tmp_path_factory.mktemp("prometheus")
    target = tiny_server.base_url.removeprefix("http://")
    (workdir / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: shoal\n    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    with open(workdir / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_target(url, process, workdir / "prometheus.log")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for_target(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            targets = httpx.get(f"{url}/api/v1/targets", timeout=2).json()["data"]["activeTargets"]
            if targets and targets[0]["health"] == "up":
                return
        except (httpx.TransportError, KeyError, ValueError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"Prometheus never scraped Shoal:\n{log.read_text()[-3000:]}")


def traffic(server: Server, seconds: float) -> int:
    """Mixed requests (streamed and whole, n=1 and n=2, a shared prefix) for `seconds`."""
    sent = 0
    deadline = time.monotonic() + seconds
    prefix = "You are a helpful agent. " * 8
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        while time.monotonic() < deadline:
            body = {"prompt": prefix + f"task {sent}", "max_tokens": 8, "n": 1 + sent % 2}
            if sent % 3 == 0:
                with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                    assert response.status_code == 200
                    response.read()
            else:
                assert client.post("/v1/completions", json=body).status_code == 200
            sent += 1
    return sent


def test_every_grafana_query_returns_data(tiny_server: Server, prometheus: str):
    assert traffic(tiny_server, 8.0) >= 4
    time.sleep(2.5)  # two more scrapes after the last request
    queries = [line.split("|", 1) for line in QUERIES.read_text().splitlines() if "|" in line]
    assert len(queries) >= 30
    empty = []
    for title, query in queries:
        response = httpx.get(f"{prometheus}/api/v1/query",
                             params={"query": query.replace("$model_name", MODEL_NAME)}, timeout=10)
        body = response.json()
        assert body["status"] == "success", (title, body)
        if not body["data"]["result"]:
            empty.append(title)
    assert not empty, f"queries with no data: {empty}"
