"""Tensor parallelism over a Ray cluster (``--distributed-executor-backend
ray``): rank 0's worker in the engine's process, ranks 1..N-1 each in a Ray
actor, wherever the cluster has room, on this machine or on others.

Start-up::

    ray.init (RAY_ADDRESS / --ray-address, else a local cluster)
    placement group: one bundle per rank, each the platform's Ray resource
        (capabilities.ray_resource: a GPU, a TPU, ...; one CPU by default),
        bundle 0 on this node (rank 0 runs here), the others packed
    actors 1..N-1, one per bundle; all ranks meet at a TCP rendezvous on
        this node's address and set up the platform's communicator
        (NCCL/RCCL on GPUs; gloo, or shared memory when every rank is on
        one host, on CPUs)

Steps go out as in the ``mp`` executor: rank 0 schedules and builds the
step's inputs, hands them to every actor (an actor runs its calls in order),
and the ranks meet in the collectives inside the forward. A rank whose step
fails returns its traceback and ends its process, so that its peers'
collectives fail instead of waiting; an actor that dies or a node that
leaves is seen by a watcher at once. Either way the executor raises
``ExecutorBrokenError`` with the rank's error from then on, and releases the
actors and the placement group. ``shutdown`` releases them too, and stops the
Ray cluster if this executor started it.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import signal
import socket
import threading
import time
import traceback
import weakref

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

RAY_HINT = "pip install 'pllm[ray]' (Ray 2.50 or newer)"
# How long the cluster may take to find room for the ranks.
PLACEMENT_TIMEOUT_S = float(os.environ.get("PLLM_RAY_PLACEMENT_TIMEOUT_S", "120"))
# Environment the actors get from this process (they may start on other nodes).
_FORWARDED_ENV = ("PLLM_", "HF_", "TRANSFORMERS_", "TRITON_", "NCCL_", "GLOO_", "PYTHONPATH")


def import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError(f"--distributed-executor-backend ray needs Ray: {RAY_HINT}") from None
    return ray


class RankActor:
    """A tensor-parallel rank other than 0, in a Ray actor (made one by
    ``ray.remote`` in :class:`RayExecutor`). Its calls run one at a time in
    the order rank 0 sent them; ``watch`` runs beside them (a concurrency
    group of its own) and returns only when the actor stops."""

    def __init__(self, rank: int, config: EngineConfig, platform_cls: type[Platform],
                 model_path: str, init_method: str) -> None:
        self.rank, self.config, self.platform_cls = rank, config, platform_cls
        self.model_path, self.init_method = model_path, init_method
        self.worker: Worker | None = None
        self.comm: Communicator | None = None
        self._stopped = threading.Event()

    def start(self) -> dict:
        """Join the group, load this rank's shard; where it runs."""
        import ray

        from pllm.loader import load_model

        config = self.config
        platform = self.platform_cls()
        # The communicator first: on GPUs it binds this process to its device.
        self.comm = platform.make_communicator(self.rank, config.parallel.world_size,
                                               self.init_method)
        platform.setup_process(config, self.rank)
        torch.manual_seed(config.model.seed)
        mc = config.model
        loaded = load_model(self.model_path, tokenizer=mc.tokenizer, chat_template=mc.chat_template)
        # Ray shows an actor only the devices it reserved: its own is index 0.
        self.worker = Worker(config, platform, loaded, rank=self.rank, comm=self.comm,
                             device_index=0)
        return {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(),
                "host": socket.gethostname(), "pid": os.getpid()}

    def available_blocks(self) -> int:
        return self.worker.available_blocks()

    def allocate(self, num_blocks: int) -> None:
        self.worker.allocate_kv_cache(num_blocks)

    def run(self, data: bytes) -> str | None:
        """One step's (or draft's) inputs from rank 0. On failure: the
        traceback, and this process ends right after it is returned, so
        that the peers' collectives fail instead of waiting for it."""
        try:
            kind, inputs = pickle.loads(data)
            if kind == "step":
                self.worker.execute_inputs(inputs)
            else:
                self.worker.execute_draft(inputs)
            return None
        except BaseException:
            error = traceback.format_exc()
            # Long enough for the reply to reach rank 0 on a loaded machine.
            threading.Timer(2.0, os._exit, args=(1,)).start()
            return error

    def stop(self) -> None:
        if self.comm is not None:
            self.comm.close()
            self.comm = None
        self._stopped.set()

    def watch(self) -> None:
        self._stopped.wait()


class RayExecutor(RankZeroSteps):
    """See the module docstring."""

    def __init__(self, config: EngineConfig, platform: Platform, loaded) -> None:
        from pllm.core.executor.multiproc import check_tensor_parallel

        ray = import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        size = config.parallel.world_size
        check_tensor_parallel(config, platform, loaded.hf_config, local_devices=False)
        if torch.distributed.is_initialized():
            raise RuntimeError(
                "this process already belongs to a process group (another tensor-parallel "
                "engine?); shut that engine down first (LLM.shutdown())")
        self._ray = ray
        self._broken: str | None = None
        self._broken_by_watch = False
        self._lock = threading.Lock()  # _broken and _broken_by_watch: engine thread vs watcher
        self._stopping = threading.Event()
        self._pending: list = []  # refs of steps sent and not yet seen done
        self._actors: list = []
        self._comm_holder: list[Communicator] = []
        self._state = {"pg": None, "started_ray": False}
        self._finalizer = weakref.finalize(self, _shut_down, ray, self._actors, self._comm_holder,
                                           self._stopping, self._state)
        try:
            t0 = time.perf_counter()
            resource = platform.capabilities.ray_resource
            address = config.parallel.ray_address or os.environ.get("RAY_ADDRESS")
            if address and address.startswith("ray://"):
                raise ValueError(
                    f"ray_address={address!r}: Ray Client addresses are not supported; rank "
                    "0 runs in this process, which must be a node of the cluster (run pllm "
                    "on one, with RAY_ADDRESS=HOST:PORT)")
            if not ray.is_initialized():
                local = address in (None, "", "local")
                # A cluster of this machine alone ("local": never one that
                # `ray start` left running): its ranks share the cores as
                # the mp executor's do, so one CPU each is declared even
                # where there are more ranks than cores.
                num_cpus = max(os.cpu_count() or 1, size) if local and not resource else None
                ray.init(address="local" if local else address, num_cpus=num_cpus,
                         include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=True)
                self._state["started_ray"] = local
            bundle = {resource or "CPU": 1.0}
            here = ray.get_runtime_context().get_node_id()
            pg = placement_group([dict(bundle) for _ in range(size)], strategy="PACK",
                                 bundle_label_selector=[{"ray.io/node-id": here}]
                                 + [{} for _ in range(size - 1)])
            self._state["pg"] = pg
            ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
            if not ready:
                raise RuntimeError(
                    f"Ray found no room for {size} ranks of {bundle} each (rank 0's on this "
                    f"node) within {PLACEMENT_TIMEOUT_S:.0f}s: the cluster has "
                    f"{_resources(ray.cluster_resources())}, free "
                    f"{_resources(ray.available_resources())}")
            from ray.util import placement_group_table

            placed = placement_group_table(pg).get("bundles_to_node_id", {})
            if placed.get(0) != here:  # a Ray that ignores bundle label selectors
                raise RuntimeError(
                    f"Ray placed rank 0's bundle on node {placed.get(0)}, not on this one "
                    f"({here}); pllm needs Ray 2.50 or newer ({RAY_HINT})")
            self._check_driver_device(platform, pg, bundle)
            init_method = f"tcp://{_node_address(ray)}:{_free_port()}"
            actor_cls = ray.remote(concurrency_groups={"watch": 1})(RankActor)
            env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV)}
            for rank in range(1, size):
                strategy = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank)
                options = _actor_resources(bundle)
                self._actors.append(actor_cls.options(
                    name=None, scheduling_strategy=strategy, max_restarts=0,
                    runtime_env={"env_vars": env} if env else None, **options,
                ).remote(rank, config, type(platform), loaded.path, init_method))
            starts = [actor.start.remote() for actor in self._actors]
            self._comm_holder.append(self._join_group(platform, size, init_method, starts))
            self.worker = Worker(config, platform, loaded, rank=0, comm=self._comm_holder[0])
            self.placement = [{"rank": 0, "node_id": here, "host": socket.gethostname(),
                               "pid": os.getpid()}] + self._get(starts, "start")
        except BaseException:
            # A start still running (in the rendezvous, or loading) would
            # keep a polite stop waiting: kill first.
            self._stopping.set()
            _release(ray, self._actors, self._comm_holder, self._state, kill_first=True)
            self.shutdown()
            raise
        self._watchers = [actor.watch.options(concurrency_group="watch").remote()
                          for actor in self._actors]
        threading.Thread(target=self._watch, name="pllm-ray-watch", daemon=True).start()
        nodes = len({p["node_id"] for p in self.placement})
        logger.info("tensor parallelism over %d Ray actors and this process, on %d node(s), "
                    "in %.1fs (%s)", size - 1, nodes, time.perf_counter() - t0,
                    type(self._comm_holder[0]).__name__)

    # ---- the Executor protocol ---------------------------------------------

    def init_kv_cache(self) -> int:
        theirs = self._get([a.available_blocks.remote() for a in self._actors], "available_blocks")
        num_blocks = min([self.worker.available_blocks()] + theirs)
        allocated = [a.allocate.remote(num_blocks) for a in self._actors]
        self.worker.allocate_kv_cache(num_blocks)
        self._get(allocated, "allocate")
        self.worker.runner.on_step = functools.partial(self._broadcast, "step")
        self.worker.runner.on_draft = functools.partial(self._broadcast, "draft")
        return num_blocks

    def _run(self, call, arg):
        """Rank 0's part of a step; any failure is fatal, reported with the
        failing rank's traceback where one came."""
        if self._broken is None or self._broken_by_watch:
            # A dead actor's last step may still hold its traceback.
            self._check_done(timeout=2.0 if self._broken_by_watch else 0)
        if self._broken is not None:
            raise ExecutorBrokenError(self._broken)
        try:
            result = call(arg)
        except BaseException as exc:
            # A rank's traceback arrives with its step's result (it ends its
            # process right after, which is what failed rank 0's collective).
            if not self._check_done(timeout=2.0):
                self._break(f"a step failed on rank 0: {exc!r}" if self._broken is None
                            else self._broken.removeprefix("tensor-parallel group stopped: "))
            raise ExecutorBrokenError(self._broken) from exc
        return result

    @property
    def broken(self) -> str | None:
        """Why no step can run any more (a rank died or failed), else None."""
        return self._broken

    def shutdown(self) -> None:
        self._finalizer()

    # ---- plumbing ----------------------------------------------------------

    def _broadcast(self, kind: str, inputs: StepInputs) -> None:
        data = pickle.dumps((kind, inputs), protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > 100_000:  # Ray inlines small arguments; a large one goes up once
            data = self._ray.put(data)
        for rank, actor in enumerate(self._actors, start=1):
            self._pending.append((rank, actor.run.remote(data)))

    def _check_done(self, timeout: float) -> str | None:
        """Collect the steps the actors have finished (waiting up to
        ``timeout`` for all of them): the first rank's error, if any."""
        if not self._pending:
            return None
        ray = self._ray
        refs = [ref for _, ref in self._pending]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout, fetch_local=True)
        done_set = set(done)
        error = None
        still = []
        for rank, ref in self._pending:
            if ref not in done_set:
                still.append((rank, ref))
                continue
            try:
                failed = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the actor died: its cause, by rank
                failed = _actor_death(exc)
            if failed and error is None:
                error = f"tensor-parallel rank {rank} (Ray actor) failed:\n{failed}"
        self._pending = still
        if error is not None:
            self._break(error)
        return error

    def _break(self, error: str) -> None:
        """No step can run any more: say why, and release the actors. A
        rank's own error (its traceback) replaces the watcher's word that its
        actor died, which often comes first."""
        with self._lock:
            if self._broken is None or self._broken_by_watch:
                self._broken = f"tensor-parallel group stopped: {error}"
                self._broken_by_watch = False
                logger.error("%s; the engine cannot run another step", self._broken)
        self._stopping.set()
        # Ray itself stays up until shutdown(): this may run on the engine's
        # thread, and stopping Ray resets the process's signal handlers,
        # which only the main thread can put back.
        _release(self._ray, self._actors, self._comm_holder, self._state, kill_first=True)

    def _watch(self) -> None:
        """Say at once when an actor dies or its node leaves (on NCCL a dead
        peer is not an error: rank 0 would wait in its next collective)."""
        ray = self._ray
        pending = list(self._watchers)
        ranks = {ref: rank for rank, ref in enumerate(pending, start=1)}
        try:
            done, _ = ray.wait(pending, num_returns=1)
        except Exception:  # noqa: BLE001 - Ray shut down under us
            return
        if self._stopping.is_set() or not done:
            return
        try:
            ray.get(done[0])
            why = "stopped"
        except Exception as exc:  # noqa: BLE001
            why = _actor_death(exc)
        with self._lock:
            if self._stopping.is_set() or self._broken is not None:
                return
            self._broken_by_watch = True
            self._broken = (f"tensor-parallel group stopped: rank {ranks[done[0]]} (Ray actor) "
                            f"died: {why}")
            logger.error("%s; the engine cannot run another step", self._broken)
        # The others are released now, not at shutdown: they hold their
        # devices, and a peer gone makes rank 0's collective fail sooner.
        _release(ray, self._actors, [], self._state, kill_first=True)

    def _get(self, refs: list, what: str) -> list:
        """``ray.get`` of one call per actor, a failure named by its rank."""
        out = []
        for rank, ref in enumerate(refs, start=1):
            try:
                out.append(self._ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - reported with the rank
                raise WorkerProcessError(f"tensor-parallel rank {rank} (Ray actor) failed in "
                                         f"{what}: {_actor_death(exc)}") from None
        return out

    def _join_group(self, platform: Platform, size: int, init_method: str,
                    starts: list) -> Communicator:
        """Rank 0's communicator; an actor that fails to start meanwhile is
        reported at once."""
        def poll() -> None:
            done, _ = self._ray.wait(starts, num_returns=len(starts), timeout=0)
            for ref in done:
                rank = starts.index(ref) + 1
                try:
                    self._ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - reported with the rank
                    raise WorkerProcessError(f"tensor-parallel rank {rank} (Ray actor) failed "
                                             f"to start: {_actor_death(exc)}") from None

        return join_group(platform, size, init_method, poll, "pllm-ray-rendezvous")

    def _check_driver_device(self, platform: Platform, pg, bundle: dict) -> None:
        """On GPUs: rank 0 runs on this process's first visible device, which
        must be the one Ray reserved in bundle 0 (else an actor could be given
        it too)."""
        if "GPU" not in bundle:
            return
        ray = self._ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        probe = ray.remote(num_gpus=1, num_cpus=0)(_gpu_ids).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=0))
        reserved = [str(i) for i in ray.get(probe.remote())]
        mine = platform.physical_device_id(0)
        if reserved and reserved[0] != mine:
            raise RuntimeError(
                f"Ray reserved GPU {reserved[0]} of this node for rank 0, but this process runs "
                f"rank 0 on GPU {mine}; make GPU {reserved[0]} this process's first visible one "
                "(or leave this node's GPUs free for the engine)")


def _gpu_ids() -> list:
    import ray

    return ray.get_gpu_ids()


def _actor_resources(bundle: dict) -> dict:
    """The ``.options`` that make an actor take its whole bundle."""
    resources = dict(bundle)
    return {"num_cpus": resources.pop("CPU", 0), "num_gpus": resources.pop("GPU", 0),
            "resources": resources}


def _actor_death(exc: BaseException) -> str:
    """What Ray says of a call that failed: the actor's own traceback for an
    exception, else why the actor died (killed, its node gone)."""
    text = str(exc).strip()
    return text[-4000:] if text else type(exc).__name__


def _resources(resources: dict) -> str:
    keep = {k: v for k, v in resources.items()
            if not k.startswith(("node:", "memory", "object_store_memory", "accelerator_type"))}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(keep.items())) or "nothing"


def _node_address(ray) -> str:
    """This node's address as the cluster knows it (where the actors on
    other nodes reach the rendezvous)."""
    return ray.util.get_node_ip_address()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _release(ray, actors: list, comm_holder: list, state: dict, kill_first: bool = False) -> None:
    """Stop the actors (killing stragglers), release the placement group and
    leave the process group."""
    if ray.is_initialized():
        if kill_first:  # they may wait in a collective that never comes
            for actor in actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        stops = []
        for actor in actors:
            try:
                stops.append(actor.stop.remote())
            except Exception:  # noqa: BLE001 - already gone
                pass
        if stops:
            try:
                ray.wait(stops, num_returns=len(stops), timeout=10)
            except Exception:  # noqa: BLE001
                pass
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if state.get("pg") is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(state["pg"])
            except Exception:  # noqa: BLE001
                pass
    actors.clear()
    state["pg"] = None
    for comm in comm_holder:
        try:
            comm.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            logger.exception("closing rank 0's communicator failed")
    comm_holder.clear()


def _shut_down(ray, actors: list, comm_holder: list, stopping: threading.Event,
               state: dict) -> None:
    """Release everything, and stop Ray if this executor started it: what
    ``shutdown`` and interpreter exit do."""
    stopping.set()
    _release(ray, actors, comm_holder, state)
    if state.pop("started_ray", False) and ray.is_initialized():
        # Stopping Ray leaves SIGINT/SIGTERM at their defaults (seen: a server
        # then died of the SIGTERM it should have handled). Python's handlers
        # are put back where that can be done, on the main thread; the
        # server's shutdown runs elsewhere, and uvicorn puts its own back.
        main = threading.current_thread() is threading.main_thread()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        ray.shutdown()
        if main:
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
