"""Engine configuration: one frozen tree, validated once. Values discovered at load time
(pool size, context length, model shape) are returned in `ModelInfo`, never written back."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `--speculative-config` for n-gram (prompt lookup) drafts."""

    method: str = "ngram"
    num_speculative_tokens: int = 4  # draft tokens per row and step
    prompt_lookup_min: int = 2  # shortest n-gram matched
    prompt_lookup_max: int = 4  # longest n-gram matched (tried first)
    disable_by_batch_size: int = 4  # no drafts in a step once this many requests run (CPU: see README)

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative method {self.method!r} is not supported (only 'ngram')")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        if self.num_speculative_tokens < 1 or self.disable_by_batch_size < 1:
            raise ValueError("num_speculative_tokens and disable_by_batch_size must be >= 1")

    @classmethod
    def from_dict(cls, values: dict) -> SpeculativeConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown speculative config keys {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # local mlx-lm dir, Hugging Face id, .gguf file; None = offline default
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int = 2 * GiB  # KV pool size, allocated once at startup
    num_blocks: int | None = None  # overrides kv_cache_bytes (tests use tiny pools)
    max_num_seqs: int = 64  # most requests running at once
    max_num_batched_tokens: int = 2048  # token budget of one step
    prefill_budget_while_decoding: int = 512  # prompt tokens per step while any request decodes
    max_model_len: int | None = None  # None = the model's own, capped by the pool
    enable_prefix_caching: bool = True
    dtype: str = "auto"  # auto = float32 on CPU (only float32 uses BLAS), checkpoint's own on GPU
    seed: int = 0  # seeds sampling for requests without their own seed
    attention_backend: str = "auto"  # auto (cascade where the cost rule says), gather, cascade
    max_waiting_requests: int = 1024  # past this many queued, new requests are refused; 0 = no bound
    tensor_parallel_size: int = 1  # ranks of mx.distributed sharing every layer (engine/distributed.py)
    pipeline_parallel_size: int = 1  # ranks of mx.distributed holding a run of layers each
    # Recurrent (hybrid) models: states kept at block boundaries so prefixes can be reused.
    num_state_snapshots: int | None = None  # None = a quarter of the KV memory the state slots leave
    snapshot_interval: int = 512  # tokens between snapshots in a long prompt (whole blocks)
    speculative: SpeculativeConfig | None = None  # n-gram drafts verified in the batch; None = off

    def __post_init__(self) -> None:
        checks = [
            (self.block_size in (8, 16, 32, 64, 128), f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}"),
            (self.kv_cache_bytes > 0, "kv_cache_bytes must be > 0"),
            (self.num_blocks is None or self.num_blocks >= 2, "num_blocks must be >= 2"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"),
            (self.prefill_budget_while_decoding >= 1, "prefill_budget_while_decoding must be >= 1"),
            (self.tensor_parallel_size >= 1 and self.pipeline_parallel_size >= 1,
             "tensor_parallel_size and pipeline_parallel_size must be >= 1"),
            (self.max_waiting_requests >= 0, "max_waiting_requests must be >= 0 (0: no bound)"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be >= 2"),
            (self.num_state_snapshots is None or self.num_state_snapshots >= 0, "num_state_snapshots must be >= 0"),
            (self.snapshot_interval >= self.block_size,
             f"snapshot_interval must be at least block_size ({self.block_size}), got {self.snapshot_interval}"),
            (self.dtype in ("auto", "float32", "float16", "bfloat16"), f"unknown dtype {self.dtype!r}"),
            (self.attention_backend in ("auto", "gather", "cascade"),
             f"attention_backend must be auto, gather or cascade, got {self.attention_backend!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
