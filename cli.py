"""The `shoal` command: `shoal serve [MODEL] ...` (and room for more subcommands).

Order matters: the optimized BLAS must be loaded before anything imports MLX, so this
module imports only the standard library and MLX-free parts of shoal at the top; each
subcommand imports its heavy modules inside its handler, after `preload_blas`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from shoal import __version__
from shoal.cluster import add_cluster_options, run_cluster
from shoal.engine.config import EngineConfig
from shoal.engine.platform import preload_blas

log = logging.getLogger("shoal")

SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
              "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
              "tib": 2**40}
API_KEY_ENV = "SHOAL_API_KEY"  # a key on the command line is visible to every local user
Handler = Callable[[argparse.Namespace], int]


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648, '512MiB', '1.5GB', '4096'; argparse-friendly errors."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match and SIZE_UNITS.get(match.group(2).lower())
    if not unit:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB, 512MiB, 1073741824)")
    size = int(float(match.group(1)) * unit)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0: {text!r}")
    return size


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (None, off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], ()) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI- and Anthropic-compatible HTTP server",
                              description="Serve a model over the OpenAI and Anthropic HTTP APIs.",
                              formatter_class=DefaultsFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="mlx-lm directory, Hugging Face id or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                   help="the same as the positional MODEL (vLLM's spelling)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--kv-cache-memory", type=parse_size, default="2GiB",
                   metavar="SIZE", help="KV pool size in bytes, e.g. 2GiB or 512MiB")
    p.add_argument("--num-blocks", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-num-seqs", type=positive_int, default=EngineConfig.max_num_seqs,
                   help="most requests running at once")
    p.add_argument("--max-num-batched-tokens", type=positive_int,
                   default=EngineConfig.max_num_batched_tokens, help="token budget of one engine step")
    p.add_argument("--prefill-budget-while-decoding", type=positive_int,
                   default=EngineConfig.prefill_budget_while_decoding,
                   help="prompt tokens per step while any request is decoding, so a burst of "
                        "arrivals does not stall decodes (the full step budget when none is)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="context window (default: the model's, capped by the KV pool)")
    p.add_argument("--max-waiting-requests", type=int, default=EngineConfig.max_waiting_requests,
                   help="requests that may wait for a slot; past it new ones get 429 (OpenAI) or "
                        "529 overloaded_error (Anthropic); 0: no bound")
    p.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", dest="no_prefix_caching",
                   action="store_true", help="turn off prefix caching (shared prompt blocks)")
    p.add_argument("--num-state-snapshots", type=int, default=None, metavar="N",
                   help="recurrent (hybrid) models: states kept at block boundaries so a prompt can "
                        "reuse a cached prefix (default: a quarter of the KV memory the per-request "
                        "states leave); 0 turns prefix caching off for such models")
    p.add_argument("--speculative-config", type=speculative_config, default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s JSON: {"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_min": 2, "prompt_lookup_max": 4, "disable_by_batch_size": 4}; '
                        "off by default")
    p.add_argument("--snapshot-interval", type=positive_int, default=EngineConfig.snapshot_interval,
                   metavar="TOKENS", help="recurrent models: a state snapshot every this many tokens of "
                                          "a long prompt (whole blocks), besides one at the prompt's last "
                                          "full block and at the end of each answer")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "gather", "cascade"],
                   help="auto: cascade attention where rows share a long prefix of KV blocks, "
                        "the gather path elsewhere; gather: never cascade; cascade: wherever two "
                        "rows share a block")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weight dtype (auto: float32 on CPU, the checkpoint's on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed for requests without their own")
    p.add_argument("--api-key", action="append", default=[],
                   help=f"require this key (repeatable; also read from ${API_KEY_ENV}). "
                        "Protects every route except /, /health and /metrics")
    p.add_argument("--metrics-require-key", action="store_true",
                   help="with --api-key, protect /metrics too (vLLM leaves it open)")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients use (default: the model directory's name)")
    p.add_argument("--alias", action="append", default=[], help="another accepted model name (repeatable)")
    p.add_argument("--allowed-origins", type=origins, default=(), metavar="JSON|LIST",
                   help='CORS origins, as vLLM\'s JSON list (\'["*"]\') or comma-separated; none: no CORS')
    p.add_argument("--max-request-bytes", type=parse_size, default="8MiB", metavar="SIZE",
                   help="largest request body accepted")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long requests in flight may run before they are ended")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a connection must send a whole request head within this")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request body must arrive within this of its head (else 408)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="idle keep-alive connections are closed after this")
    p.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                   help="shard the model over N ranks of mx.distributed (ring backend). Not under a "
                        "launcher: starts N-1 worker processes on this machine; under `mlx.launch "
                        "--backend ring --hostfile ...` (MLX_RANK set): this process is one rank")
    p.add_argument("--pipeline-parallel-size", "-pp", type=positive_int, default=1, metavar="N",
                   help="split the model's layers over N ranks (mlx-lm's pipeline: qwen3_5, qwen3_next, "
                        "deepseek, ...), launched like --tensor-parallel-size; not with it")
    p.add_argument("--disable-log-stats", action="store_true",
                   help="no periodic engine summary line (throughput, queue, KV usage) in the log")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="accepted for vLLM compatibility: Shoal does not log each request")
    add_chat_options(p)
    add_cluster_options(p)
    add_common_options(p)
    p.set_defaults(handler=run_serve)


def origins(text: str) -> tuple[str, ...]:
    """--allowed-origins: '["*"]' (vLLM) or 'https://a.example,https://b.example'."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list: {exc}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return tuple(value)
    return tuple(o.strip() for o in text.split(",") if o.strip())


def add_chat_options(p: argparse.ArgumentParser) -> None:
    """Tool calls, reasoning and templates (vLLM's spellings)."""
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM compatibility: tool calls are parsed whenever the "
                        "model has a tool-call format (detected, or --tool-call-parser)")
    p.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="tool-call format: an mlx_lm.tool_parsers module (json_tools, qwen3_coder, "
                        "mistral, ...), vLLM's names (hermes, qwen3_xml, llama3_json) or none "
                        "(default: detected from the tokenizer and chat template)")
    p.add_argument("--reasoning-parser", default=None, metavar="NAME",
                   help="reasoning markers: qwen3, deepseek_r1 (<think>...</think>) or none "
                        "(default: the tokenizer's think tokens, if any)")
    p.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                   help="a Jinja chat template (file or inline text) replacing the model's")
    p.add_argument("--override-generation-config", type=generation_config, default={}, metavar="JSON",
                   help="sampling defaults for requests that leave them out, over the model's "
                        "generation_config.json, e.g. '{\"temperature\": 0}' (keys: temperature, "
                        "top_p, top_k, min_p, repetition_penalty)")
    p.add_argument("--responses-store-size", type=int, default=1000, metavar="N",
                   help="responses kept in memory for the Responses API's previous_response_id "
                        "(least recently used evicted; 0 keeps none)")
    p.add_argument("--sse-ping-interval", type=float, default=5.0, metavar="SECONDS",
                   help="Anthropic streams send a ping after this much silence")


def generation_config(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    known = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    if not isinstance(value, dict) or any(k not in known for k in value):
        raise argparse.ArgumentTypeError(f"expected a JSON object with keys among {', '.join(known)}")
    return value


def speculative_config(text: str):
    """--speculative-config: vLLM's JSON, e.g. {"method": "ngram", "num_speculative_tokens": 4}."""
    from shoal.engine.config import SpeculativeConfig  # MLX-free

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    try:
        return SpeculativeConfig.from_dict(value)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def chat_template(value: str | None) -> str | None:
    """--chat-template: a file's contents, or the text itself when it is no file."""
    if value is None or "{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"--chat-template: no such file {value!r}")
    return path.read_text(encoding="utf-8")


def check_chat_options(args: argparse.Namespace) -> None:
    """Fail on unknown parser names before the model loads."""
    from shoal.api.tool_formats import THINK_REASONING_PARSERS, load_tool_format
    from shoal.engine.sampling_params import SamplingParams

    if args.tool_call_parser not in (None, "none"):
        load_tool_format(args.tool_call_parser)
    SamplingParams(**args.override_generation_config)  # the ranges any request must respect
    if args.reasoning_parser not in (None, "none", *THINK_REASONING_PARSERS):
        raise ValueError(f"unknown reasoning parser {args.reasoning_parser!r}; known: "
                         f"{', '.join(THINK_REASONING_PARSERS)}, none")


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Options every MLX-using subcommand takes (`shoal bench` should call this too)."""
    p.add_argument("--blas", default="auto", metavar="auto|reference|PATH",
                   help="BLAS for float32 matmuls on Linux CPUs (default auto: OpenBLAS if installed)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="Shoal's log level")
    p.add_argument("--uvicorn-log-level", default=None,
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="the HTTP server's log level (default: --log-level)")


# Each entry adds one subcommand and sets its `handler`. Registration must not import MLX
# (the BLAS is not loaded yet); handlers import what they need. `shoal bench` goes here,
# e.g. `from shoal.bench.cli import add_bench_command` with an MLX-free shoal/bench/cli.py.
def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    from shoal.bench.commands import add_bench_command as add  # bench imports cli's helpers

    add(subparsers)


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_serve_command, add_bench_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Continuous-batching LLM server on MLX.")
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The frozen engine config for `shoal serve`'s flags (raises ValueError)."""
    return EngineConfig(
        model=args.model, block_size=args.block_size, kv_cache_bytes=args.kv_cache_memory,
        num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        prefill_budget_while_decoding=args.prefill_budget_while_decoding,
        enable_prefix_caching=not args.no_prefix_caching, dtype=args.dtype, seed=args.seed,
        attention_backend=args.attention_backend, max_waiting_requests=args.max_waiting_requests,
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        num_state_snapshots=args.num_state_snapshots, snapshot_interval=args.snapshot_interval,
        speculative=args.speculative_config)


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    from_env = os.environ.get(API_KEY_ENV, "")
    return tuple(dict.fromkeys([*args.api_key, *filter(None, from_env.split(","))]))


def check_model(model: str | None) -> None:
    """Fail fast (ValueError) on a model argument that can name nothing, before loading."""
    if model is None:
        return
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {model!r} has no config.json (not an mlx-lm model)")
        return
    if path.exists():
        raise ValueError(f"model {model!r} is neither an mlx-lm directory nor a .gguf file")
    if model.startswith((".", "/", "~")) or path.suffix == ".gguf" or not HF_ID.fullmatch(model):
        raise ValueError(f"model {model!r}: no such file or directory (and not a Hugging Face id)")


HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def server_config(args: argparse.Namespace):
    from shoal.api.config import ServerConfig  # MLX-free, like EngineConfig

    return ServerConfig(served_model_name=args.served_model_name, aliases=tuple(args.alias),
                        api_keys=api_keys(args), max_request_bytes=args.max_request_bytes,
                        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                        chat_template=chat_template(args.chat_template),
                        generation_config=tuple(args.override_generation_config.items()),
                        ping_interval=args.sse_ping_interval, body_timeout=args.body_timeout,
                        allowed_origins=args.allowed_origins,
                        metrics_require_key=args.metrics_require_key,
                        log_stats=not args.disable_log_stats,
                        responses_store_size=args.responses_store_size)


def run_serve(args: argparse.Namespace) -> int:
    from shoal.api.server import bind_socket

    try:  # every flag, the model path and the port are checked before loading the model
        if args.model_flag is not None:
            if args.model is not None and args.model != args.model_flag:
                raise ValueError(f"two models given: {args.model!r} and --model {args.model_flag!r}")
            args.model = args.model_flag
        check_model(args.model)
        engine = engine_config(args)
        check_chat_options(args)
        config = server_config(args)
        for name in ("drain_timeout", "header_timeout", "keep_alive_timeout"):
            if not getattr(args, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if args.data_parallel_size < 1:
            raise ValueError("--data-parallel-size must be >= 1")
    except ValueError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    if args.data_parallel_size > 1:
        return run_cluster(args, config.api_keys)
    if engine.tensor_parallel_size > 1 or engine.pipeline_parallel_size > 1:
        return run_model_parallel(args, engine, config)
    return run_http(args, engine, config)


def run_model_parallel(args: argparse.Namespace, engine: EngineConfig, config) -> int:
    """Rank 0 serves HTTP; other ranks run the worker loop. Without a launcher, this process
    is rank 0 and starts the others here, ending them when it ends."""
    import tempfile

    from shoal.engine import distributed

    if distributed.RANK_ENV in os.environ:
        if int(os.environ[distributed.RANK_ENV]) != 0:
            return _exit_now(distributed.run_worker(engine))
        return _exit_now(run_http(args, engine, config))
    with tempfile.TemporaryDirectory(prefix="shoal-tp-") as workdir:
        workers = distributed.launch_local_workers(distributed.group_size(engine),
                                                   ["-m", "shoal", "serve", *args.raw_argv], Path(workdir))
        try:
            code = run_http(args, engine, config)
        finally:
            for worker in workers:
                try:
                    worker.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
        bad = [w.returncode for w in workers if w.returncode]
    return _exit_now(code or (1 if bad else 0))


def _exit_now(code: int) -> int:
    """Exit at once: after a lost rank the MLX thread may be stuck in a collective forever,
    and an ordinary exit would wait for it."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_http(args: argparse.Namespace, engine: EngineConfig, config) -> int:
    from shoal.api.server import bind_socket

    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc.strerror or exc)
        return 2
    from shoal.api.app import create_app
    from shoal.api.server import serve

    log.info("model: %s", args.model or "SmolLM2-135M-Instruct (built-in default)")
    return serve(create_app(config, engine), sock, log_level=args.uvicorn_log_level or args.log_level,
                 drain_timeout=args.drain_timeout, header_timeout=args.header_timeout,
                 keep_alive_timeout=args.keep_alive_timeout)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `shoal` console script and `python -m shoal`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.raw_argv = argv[1:]  # the subcommand's own arguments (`shoal serve -dp N` re-runs them)
    configure_logging(args.log_level)
    try:
        log.info(preload_blas(args.blas))  # before anything imports MLX
    except OSError as exc:
        log.error("--blas %s: cannot load it: %s", args.blas, exc)
        return 2
    return args.handler(args)

if __name__ == "__main__":
    sys.exit(main())
