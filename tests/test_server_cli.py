"""`shoal serve` flag parsing and startup order, without loading a model."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from shoal.cli import api_keys, build_parser, engine_config, parse_size


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
