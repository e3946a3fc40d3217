"""Tensor parallelism on one machine: rank 0's worker in the engine's
process, ranks 1..N-1 each in a spawned process of its own.

Rank 0 schedules, builds each step's flat inputs and samples. It sends the
inputs to the other ranks over a pipe (a few small tensors), and the ranks
meet in the communicator's collectives inside the forward and the LM head
(``pllm.models.parallel``); only rank 0 samples. Control messages on the
pipes are ``(kind, payload)`` pairs::

    rank 0 -> rank r    "available_blocks"  "allocate" n  "draft" plan  "step" inputs  "stop"
    rank r -> rank 0    "ready"  "available_blocks" n  "allocate"  "error" traceback
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
import traceback
import weakref
from collections import deque

import torch
import torch.distributed

from pllm.core.config import EngineConfig
from pllm.core.executor import (
    ExecutorBrokenError,
    RankZeroSteps,
    WorkerProcessError,
    join_group,
)
from pllm.core.interfaces import Communicator, Platform
from pllm.core.runner import StepInputs
from pllm.core.worker import Worker

logger = logging.getLogger("pllm")


def check_tensor_parallel(config: EngineConfig, platform: Platform, hf_config,
                          local_devices: bool = True) -> None:
    """Fail before any process starts when the ranks cannot be placed or the
    model does not split evenly over them (its heads over each stage's
    tensor-parallel ranks, its layers over the pipeline stages).
    ``local_devices``: every rank runs on this machine (Ray places its ranks
    across a cluster instead)."""
    from pllm.core.pipeline import check_pipeline
    from pllm.models import describe_model

    par = config.parallel
    size = par.world_size
    caps = platform.capabilities
    if local_devices and not caps.ranks_share_device and size > platform.device_count():
        ranks = (f"tensor_parallel_size={par.tensor_parallel_size} x pipeline_parallel_size="
                 f"{par.pipeline_parallel_size}" if par.pipeline_parallel_size > 1
                 else f"tensor_parallel_size={size}")
        raise ValueError(
            f"{ranks} needs {size} {platform.name} devices; {platform.device_count()} visible"
        )
    describe_model(hf_config, par.tensor_parallel_size)
    check_pipeline(config, platform, hf_config)


class MultiprocExecutor(RankZeroSteps):
    """Tensor parallelism on one machine: see the module docstring. Worker
    processes start with ``spawn`` (a script that builds an engine with
    ``tensor_parallel_size > 1`` needs an ``if __name__ == "__main__":`` guard,
    as with any spawning library) and load the model from ``loaded.path``
    with the platform's class.

    A step that fails is fatal: once its inputs have gone out, the other ranks
    are somewhere inside its all-reduces, and the next step would pair with
    those. The executor stops its workers and raises ``ExecutorBrokenError``
    from then on."""

    def __init__(self, config: EngineConfig, platform: Platform, loaded) -> None:
        size = config.parallel.world_size
        check_tensor_parallel(config, platform, loaded.hf_config)
        if torch.distributed.is_initialized():
            raise RuntimeError(
                "this process already belongs to a process group (another tensor-parallel "
                "engine?); shut that engine down first (LLM.shutdown())"
            )
        # A file rendezvous in a folder of its own: no TCP port to pick, so
        # none that another server on this host could take in between.
        self._rendezvous = tempfile.mkdtemp(prefix="pllm-tp-")
        init_method = f"file://{os.path.join(self._rendezvous, 'store')}"
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
                args=(rank, config, type(platform), loaded.path, init_method, child),
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
            self._early.append(deque())
        self._finalizer = weakref.finalize(self, _shut_down, self._procs, self._conns,
                                           self._comm_holder, self._stopping, self._rendezvous)
        try:
            self._comm_holder.append(self._join_group(platform, size, init_method))
            self.worker = Worker(config, platform, loaded, rank=0, comm=self._comm_holder[0])
            for i in range(len(self._conns)):
                self._recv(i, "ready")
        except BaseException:
            self.shutdown()
            raise
        threading.Thread(target=self._watch, name="pllm-tp-watch", daemon=True).start()
        par = config.parallel
        logger.info("%d ranks: tensor parallel %d x pipeline parallel %d (%s)", size,
                    par.tensor_parallel_size, par.pipeline_parallel_size,
                    type(self._comm_holder[0]).__name__)

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
        self.worker.runner.on_step = functools.partial(self._broadcast, "step")
        self.worker.runner.on_draft = functools.partial(self._broadcast, "draft")
        return num_blocks

    def _run(self, call, arg):
        """Rank 0's part of a step; any failure is fatal (see the class docstring)."""
        if self._broken is not None:
            raise ExecutorBrokenError(self._broken)
        try:
            return call(arg)
        except BaseException as exc:
            error = self._worker_error() or self._broken or f"a step failed on rank 0: {exc!r}"
            self._broken = f"tensor-parallel group stopped: {error}"
            self._stopping.set()
            for proc in self._procs:  # they may be waiting in an all-reduce that never comes
                proc.kill()
            self.shutdown()
            raise ExecutorBrokenError(self._broken) from exc

    @property
    def broken(self) -> str | None:
        """Why no step can run any more (a rank died or failed), else None."""
        return self._broken

    def shutdown(self) -> None:
        self._finalizer()

    # ---- plumbing ----------------------------------------------------------

    def _send(self, conn, kind: str, payload=None) -> None:
        with self._send_lock:
            _send(conn, kind, payload)

    def _broadcast(self, kind: str, inputs: StepInputs) -> None:
        data = pickle.dumps((kind, inputs), protocol=pickle.HIGHEST_PROTOCOL)
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
        """Rank 0's communicator; a rank that fails to start meanwhile is
        reported at once."""
        def poll() -> None:
            for i in range(len(self._conns)):
                self._poll(i)

        return join_group(platform, size, init_method, poll, "pllm-tp-rendezvous")

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


def _send(conn, kind: str, payload=None) -> None:
    conn.send_bytes(pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL))


def _shut_down(procs: list, conns: list, comm_holder: list, stopping: threading.Event,
               rendezvous: str) -> None:
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
    shutil.rmtree(rendezvous, ignore_errors=True)


def _worker_main(rank: int, config: EngineConfig, platform_cls: type[Platform], model_path: str,
                 init_method: str, conn) -> None:
    """A tensor-parallel rank other than 0: join the group, load this rank's
    shard, then run every step rank 0 sends until told to stop (or until rank
    0 goes away). Ctrl-C is rank 0's to handle: the ranks ignore SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from pllm.loader import load_model

        size = config.parallel.world_size
        platform = platform_cls()
        # The communicator first: on GPUs it binds this process to its device
        # before anything else touches one.
        comm = platform.make_communicator(rank, size, init_method)
        platform.setup_process(config, rank)
        torch.manual_seed(config.model.seed)
        mc = config.model
        loaded = load_model(model_path, tokenizer=mc.tokenizer, chat_template=mc.chat_template)
        worker = Worker(config, platform, loaded, rank=rank, comm=comm)
        _send(conn, "ready")
        while True:
            kind, payload = pickle.loads(conn.recv_bytes())
            if kind == "step":
                worker.execute_inputs(payload)
            elif kind == "draft":
                worker.execute_draft(payload)
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
