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
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from shoal import __version__
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


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                              description="Serve a model over an OpenAI-compatible HTTP API.")
    p.add_argument("model", nargs="?", default=None,
                   help="mlx-lm directory, Hugging Face id or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--kv-cache-memory", type=parse_size, default=EngineConfig.kv_cache_bytes,
                   metavar="SIZE", help="KV pool size, e.g. 2GiB or 512MiB (default 2GiB)")
    p.add_argument("--num-blocks", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-num-seqs", type=positive_int, default=EngineConfig.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=positive_int,
                   default=EngineConfig.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="context window (default: the model's, capped by the KV pool)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "gather", "cascade"],
                   help="auto: cascade attention where rows share a long prefix of KV blocks, "
                        "the gather path elsewhere; gather: never cascade; cascade: wherever two "
                        "rows share a block")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0, help="seed for requests without their own")
    p.add_argument("--api-key", action="append", default=[],
                   help=f"require this key (repeatable; also read from ${API_KEY_ENV}). "
                        "Protects every route except / and /health")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients use (default: the model directory's name)")
    p.add_argument("--alias", action="append", default=[], help="another accepted model name (repeatable)")
    p.add_argument("--max-request-bytes", type=parse_size, default="8MiB", metavar="SIZE",
                   help="largest request body accepted (default 8MiB)")
    add_chat_options(p)
    add_common_options(p)
    p.set_defaults(handler=run_serve)


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
    p.add_argument("--sse-ping-interval", type=float, default=5.0, metavar="SECONDS",
                   help="Anthropic streams send a ping after this much silence (default 5)")


def generation_config(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    known = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    if not isinstance(value, dict) or any(k not in known for k in value):
        raise argparse.ArgumentTypeError(f"expected a JSON object with keys among {', '.join(known)}")
    return value


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
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


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
        enable_prefix_caching=not args.no_prefix_caching, dtype=args.dtype, seed=args.seed,
        attention_backend=args.attention_backend)


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    from_env = os.environ.get(API_KEY_ENV, "")
    return tuple(dict.fromkeys([*args.api_key, *filter(None, from_env.split(","))]))


def run_serve(args: argparse.Namespace) -> int:
    from shoal.api.config import ServerConfig  # MLX-free, like EngineConfig

    try:  # every flag is checked before the slow part (loading the model)
        engine = engine_config(args)
        check_chat_options(args)
        config = ServerConfig(served_model_name=args.served_model_name, aliases=tuple(args.alias),
                              api_keys=api_keys(args), max_request_bytes=args.max_request_bytes,
                              tool_call_parser=args.tool_call_parser,
                              reasoning_parser=args.reasoning_parser,
                              chat_template=chat_template(args.chat_template),
                              generation_config=tuple(args.override_generation_config.items()),
                              ping_interval=args.sse_ping_interval)
    except ValueError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    import uvicorn

    from shoal.api.app import create_app

    log.info("model: %s", args.model or "SmolLM2-135M-Instruct (built-in default)")
    uvicorn.run(create_app(config, engine), host=args.host, port=args.port,
                log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `shoal` console script and `python -m shoal`."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    log.info(preload_blas(args.blas))  # before anything imports MLX
    return args.handler(args)

if __name__ == "__main__":
    sys.exit(main())
