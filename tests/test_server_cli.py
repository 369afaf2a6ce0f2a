"""`shoal serve` flag parsing and startup order, without loading a model."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from shoal.cli import api_keys, build_parser, engine_config, parse_size

pytest_plugins = ["server_util"]


@pytest.mark.parametrize("text,size", [
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("4096", 4096),
    ("64 kib", 64 * 1024), ("1g", 10**9),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "2 parsecs", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_flags_build_the_engine_config():
    args = build_parser().parse_args([
        "serve", "/models/x", "--block-size", "32", "--kv-cache-memory", "512MiB", "--num-blocks", "99",
        "--max-num-seqs", "8", "--max-num-batched-tokens", "256", "--max-model-len", "1024",
        "--no-prefix-caching", "--dtype", "float16", "--seed", "5"])
    config = engine_config(args)
    assert (config.model, config.block_size, config.kv_cache_bytes, config.num_blocks) == \
        ("/models/x", 32, 512 * 2**20, 99)
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len) == (8, 256, 1024)
    assert (config.enable_prefix_caching, config.dtype, config.seed) == (False, "float16", 5)
    assert (args.host, args.port, args.blas, args.log_level) == ("127.0.0.1", 8000, "auto", "info")


def test_defaults_are_the_engine_defaults():
    config = engine_config(build_parser().parse_args(["serve"]))
    assert config.model is None and config.kv_cache_bytes == 2 * 2**30
    assert config.max_num_seqs == 64 and config.enable_prefix_caching


def test_api_keys_from_flags_and_environment(monkeypatch):
    monkeypatch.setenv("SHOAL_API_KEY", "env-key,flag-key")
    args = build_parser().parse_args(["serve", "--api-key", "flag-key", "--api-key", "other"])
    assert api_keys(args) == ("flag-key", "other", "env-key")


def test_importing_the_cli_does_not_import_mlx():
    # The BLAS preload only works if MLX is not loaded yet when main() runs.
    code = "import sys, shoal.cli, shoal.api.config; print(sorted(m for m in sys.modules if m.startswith('mlx')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_invalid_config_exits_2_before_loading_anything():
    out = subprocess.run([sys.executable, "-m", "shoal", "serve", "--block-size", "7", "--blas", "reference"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "BLAS: reference" in out.stderr and "block_size must be one of" in out.stderr


def test_unknown_subcommand_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "shoal", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def serve_subcommand() -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]


def test_every_serve_flag_has_help_and_shows_its_default():
    serve = serve_subcommand()
    text = serve.format_help()
    for action in serve._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help"
        if action.default not in (None, False, [], ()):
            assert "default" in serve._get_formatter()._get_help_string(action), action.option_strings
    assert "(default: 8000)" in " ".join(text.split()) and "(default: 2GiB)" in " ".join(text.split())


def test_vllm_spellings_are_aliases():
    args = build_parser().parse_args([
        "serve", "--model", "/models/x", "--no-enable-prefix-caching", "--disable-log-requests",
        "--allowed-origins", '["https://a.example", "https://b.example"]', "--uvicorn-log-level", "warning"])
    assert args.model_flag == "/models/x" and args.no_prefix_caching and args.disable_log_requests
    assert args.allowed_origins == ("https://a.example", "https://b.example")
    assert args.uvicorn_log_level == "warning"
    comma = build_parser().parse_args(["serve", "--allowed-origins", "https://a.example, *"])
    assert comma.allowed_origins == ("https://a.example", "*")


def run_shoal(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["serve", "/no/such/model"], "no such file or directory"),
    (["serve", "--model", "/no/such/model"], "no such file or directory"),
    (["serve", "/tmp"], "has no config.json"),
    (["serve", "--blas", "/bad/path"], "--blas /bad/path: cannot load it"),
    (["serve", "a", "--model", "b"], "two models given"),
])
def test_startup_errors_are_one_line_and_exit_2(args, message):
    done = run_shoal(*args)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "Started server process" not in done.stderr


def test_a_busy_port_fails_before_the_model_loads(tiny_model_dir):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_shoal("serve", str(tiny_model_dir), "--blas", "reference", "--port", str(port))
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "engine ready" not in done.stderr and "Traceback" not in done.stderr
