"""A platform's communicator, checked against values each rank can compute
alone: the collectives the contract asks for (``all_reduce``,
``all_gather``) across real processes, and ``close`` by building, closing
and building again in one process. A platform whose capabilities declare
``pipeline_parallel`` also has its ``send``/``recv`` (in order, around a
ring) and ``new_group`` (its members numbered by increasing rank) checked.

:func:`check_communicator` starts ``world_size`` processes; each builds the
platform's communicator over a shared ``file://`` rendezvous. A failure in
any rank is raised in the caller with that rank's traceback; a hang is
killed. :func:`collectives_plan` says whether that can run on this host and
how the processes start.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.multiprocessing as mp

from pllm.core.interfaces import Communicator, Platform


def free_tcp_init_method() -> str:
    """``tcp://127.0.0.1:<port>`` on a port that was free a moment ago."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def collectives_plan(platform: Platform, world_size: int = 2) -> tuple[str | None, str]:
    """``(start_method, why)`` for a ``world_size``-process check of
    ``platform``; ``start_method`` is ``None`` when the host cannot run it
    (``why`` says so).

    Ranks that share one device (``capabilities.ranks_share_device``) all
    use ``device(0)``; otherwise rank ``r`` needs ``device(r)``, so there must
    be ``world_size`` devices. Ranks on the host fork (the children inherit
    the imported torch: a fraction of a second instead of seconds each);
    ranks on a device spawn fresh interpreters, because a forked child
    cannot use a device runtime its parent already initialized."""
    caps = platform.capabilities
    count = platform.device_count()
    if not caps.ranks_share_device and count < world_size:
        return None, (f"{platform.name}: {world_size} ranks need {world_size} devices "
                      f"(ranks do not share one), {count} visible")
    on_host = platform.device(0).type == "cpu"
    if caps.ranks_share_device and on_host and "fork" in mp.get_all_start_methods():
        return "fork", "ranks share the host: fork"
    return "spawn", "ranks on a device: spawn"


def check_communicator(
    platform_cls: type[Platform],
    *,
    world_size: int = 2,
    init_method: str | None = None,
    start_method: str | None = None,
    timeout_s: float = 120.0,
) -> None:
    """Raise unless ``all_reduce`` and ``all_gather`` of
    ``platform_cls().make_communicator`` agree across ``world_size``
    processes. ``init_method`` defaults to a fresh ``file://`` rendezvous;
    ``start_method`` to :func:`collectives_plan`'s (with ``spawn`` the class
    must be importable by the children, as it is for the engine's ranks)."""
    if start_method is None:
        start_method, why = collectives_plan(platform_cls(), world_size)
        if start_method is None:
            raise ValueError(why)
    with tempfile.TemporaryDirectory(prefix="pllm-rdzv-") as tmp:
        method = init_method or f"file://{os.path.join(tmp, 'rendezvous')}"
        context = mp.start_processes(
            _worker,
            args=(platform_cls, world_size, method),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(
                    f"{platform_cls.__name__} collectives did not finish in {timeout_s:g} s "
                    f"(world_size={world_size}, init_method={method})"
                )


def _rank_device(platform: Platform, rank: int) -> torch.device:
    return platform.device(0 if platform.capabilities.ranks_share_device else rank)


def _worker(rank: int, platform_cls: type[Platform], world_size: int, init_method: str) -> None:
    torch.set_num_threads(1)
    platform = platform_cls()  # as the engine's ranks do: zero arguments
    comm = platform.make_communicator(rank, world_size, init_method)
    try:
        assert isinstance(comm, Communicator), f"make_communicator returned {comm!r}"
        device = _rank_device(platform, rank)
        _check_ops(comm, device, rank, world_size, platform.capabilities.default_dtype)
        if platform.capabilities.pipeline_parallel:
            _check_pipeline_ops(comm, device, rank, world_size,
                                platform.capabilities.default_dtype)
    finally:
        comm.close()


def _check_ops(comm: Communicator, device: torch.device, rank: int, world: int,
               dtype: torch.dtype) -> None:
    def expect(got: torch.Tensor, want: torch.Tensor, op: str) -> None:
        assert torch.equal(got.cpu().float(), want.float()), (
            f"rank {rank}: {op} gave {got.tolist()}, want {want.tolist()}"
        )

    # Small integers: exact in every dtype, so the sums are too.
    for dt in dict.fromkeys((torch.float32, dtype)):
        t = torch.full((4,), float(rank + 1), device=device, dtype=dt)
        out = comm.all_reduce(t)
        assert out is t, f"rank {rank}: all_reduce must work in place and return its argument"
        expect(t, torch.full((4,), float(sum(range(1, world + 1)))), f"all_reduce ({dt})")

    part = torch.arange(6, dtype=torch.float32).view(2, 3) + 10 * rank
    want0 = torch.cat([torch.arange(6.0).view(2, 3) + 10 * r for r in range(world)], dim=0)
    want1 = torch.cat([torch.arange(6.0).view(2, 3) + 10 * r for r in range(world)], dim=1)
    expect(comm.all_gather(part.to(device), dim=0), want0, "all_gather(dim=0)")
    expect(comm.all_gather(part.to(device), dim=1), want1, "all_gather(dim=1)")
    # A non-contiguous input (a transposed view), as a sharded layer may pass.
    expect(comm.all_gather(part.t().to(device), dim=0),
           torch.cat([(torch.arange(6.0).view(2, 3) + 10 * r).t() for r in range(world)]),
           "all_gather(a transposed view)")


def _check_pipeline_ops(comm: Communicator, device: torch.device, rank: int, world: int,
                        dtype: torch.dtype) -> None:
    """Point-to-point sends around the ring (two in a row, which must arrive
    in order, one of them in the model dtype) and subgroups: the reversed
    list of all ranks, whose rank 0 is the last one, and one group per rank."""
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    first = torch.full((2, 3), float(rank + 1), device=device)
    second = torch.full((5,), float(10 * (rank + 1)), device=device, dtype=dtype)
    handles = [comm.send(first, nxt), comm.send(second, nxt)]
    got_first = comm.recv(torch.empty(2, 3, device=device), prev)
    got_second = comm.recv(torch.empty(5, device=device, dtype=dtype), prev)
    for handle in handles:
        handle.wait()
    assert torch.equal(got_first.cpu(), torch.full((2, 3), float(prev + 1))), (
        f"rank {rank}: recv from rank {prev} gave {got_first.tolist()}, want {prev + 1}s")
    assert torch.equal(got_second.cpu().float(), torch.full((5,), float(10 * (prev + 1)))), (
        f"rank {rank}: the second recv from rank {prev} gave {got_second.tolist()} "
        f"(sends must arrive in order)")

    # Ranks given in reverse: the group still numbers them by increasing rank.
    everyone = comm.new_group(list(reversed(range(world))))
    alone = [comm.new_group([r]) for r in range(world)]  # every rank makes every group
    assert everyone is not None, f"rank {rank}: new_group of every rank gave None"
    gathered = everyone.all_gather(torch.full((1,), float(rank), device=device))
    assert gathered.cpu().tolist() == [float(r) for r in range(world)], (
        f"rank {rank}: all_gather in new_group(ranks reversed) gave {gathered.tolist()}, "
        f"want the ranks in increasing order")
    total = everyone.all_reduce(torch.full((2,), float(rank + 1), device=device))
    assert torch.equal(total.cpu(), torch.full((2,), float(sum(range(1, world + 1))))), (
        f"rank {rank}: all_reduce in new_group(every rank) gave {total.tolist()}")
    mine = alone[rank]
    assert mine is not None, f"rank {rank}: new_group([{rank}]) gave None"
    t = torch.full((3,), float(rank + 1), device=device)
    assert torch.equal(mine.all_reduce(t).cpu(), torch.full((3,), float(rank + 1))), (
        f"rank {rank}: all_reduce in new_group([{rank}]) gave {t.tolist()}, want its own "
        f"input: the group has one rank")
    one = mine.all_gather(torch.full((1,), float(rank), device=device))
    assert one.cpu().tolist() == [float(rank)], (
        f"rank {rank}: all_gather in new_group([{rank}]) gave {one.tolist()}")


def check_communicator_rebuild(platform: Platform, *, rounds: int = 2) -> None:
    """In this process: ``make_communicator(0, 1, ...)``, ``all_reduce``,
    ``close``, and again, ``rounds`` times: what a second engine in the same
    process does. Fails when ``close`` does not release what the
    communicator holds (a ``torch.distributed`` process group, say)."""
    import torch.distributed as dist

    name = type(platform).__name__
    tracked = dist.is_available()
    if tracked and dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process; "
                           "check the communicator's rebuild in a fresh process")
    device = platform.device(0)
    try:
        with tempfile.TemporaryDirectory(prefix="pllm-rdzv-") as tmp:
            for attempt in range(rounds):
                method = f"file://{os.path.join(tmp, f'rendezvous-{attempt}')}"
                try:
                    comm = platform.make_communicator(0, 1, method)
                except Exception as exc:
                    again = " after close()" if attempt else ""
                    hint = (" close() must release what the first one held (its "
                            "torch.distributed process group)" if attempt else "")
                    raise AssertionError(
                        f"{name}.make_communicator(0, 1, ...) failed{again}: "
                        f"{type(exc).__name__}: {exc}.{hint}"
                    ) from exc
                t = torch.full((3,), 2.0, device=device)
                out = comm.all_reduce(t)
                assert out is t and torch.equal(t.cpu(), torch.full((3,), 2.0)), (
                    f"{name}: a one-rank all_reduce changed its input: {t.tolist()}"
                )
                comm.close()
                assert not (tracked and dist.is_initialized()), (
                    f"{type(comm).__name__}.close() left the torch.distributed process group "
                    f"initialized; a second engine in this process could not build its "
                    f"communicator. close() must call torch.distributed.destroy_process_group()"
                )
    finally:
        # Leave the process as found even when the check failed.
        if tracked and dist.is_initialized():
            dist.destroy_process_group()
