"""Claude Code turns against a running Shoal: time to first byte, to first token and in
all, run after run (the later runs hit the prefix cache), with `--bare` and with Claude
Code's full prompt.

    shoal serve --max-model-len 8192 --override-generation-config '{"temperature": 0}' &
    python -m shoal.bench.claude_code --base-url http://127.0.0.1:8000 --runs 2

Claude Code talks to a timing pass-through proxy in this process, which notes for every
`/v1/messages` request when the first response byte (`message_start`) and the first
content delta left the server, and when the stream ended. `claude` comes from
~/.cache/shoal/claude-code (see tests/test_claude_code.py) or `--claude`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

DEFAULT_CLAUDE = Path.home() / ".cache" / "shoal" / "claude-code" / "node_modules" / ".bin" / "claude"
HOP_HEADERS = {"host", "content-length", "accept-encoding", "connection", "transfer-encoding"}


@dataclass
class Timing:
    path: str
    status: int = 0
    ttfb_s: float | None = None
    ttft_s: float | None = None
    total_s: float | None = None


class TimingProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.timings: list[Timing] = []
        self.client = httpx.AsyncClient(timeout=None)
        self.app = Starlette(routes=[Route("/{path:path}", self.handle,
                                           methods=["GET", "POST", "HEAD"])])

    async def handle(self, request: Request) -> Response:
        start = time.monotonic()
        url = self.upstream + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        upstream = await self.client.send(self.client.build_request(
            request.method, url, headers=headers, content=await request.body()), stream=True)
        timing = Timing(request.url.path, upstream.status_code)
        if request.url.path.startswith("/v1/messages") and not request.url.path.endswith("count_tokens"):
            self.timings.append(timing)

        async def body():
            try:
                async for chunk in upstream.aiter_raw():
                    now = time.monotonic() - start
                    timing.ttfb_s = timing.ttfb_s if timing.ttfb_s is not None else now
                    if timing.ttft_s is None and b"content_block_delta" in chunk:
                        timing.ttft_s = now
                    yield chunk
            finally:
                timing.total_s = time.monotonic() - start
                await upstream.aclose()

        kept = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        return StreamingResponse(body(), status_code=upstream.status_code, headers=kept)


async def run_claude(claude: Path, base_url: str, prompt: str, bare: bool, model: str,
                     context: int, max_output: int, home: Path) -> dict:
    work = home / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": base_url,
           "ANTHROPIC_API_KEY": "not-checked", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_MAX_CONTEXT_TOKENS": str(context),
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_output)}
    args = [str(claude), "-p", prompt, "--output-format", "json", "--model", model,
            "--permission-mode", "acceptEdits", "--allowedTools", "Write,Edit,Read,Bash"]
    process = await asyncio.create_subprocess_exec(*args, *(["--bare"] if bare else []), cwd=work,
                                                   env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    stdout, _ = await process.communicate()
    lines = stdout.decode().strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return {"rc": process.returncode, "is_error": result.get("is_error"),
            "result": (result.get("result") or "")[:200], "usage": result.get("usage", {}),
            "duration_ms": result.get("duration_ms")}


async def main_async(args: argparse.Namespace) -> list[dict]:
    proxy = TimingProxy(args.base_url)
    server = uvicorn.Server(uvicorn.Config(proxy.app, host="127.0.0.1", port=args.proxy_port,
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    rows = []
    try:
        for bare in args.modes:
            with tempfile.TemporaryDirectory() as home:
                for run in range(1, args.runs + 1):
                    first = len(proxy.timings)
                    out = await run_claude(args.claude, f"http://127.0.0.1:{args.proxy_port}", args.prompt,
                                           bare == "bare", args.model, args.context, args.max_output,
                                           Path(home))
                    row = {"mode": bare, "run": run, **out,
                           "requests": [asdict(t) for t in proxy.timings[first:]]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        server.should_exit = True
        await serving
        await proxy.client.aclose()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--claude", type=Path, default=DEFAULT_CLAUDE)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["bare", "full"], choices=["bare", "full"])
    p.add_argument("--context", type=int, default=8192, help="CLAUDE_CODE_MAX_CONTEXT_TOKENS")
    p.add_argument("--max-output", type=int, default=256, help="CLAUDE_CODE_MAX_OUTPUT_TOKENS")
    p.add_argument("--proxy-port", type=int, default=8199)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    rows = asyncio.run(main_async(args))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
