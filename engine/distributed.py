"""Tensor and pipeline parallelism over `mx.distributed` (the ring backend over TCP here;
JACCL over Thunderbolt on Macs). Every rank holds its shard of the weights (mlx-lm's
`model.shard`, or a run of layers with its `pipeline`) and of the KV heads or layers in its own
paged pool; rank 0 runs HTTP, the scheduler and sampling, and sends
each step to the other ranks, which run the same forward: the layers' all-reduces need every
rank, and equal inputs keep every rank's pool in step.

    rank 0   schedule -> send step -> forward (all_sum per layer) -> sample -> update
    rank k               recv step -> forward (all_sum per layer)

A step message carries the rows (tokens, positions, block table, state slot, the state snapshots
to restore and take) and whether the previous step succeeded, so workers commit or drop
recurrent state, and keep snapshots of their own layers' states, exactly as rank 0 did.

A lost rank ends the server with exit code 1 and an error for every request in flight: a
collective that fails at once raises DeviceLostError; one that hangs (MLX's ring backend can
leave a step waiting forever on a dead peer) is cut short by the watch on the worker
processes `shoal serve` started, which sets `lost` for the engine. Across machines,
`mlx.launch` ends every rank when one exits with an error.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from shoal.engine.async_engine import DeviceLostError
from shoal.engine.config import EngineConfig
from shoal.engine.model_runner import ModelRunner
from shoal.engine.outputs import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from shoal.engine.platform import set_blas_threads

log = logging.getLogger("shoal")
RANK_ENV, HOSTFILE_ENV = "MLX_RANK", "MLX_HOSTFILE"
BLAS_THREADS_ENV = "OPENBLAS_NUM_THREADS"  # read by a worker's BLAS when it loads
LOCAL_WORKERS: list[subprocess.Popen] = []  # the ranks `launch_local_workers` started


class StepChannel:
    """Rank 0's step messages to the other ranks: a length, then the pickled bytes, each one
    all_sum over the group (only rank 0 contributes)."""

    def __init__(self, group):
        self.group = group
        self.rank = group.rank()
        self.bytes_sent = 0  # step messages, for benchmarks
        self.num_sent = 0

    def _all_sum(self, values: np.ndarray) -> np.ndarray:
        out = mx.distributed.all_sum(mx.array(values), group=self.group, stream=mx.cpu)
        return np.array(out)

    def send(self, message) -> None:
        data = np.frombuffer(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
        self._all_sum(np.array([data.size], dtype=np.int32))
        self._all_sum(data)
        self.bytes_sent += 4 + data.size
        self.num_sent += 1

    def recv(self):
        size = int(self._all_sum(np.zeros(1, dtype=np.int32))[0])
        return pickle.loads(self._all_sum(np.zeros(size, dtype=np.uint8)).tobytes())


def _rows(sched: SchedulerOutput) -> list[tuple]:
    return [(r.token_ids, r.start_pos, r.block_ids, r.state_slot, r.restore_snapshot, r.take_snapshot,
             r.num_draft_tokens) for r in sched.scheduled]


def _scheduled(rows: list[tuple]) -> tuple[ScheduledRequest, ...]:
    return tuple(ScheduledRequest(request_id="", token_ids=t, start_pos=s, block_ids=b, sample=False,
                                  params=None, history=None, num_prompt_tokens=0, state_slot=slot,
                                  restore_snapshot=restore, take_snapshot=take, num_draft_tokens=k)
                 for t, s, b, slot, restore, take, k in rows)


class ModelParallelRunner:
    """Rank 0's model runner: each step goes to the other ranks first, then runs here."""

    def __init__(self, runner: ModelRunner, channel: StepChannel):
        self.runner = runner
        self.channel = channel
        self._last_ok = True
        self.broken: BaseException | None = None
        self.lost = threading.Event()  # a rank is gone: the engine polls this (AsyncEngine)

    def watch(self, workers: list[subprocess.Popen]) -> None:
        """Set `lost` as soon as one of these worker processes exits."""
        def poll():
            while not self.lost.is_set():
                for rank, worker in enumerate(workers, start=1):
                    if worker.poll() is not None:
                        self.broken = RuntimeError(f"rank {rank} exited with code {worker.returncode}")
                        self.lost.set()
                time.sleep(0.2)

        threading.Thread(target=poll, daemon=True, name="shoal-rank-watch").start()

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if self.broken is not None:
            raise DeviceLostError(self.lost_reason)
        if not sched.scheduled:
            return self.runner.execute(sched)
        try:
            self.channel.send((self._last_ok, _rows(sched)))
            self._last_ok = False
            out = self.runner.execute(sched)
        except RuntimeError as exc:
            if "[ring]" not in str(exc):  # this step's own failure: the ranks are fine
                raise
            self.broken = exc
            self.lost.set()
            raise DeviceLostError(self.lost_reason) from exc
        self._last_ok = True
        return out

    @property
    def lost_reason(self) -> str:
        return f"a tensor-parallel rank is gone: {self.broken}"

    def close(self) -> None:
        if self.broken is None:
            try:
                self.channel.send((self._last_ok, None))
            except RuntimeError:
                pass
        self.runner.close()


def worker_loop(runner: ModelRunner, channel: StepChannel) -> int:
    """A worker rank's life: run every step rank 0 sends until it sends None."""
    while True:
        ok, rows = channel.recv()
        runner.end_step(ok)
        if rows is None:
            runner.close()
            return 0
        runner.forward_only(_scheduled(rows))


def group_size(config: EngineConfig) -> int:
    return config.tensor_parallel_size * config.pipeline_parallel_size


def init_group(config: EngineConfig):
    group = mx.distributed.init(backend="ring", strict=True)
    if group.size() != group_size(config):
        raise ValueError(f"{group_size(config)} ranks wanted (tensor x pipeline parallel), but the launcher "
                         f"started {group.size()}")
    return group


def load_sharded(config: EngineConfig, group) -> ModelRunner:
    """This rank's runner: the model sharded over the group (its heads of every layer with
    tensor parallelism, its run of layers with pipeline parallelism), its own paged pool."""
    from shoal.engine.loader import load_model

    model, tokenizer, path = load_model(config.model, config.dtype)
    name = type(model).__module__.rsplit(".", 1)[-1]
    if config.pipeline_parallel_size > 1:
        if config.tensor_parallel_size > 1:
            raise ValueError("tensor and pipeline parallelism together are not supported")
        if not hasattr(getattr(model, "model", None), "pipeline"):
            raise ValueError(f"{name}: mlx-lm cannot pipeline this architecture")
        model.model.pipeline(group)
    else:
        if not hasattr(model, "shard"):
            raise ValueError(f"{name}: mlx-lm cannot shard this architecture for tensor parallelism")
        args = getattr(model, "args", None)
        for field in ("num_attention_heads", "num_key_value_heads"):
            heads = getattr(args, field, None)
            if heads is not None and heads % group.size():
                raise ValueError(f"{field}={heads} is not divisible by --tensor-parallel-size {group.size()}")
        model.shard(group)
    mx.eval(model.parameters())
    runner = ModelRunner.from_model(model, tokenizer, config, str(path))
    # Every rank must have the blocks rank 0's scheduler hands out: a pipeline rank with fewer
    # layers would fit more in the same memory, so all take the smallest count.
    # Likewise the state snapshots (each rank keeps its own layers' states under the same ids).
    # Every rank rebuilds or none does: the rebuild's probe forward has collectives of its own.
    counts = mx.array([runner.info.num_blocks, runner.info.num_state_snapshots])
    low = np.array(mx.distributed.all_min(counts, group=group, stream=mx.cpu)).tolist()
    high = np.array(mx.distributed.all_max(counts, group=group, stream=mx.cpu)).tolist()
    if low != high:
        agreed = replace(config, num_blocks=low[0], num_state_snapshots=low[1])
        runner = ModelRunner.from_model(model, tokenizer, agreed, str(path))
    runner.info = replace(runner.info, tensor_parallel_size=config.tensor_parallel_size,
                          pipeline_parallel_size=config.pipeline_parallel_size)
    return runner


def rank0_runner(config: EngineConfig) -> ModelParallelRunner:
    group = init_group(config)
    runner = load_sharded(config, group)
    log.info("model parallel: rank 0 of %d (tensor %d x pipeline %d), %d attention layers and %d KV heads "
             "on this rank", group.size(), config.tensor_parallel_size, config.pipeline_parallel_size,
             runner.info.num_layers, runner.info.num_kv_heads)
    tp = ModelParallelRunner(runner, StepChannel(group))
    tp.watch(LOCAL_WORKERS)
    return tp


def run_worker(config: EngineConfig) -> int:
    group = init_group(config)
    _exit_with_parent()
    runner = load_sharded(config, group)
    log.info("model parallel: rank %d of %d ready", group.rank(), group.size())
    try:
        return worker_loop(runner, StepChannel(group))
    except RuntimeError as exc:
        log.error("model parallel rank %d: lost rank 0 (%s)", group.rank(), exc)
        return 1


def _exit_with_parent() -> None:
    """A worker started by `shoal serve` on this machine ends when its rank 0 tells it to or
    dies, never on its own signal: a Ctrl-C reaches the whole process group, and rank 0 must
    be able to drain."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.environ.get("SHOAL_TP_PARENT") == str(parent):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        threading.Thread(target=watch, daemon=True, name="shoal-parent-watch").start()


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch_local_workers(size: int, command: list[str], workdir: Path) -> list[subprocess.Popen]:
    """Start ranks 1..size-1 of a one-machine ring (`python COMMAND`, e.g. `-m shoal serve`
    with the same flags) and point this process at rank 0, each rank with its share of the
    cores for BLAS. The caller runs rank 0 and ends the workers."""
    hostfile = workdir / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(size)]))
    os.environ[HOSTFILE_ENV], os.environ[RANK_ENV] = str(hostfile), "0"
    threads = max(1, (os.cpu_count() or 1) // size)  # the ranks share this machine's cores
    os.environ[BLAS_THREADS_ENV] = str(threads)
    set_blas_threads(threads)
    workers = []
    for rank in range(1, size):
        env = dict(os.environ, **{RANK_ENV: str(rank), "SHOAL_TP_PARENT": str(os.getpid())})
        workers.append(subprocess.Popen([sys.executable, *command], env=env))
    LOCAL_WORKERS[:] = workers
    return workers
