"""Collectives of a platform's communicator, checked across real processes.

:func:`check_communicator` starts ``world_size`` processes; each builds the platform's
communicator over a shared ``file://`` rendezvous and checks every op of the
interface against values it can compute alone. A failure in any rank is
raised in the caller with that rank's traceback; a hang is killed.

Host platforms fork (the children inherit the imported torch: a fraction of
a second instead of seconds per process); device platforms spawn fresh
interpreters, because a forked child cannot use an initialized GPU runtime.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.multiprocessing as mp

from pllm.core.interfaces import Platform


def free_tcp_init_method() -> str:
    """``tcp://127.0.0.1:<port>`` on a port that was free a moment ago."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def check_communicator(
    platform_cls: type[Platform],
    *,
    world_size: int = 2,
    init_method: str | None = None,
    start_method: str | None = None,
    timeout_s: float = 120.0,
) -> None:
    """Raise unless all ops of ``platform_cls().make_communicator`` agree
    across ``world_size`` processes. ``init_method`` defaults to a fresh
    ``file://`` rendezvous; ``start_method`` to ``"fork"`` when the platform's
    device is the host and ``"spawn"`` otherwise (then the class must be
    importable by the children)."""
    if start_method is None:
        on_host = platform_cls().device(0).type == "cpu"
        start_method = "fork" if on_host and "fork" in mp.get_all_start_methods() else "spawn"
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


def _worker(rank: int, platform_cls: type[Platform], world_size: int, init_method: str) -> None:
    torch.set_num_threads(1)
    platform = platform_cls()
    comm = platform.make_communicator(rank, world_size, init_method)
    try:
        assert (comm.rank, comm.world_size) == (rank, world_size), (comm.rank, comm.world_size)
        _check_ops(comm, platform.device(rank), rank, world_size)
    finally:
        comm.close()


def _check_ops(comm, device: torch.device, rank: int, world: int) -> None:  # noqa: ANN001
    def expect(got: torch.Tensor, want: torch.Tensor, op: str) -> None:
        assert torch.equal(got.cpu(), want), (
            f"rank {rank}: {op} gave {got.tolist()}, want {want.tolist()}"
        )

    t = torch.full((4,), float(rank + 1), device=device)
    out = comm.all_reduce(t)
    assert out is t, f"rank {rank}: all_reduce must work in place and return its argument"
    expect(t, torch.full((4,), float(sum(range(1, world + 1)))), "all_reduce")

    part = torch.arange(6, dtype=torch.float32).view(2, 3) + 10 * rank
    want0 = torch.cat([torch.arange(6.0).view(2, 3) + 10 * r for r in range(world)], dim=0)
    want1 = torch.cat([torch.arange(6.0).view(2, 3) + 10 * r for r in range(world)], dim=1)
    expect(comm.all_gather(part.to(device), dim=0), want0, "all_gather(dim=0)")
    expect(comm.all_gather(part.to(device), dim=1), want1, "all_gather(dim=1)")

    full = torch.arange(4.0 * world * 3).view(4 * world, 3) * (rank + 1)
    total = torch.arange(4.0 * world * 3).view(4 * world, 3) * sum(range(1, world + 1))
    expect(
        comm.reduce_scatter(full.to(device), dim=0),
        total.chunk(world, 0)[rank],
        "reduce_scatter(0)",
    )
    wide = full.view(3, 4 * world)
    expect(
        comm.reduce_scatter(wide.to(device), dim=1),
        total.view(3, 4 * world).chunk(world, 1)[rank],
        "reduce_scatter(dim=1)",
    )

    src = world - 1
    b = torch.full((3,), float(rank), device=device)
    out = comm.broadcast(b, src=src)
    assert out is b, f"rank {rank}: broadcast must work in place and return its argument"
    expect(b, torch.full((3,), float(src)), "broadcast")

    # A ring: every rank sends to the next and receives from the previous;
    # even ranks send first so that blocking send/recv cannot deadlock.
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    message = torch.full((5,), float(rank * 7), device=device)
    inbox = torch.zeros(5, device=device)
    if rank % 2 == 0:
        comm.send(message, nxt)
        got = comm.recv(inbox, prev)
    else:
        got = comm.recv(inbox, prev)
        comm.send(message, nxt)
    assert got is inbox, f"rank {rank}: recv must fill and return its argument"
    expect(inbox, torch.full((5,), float(prev * 7)), "send/recv")
    comm.barrier()
