"""The shared-memory all-reduce (``pllm.platforms.common.shm``), through the
CPU communicator that uses it: its all-reduce and all-gather, across real
processes: equal to the sums and concatenations they stand for, in chunks
larger than the segment, over many back-to-back steps (the double buffer),
with more ranks than cores, and off when disabled."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from pllm.platforms.common.shm import shm_ops
from pllm.testing.collectives import free_tcp_init_method

pytestmark = pytest.mark.skipif(shm_ops() is None, reason="the shared-memory kernel is not built")


def _parts(world: int, shape, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.randn(shape, generator=torch.Generator().manual_seed(r)).to(dtype) for r in range(world)]


def _rank(rank: int, world: int, init_method: str, expect_shm: bool) -> None:
    from pllm.platforms.common import shm
    from pllm.platforms.common.communicator import GlooCommunicator

    torch.set_num_threads(1)
    shm._MAX_SEGMENT = 64 << 10  # 4096 floats a slot for two ranks: big tensors go in chunks
    comm = GlooCommunicator(rank, world, init_method)
    try:
        assert comm.uses_shared_memory == expect_shm
        # One row, and 15,000 floats (four chunks): the sum in rank order, bit for bit.
        for shape in [(1, 576), (3, 5000)]:
            parts = _parts(world, shape)
            want = parts[0].clone()
            for p in parts[1:]:
                want += p
            got = comm.all_reduce(parts[rank].clone())
            assert torch.equal(got, want) if expect_shm else torch.allclose(got, want, atol=1e-5)
        # bf16 is summed in fp32 and rounded once.
        parts = _parts(world, (2, 100), torch.bfloat16)
        got = comm.all_reduce(parts[rank].clone())
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, sum(p.float() for p in parts).bfloat16(), atol=0, rtol=0.01)
        # Back-to-back steps with values that change each time: small ones,
        # and ones of two slots and a bit (three chunks, both buffers in one call).
        for step in range(300):
            got = comm.all_reduce(torch.full((7,), float(rank + step)))
            assert torch.equal(got, torch.full((7,), float(sum(r + step for r in range(world)))))
        n = 2 * 4096 + 5
        ramp = torch.arange(n, dtype=torch.float32)
        for step in range(40):
            got = comm.all_reduce(ramp * (rank + 1) + step)
            want = ramp * sum(r + 1 for r in range(world)) + world * step
            assert torch.equal(got, want), step
        # Integers stay on gloo (exact), whatever their size.
        big = torch.full((3,), 2**40 + rank, dtype=torch.int64)
        assert torch.equal(comm.all_reduce(big), torch.full((3,), world * 2**40 + sum(range(world))))
        # all_gather (the LM head's logits) along either dimension.
        parts = _parts(world, (3, 11))
        for dim in (0, -1):
            assert torch.equal(comm.all_gather(parts[rank], dim=dim), torch.cat(parts, dim=dim))
    finally:
        comm.close()


def _mismatch(rank: int, world: int, init_method: str) -> None:
    from pllm.platforms.common.communicator import GlooCommunicator

    torch.set_num_threads(1)
    comm = GlooCommunicator(rank, world, init_method)
    try:
        assert comm.uses_shared_memory
        with pytest.raises(RuntimeError, match="reduces 1[01] elements"):
            comm.all_reduce(torch.ones(10 + rank))
        with pytest.raises(RuntimeError, match="unusable"):
            comm.all_reduce(torch.ones(4))
    finally:
        comm.close()


def test_ranks_reducing_different_sizes_fail_instead_of_mixing():
    mp.start_processes(_mismatch, args=(2, free_tcp_init_method()), nprocs=2, start_method="spawn")


def _segments() -> set[str]:
    folder = "/dev/shm"
    return {f for f in os.listdir(folder) if f.startswith("pllm-allreduce-")} if os.path.isdir(folder) else set()


@pytest.mark.parametrize("world", [2, 3], ids=["2-ranks", "3-ranks-on-2-cores"])
def test_shared_memory_collectives(world):
    before = _segments()
    mp.start_processes(_rank, args=(world, free_tcp_init_method(), True), nprocs=world,
                       start_method="spawn")
    assert _segments() == before, "the segment's name outlived the set-up"


def test_disabled_shared_memory_falls_back_to_gloo(monkeypatch):
    monkeypatch.setenv("PLLM_CPU_SHM_ALLREDUCE", "0")  # the children inherit it
    mp.start_processes(_rank, args=(2, free_tcp_init_method(), False), nprocs=2,
                       start_method="spawn")
