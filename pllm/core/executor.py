"""Workers behind an executor. The engine talks to the executor only::

    UniProcExecutor     one worker, in this process
    MultiprocExecutor   tensor parallelism over N ranks: rank 0's worker in
                        this process, ranks 1..N-1 each in a process of its own

Under tensor parallelism rank 0 schedules, builds each step's flat inputs and
samples. It sends the inputs to the other ranks over a pipe (a few small
tensors), and the ranks meet in the communicator's collectives inside the
forward and the LM head (``pllm.models.parallel``); only rank 0 samples.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import pickle
import signal
import socket
import threading
import time
import traceback
import weakref
from collections import deque

import torch
import torch.distributed

from pllm.core.config import EngineConfig
from pllm.core.interfaces import AttentionMetadata, Communicator, Platform
from pllm.core.kv_cache.fp8 import checkpoint_scale_factor, is_fp8, resolve_kv_cache_dtype
from pllm.core.runner import ModelRunner, RunnerOutput, StepInputs
from pllm.core.scheduler import SchedulerOutput
from pllm.models import get_model_class
from pllm.models.layers import ForwardContext
from pllm.models.parallel import TensorParallel

logger = logging.getLogger("pllm")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(config: EngineConfig, platform: Platform) -> torch.dtype:
    caps = platform.capabilities
    if config.model.dtype == "auto":
        return caps.default_dtype
    dtype = _DTYPES[config.model.dtype]
    if not caps.supports_dtype(dtype):
        names = ", ".join(str(d).removeprefix("torch.") for d in caps.dtypes)
        raise ValueError(f"dtype={config.model.dtype!r} is not supported on {platform.name}; supported: {names}")
    return dtype


class Worker:
    """Holds the model (this rank's shard of it) and the KV cache on one device."""

    def __init__(self, config: EngineConfig, platform: Platform, loaded, max_model_len: int,
                 rank: int = 0, comm: Communicator | None = None) -> None:
        self.max_model_len = max_model_len
        self.config = config
        self.platform = platform
        self.tp = TensorParallel(rank, config.parallel.tensor_parallel_size, comm)
        self.device = platform.device(rank)
        self.dtype = resolve_dtype(config, platform)
        caps = platform.capabilities
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, self.dtype, caps,
                                                     platform.name)
        if not caps.supports_block_size(config.cache.block_size):
            raise ValueError(
                f"block_size={config.cache.block_size} is not supported on {platform.name}; "
                f"supported: {', '.join(map(str, caps.block_sizes))}"
            )
        t0 = time.perf_counter()
        cls = get_model_class(loaded.hf_config.model_type)
        with torch.device("meta"):
            model = cls(loaded.hf_config, max_positions=max_model_len, tp=self.tp)
        # Parameters take the model dtype before they take memory: the
        # checkpoint's tensors convert as they are copied in, so loading never
        # holds a second, wider copy of the weights.
        model = model.to(self.dtype).to_empty(device=self.device)
        model.rotary.reset_tables()  # fp32, as in transformers
        model.load_weights(loaded.weights())
        _adapt_kv_scales(model, self.kv_cache_dtype)
        model = model.eval().requires_grad_(False)
        model.tie_weights()
        self.model = platform.prepare_model(model, config)
        spec = self.model.spec
        if not caps.supports_head_dim(spec.head_dim):
            raise ValueError(f"head_dim={spec.head_dim} is not supported on {platform.name}")
        if rank == 0:
            logger.info("loaded %s (%s) in %.1fs", loaded.name, self.dtype, time.perf_counter() - t0)
            if is_fp8(self.kv_cache_dtype):
                self._log_kv_scales()
        self.backend = platform.make_attention_backend()
        self.spec = spec

    def _log_kv_scales(self) -> None:
        attns = [layer.self_attn.attn for layer in self.model.layers]
        name = str(self.kv_cache_dtype).removeprefix("torch.")
        if all(not a.scales_from_checkpoint for a in attns):
            logger.warning("KV cache in %s with scales 1.0 (the checkpoint gives none): keys "
                           "or values beyond the format's range are clipped", name)
        else:
            logger.info("KV cache in %s with the checkpoint's per-layer scales", name)

    def bytes_per_block(self) -> int:
        spec, bs = self.spec, self.config.cache.block_size
        elem = self.kv_cache_dtype.itemsize
        return 2 * bs * spec.num_kv_heads * spec.head_dim * elem * self.model.num_layers

    @torch.inference_mode()
    def profile_run(self) -> int:
        """One forward pass of a full step's token budget (one sequence, a
        throwaway cache), plus the LM head for ``max_num_seqs`` rows: the
        activation peak the KV cache must leave room for. Returns the bytes
        of the throwaway cache."""
        bs = self.config.cache.block_size
        num_tokens = min(self.config.scheduler.max_num_batched_tokens, self.model.rotary.max_positions)
        num_blocks = -(-num_tokens // bs)
        spec, dev = self.spec, self.device
        shape = self.backend.kv_cache_shape(num_blocks, bs, spec.num_kv_heads, spec.head_dim)
        caches = [torch.zeros(shape, dtype=self.kv_cache_dtype, device=dev)
                  for _ in range(self.model.num_layers)]
        metadata = AttentionMetadata(
            num_seqs=1, num_tokens=num_tokens, num_decodes=0, max_query_len=num_tokens,
            max_seq_len=num_tokens, block_size=bs,
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=dev),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=dev).unsqueeze(0),
            slot_mapping=torch.arange(num_tokens, dtype=torch.int64, device=dev),
            query_start_loc_cpu=[0, num_tokens], seq_lens_cpu=[num_tokens],
        )
        metadata = self.backend.prepare_metadata(metadata)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        positions = torch.arange(num_tokens, device=dev)
        hidden = self.model(ids, positions, ForwardContext(self.backend, metadata, caches))
        rows = min(self.config.scheduler.max_num_seqs, num_tokens)
        self.model.compute_logits(hidden[:rows])
        cache_bytes = sum(c.numel() * c.element_size() for c in caches)
        del caches, hidden
        self.platform.synchronize()
        return cache_bytes

    def available_blocks(self) -> int:
        """How many KV-cache blocks fit on this rank's device. Ranks that share
        one device (the host) share its budget: a block costs every rank's
        bytes of it."""
        allocator = self.platform.make_kv_cache_allocator()
        if self.platform.capabilities.profiles_memory:
            allocator.profile(self.profile_run)
        per_block = self.bytes_per_block()
        if self.platform.capabilities.ranks_share_device:
            per_block *= self.tp.size
        num_blocks = allocator.num_blocks(self.config.cache, per_block)
        if num_blocks < 1:
            raise ValueError("no memory left for the KV cache; raise --kv-cache-memory")
        return num_blocks

    def init_kv_cache(self) -> int:
        num_blocks = self.available_blocks()
        self.allocate_kv_cache(num_blocks)
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The cache of ``num_blocks`` blocks (the same on every rank), the
        decode graphs over it, and the runner."""
        allocator = self.platform.make_kv_cache_allocator()
        spec = self.spec
        shape = self.backend.kv_cache_shape(num_blocks, self.config.cache.block_size,
                                            spec.num_kv_heads, spec.head_dim)
        caches = allocator.allocate(self.model.num_layers, shape, self.kv_cache_dtype, self.device)
        decode_runner = None
        if not self.config.device.enforce_eager:
            decode_runner = self.platform.make_decode_runner(
                self.model, self.backend, caches, self.config, self.max_model_len)
            if decode_runner is not None:
                decode_runner.capture_all()
        self.runner = ModelRunner(self.model, self.backend, caches, self.config.cache.block_size,
                                  self.device, decode_runner)

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(sched)


class UniProcExecutor:
    def __init__(self, config: EngineConfig, platform: Platform, loaded, max_model_len: int) -> None:
        self.worker = Worker(config, platform, loaded, max_model_len)

    def init_kv_cache(self) -> int:
        return self.worker.init_kv_cache()

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.worker.execute(sched)

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig, platform: Platform, loaded, max_model_len: int):
    if config.parallel.tensor_parallel_size == 1:
        return UniProcExecutor(config, platform, loaded, max_model_len)
    return MultiprocExecutor(config, platform, loaded, max_model_len)


def check_tensor_parallel(config: EngineConfig, platform: Platform, hf_config) -> None:
    """Fail before any process starts when the ranks cannot be placed or the
    model does not split evenly over them."""
    size = config.parallel.tensor_parallel_size
    caps = platform.capabilities
    if not caps.ranks_share_device and size > platform.device_count():
        raise ValueError(
            f"tensor_parallel_size={size} needs {size} {platform.name} devices; "
            f"{platform.device_count()} visible"
        )
    get_model_class(hf_config.model_type).spec_class(hf_config, size)


class WorkerProcessError(RuntimeError):
    """A tensor-parallel rank failed; the message carries its traceback."""


class ExecutorBrokenError(RuntimeError):
    """The executor cannot run another step (a tensor-parallel rank failed or
    a step broke off mid-way, leaving the ranks out of step); the engine
    must be rebuilt."""


class MultiprocExecutor:
    """Tensor parallelism on one machine: see the module docstring. Worker
    processes start with ``spawn`` (a script that builds an engine with
    ``tensor_parallel_size > 1`` needs an ``if __name__ == "__main__":`` guard,
    as with any spawning library) and load the model from ``loaded.path``
    with the platform's class.

    A step that fails is fatal: once its inputs have gone out, the other ranks
    are somewhere inside its all-reduces, and the next step would pair with
    those. The executor stops its workers and raises ``ExecutorBrokenError``
    from then on."""

    def __init__(self, config: EngineConfig, platform: Platform, loaded, max_model_len: int) -> None:
        size = config.parallel.tensor_parallel_size
        check_tensor_parallel(config, platform, loaded.hf_config)
        if torch.distributed.is_initialized():
            raise RuntimeError(
                "this process already belongs to a process group (another tensor-parallel "
                "engine?); shut that engine down first (LLM.shutdown())"
            )
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self._procs: list = []
        self._conns: list = []
        self._early: list[deque] = []
        self._send_lock = threading.Lock()
        self._broken: str | None = None
        self._stopping = threading.Event()
        self._comm_holder: list[Communicator] = []
        for rank in range(1, size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, name=f"pllm-tp-rank{rank}", daemon=True,
                args=(rank, config, type(platform), loaded.path, max_model_len, init_method, child),
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
            self._early.append(deque())
        self._finalizer = weakref.finalize(self, _shut_down, self._procs, self._conns,
                                           self._comm_holder, self._stopping)
        try:
            self._comm_holder.append(self._join_group(platform, size, init_method))
            self.worker = Worker(config, platform, loaded, max_model_len, rank=0,
                                 comm=self._comm_holder[0])
            for i in range(len(self._conns)):
                self._recv(i, "ready")
        except BaseException:
            self.shutdown()
            raise
        threading.Thread(target=self._watch, name="pllm-tp-watch", daemon=True).start()
        logger.info("tensor parallelism over %d ranks (%s)", size, platform.capabilities.distributed_backend)

    def init_kv_cache(self) -> int:
        for conn in self._conns:
            self._send(conn, "available_blocks")
        num_blocks = min([self.worker.available_blocks()]
                         + [self._recv(i, "available_blocks") for i in range(len(self._conns))])
        for conn in self._conns:
            self._send(conn, "allocate", num_blocks)
        self.worker.allocate_kv_cache(num_blocks)
        for i in range(len(self._conns)):
            self._recv(i, "allocate")
        self.worker.runner.on_step = self._broadcast
        return num_blocks

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        if self._broken is not None:
            raise ExecutorBrokenError(self._broken)
        try:
            return self.worker.execute(sched)
        except BaseException as exc:
            error = self._worker_error() or self._broken or f"a step failed on rank 0: {exc!r}"
            self._broken = f"tensor-parallel group stopped: {error}"
            self._stopping.set()
            for proc in self._procs:  # they may be waiting in an all-reduce that never comes
                proc.kill()
            self.shutdown()
            raise ExecutorBrokenError(self._broken) from exc

    def shutdown(self) -> None:
        self._finalizer()

    # ---- plumbing ----------------------------------------------------------

    def _send(self, conn, kind: str, payload=None) -> None:
        with self._send_lock:
            _send(conn, kind, payload)

    def _broadcast(self, inputs: StepInputs) -> None:
        data = pickle.dumps(("step", inputs), protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            for conn in self._conns:
                conn.send_bytes(data)

    def _watch(self) -> None:
        """Log a rank that dies at once: on NCCL a dead peer is not an error,
        rank 0 would just wait in its next all-reduce until the timeout."""
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self._procs, start=1)}
        ready = mp.connection.wait(list(sentinels))
        if not self._stopping.is_set():
            dead = []
            for sentinel in ready:
                proc = self._procs[sentinels[sentinel] - 1]
                proc.join(timeout=1)  # reap it, for its exit code
                dead.append(f"rank {sentinels[sentinel]} (exit code {proc.exitcode})")
            self._broken = f"tensor-parallel worker died: {', '.join(dead)}"
            logger.error("%s; the engine cannot run another step", self._broken)

    def _join_group(self, platform: Platform, size: int, init_method: str) -> Communicator:
        """Rank 0's communicator; meanwhile a rank that fails to start is
        reported at once instead of after the rendezvous times out."""
        box: dict = {}

        def join() -> None:
            try:
                box["comm"] = platform.make_communicator(0, size, init_method)
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=join, name="pllm-tp-rendezvous", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            for i in range(len(self._conns)):
                self._poll(i)
        if "error" in box:
            raise box["error"]
        return box["comm"]

    def _poll(self, i: int) -> None:
        """Take rank ``i + 1``'s pending messages; raise if it failed."""
        conn, proc = self._conns[i], self._procs[i]
        try:
            while conn.poll():
                kind, payload = pickle.loads(conn.recv_bytes())
                if kind == "error":
                    raise WorkerProcessError(f"tensor-parallel rank {i + 1} failed:\n{payload}")
                self._early[i].append((kind, payload))
        except (EOFError, OSError):
            pass
        if not self._early[i] and proc.exitcode is not None:
            raise WorkerProcessError(f"tensor-parallel rank {i + 1} exited with code {proc.exitcode}")

    def _recv(self, i: int, kind: str):
        while not self._early[i]:
            self._poll(i)
            if not self._early[i]:
                self._conns[i].poll(0.1)
        got, payload = self._early[i].popleft()
        if got != kind:
            raise WorkerProcessError(f"tensor-parallel rank {i + 1} answered {got!r}, expected {kind!r}")
        return payload

    def _worker_error(self, wait_s: float = 1.0) -> str | None:
        """After a failed step: the first error a rank reported, if any did
        within ``wait_s`` (its own traceback says more than rank 0's)."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for i in range(len(self._conns)):
                try:
                    self._poll(i)
                except WorkerProcessError as err:
                    return str(err)
            time.sleep(0.05)
        return None


def _adapt_kv_scales(model, kv_cache_dtype: torch.dtype) -> None:
    """Checkpoint KV scales (made for e4m3fn) fitted to the cache's format."""
    factor = checkpoint_scale_factor(kv_cache_dtype)
    if factor == 1.0:
        return
    for layer in model.layers:
        attn = layer.self_attn.attn
        if attn.scales_from_checkpoint:
            attn.k_scale *= factor
            attn.v_scale *= factor


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _send(conn, kind: str, payload=None) -> None:
    conn.send_bytes(pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL))


def _shut_down(procs: list, conns: list, comm_holder: list, stopping: threading.Event) -> None:
    """Tell every rank to stop, wait for all of them (killing stragglers),
    then leave the process group: what ``shutdown`` and interpreter exit do."""
    stopping.set()
    for conn in conns:
        try:
            _send(conn, "stop")
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 10
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    for conn in conns:
        conn.close()
    for comm in comm_holder:
        comm.close()
    comm_holder.clear()


def _worker_main(rank: int, config: EngineConfig, platform_cls: type[Platform], model_path: str,
                 max_model_len: int, init_method: str, conn) -> None:
    """A tensor-parallel rank other than 0: join the group, load this rank's
    shard, then run every step rank 0 sends until told to stop (or until rank
    0 goes away). Ctrl-C is rank 0's to handle: the ranks ignore SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from pllm.loader import load_model

        size = config.parallel.tensor_parallel_size
        platform = platform_cls()
        # The communicator first: on GPUs it binds this process to its device
        # before anything else touches one.
        comm = platform.make_communicator(rank, size, init_method)
        if config.device.num_threads:  # the platform's policy (update_config), as on rank 0
            torch.set_num_threads(config.device.num_threads)
        torch.manual_seed(config.model.seed)
        mc = config.model
        loaded = load_model(model_path, tokenizer=mc.tokenizer, chat_template=mc.chat_template)
        worker = Worker(config, platform, loaded, max_model_len, rank=rank, comm=comm)
        _send(conn, "ready")
        while True:
            kind, payload = pickle.loads(conn.recv_bytes())
            if kind == "step":
                worker.runner.logits(worker.runner.forward(payload), payload)
            elif kind == "available_blocks":
                _send(conn, kind, worker.available_blocks())
            elif kind == "allocate":
                worker.allocate_kv_cache(payload)
                _send(conn, kind)
            elif kind == "stop":
                break
        comm.close()
    except EOFError:
        pass  # rank 0 went away: nothing left to serve
    except BaseException:
        try:
            _send(conn, "error", traceback.format_exc())
        except OSError:
            pass
        raise SystemExit(1)
