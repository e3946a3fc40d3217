"""Would this step survive graph capture? Checked on any device, the CPU included.

A CUDA (or HIP) graph records the kernels a step launches and replays them
later on the same memory. Whatever the step does on the host in between is
not recorded: reading a device value back (``.item()``, ``bool(t)``,
``.tolist()``) fails during capture, a shape that depends on device data
(``nonzero``, boolean masks) cannot be recorded, and a tensor built from
host data (``torch.tensor([...])``) is a host-to-device copy that capture
refuses, or that replay would silently skip. Such calls are easy to write in
a model or a backend and only show on a GPU, at start-up, as an opaque
capture error. ``capture_violations`` finds them by watching every torch op
a function runs::

    with capture_violations() as found:
        model(input_ids, positions, ctx)
    assert not found, "\\n".join(map(str, found))

``check_decode_capturable`` runs a backend's decode step (``write_kv`` then
``forward`` on padded, persistent-style inputs) under it: the conformance
suite runs it for every platform that claims graph support.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pllm.core.interfaces import AttentionBackend, AttentionMetadata
from pllm.core.kv_cache.fp8 import scale_kwargs

aten = torch.ops.aten

_FORBIDDEN = {
    aten._local_scalar_dense.default: "reads a device value back to the host "
                                      "(.item(), bool(), int() or float() of a tensor)",
    aten.nonzero.default: "has an output shape that depends on device data (nonzero)",
    aten.masked_select.default: "has an output shape that depends on device data (masked_select)",
    aten.lift_fresh.default: "builds a tensor from host data (torch.tensor(...)): "
                             "a host-to-device copy on every step",
}
_DATA_DEPENDENT = ("unique", "repeat_interleave.Tensor", "masked_scatter")
_INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
             aten._index_put_impl_.default)

_PACKAGE = str(Path(__file__).resolve().parents[1])


@dataclass(frozen=True)
class Violation:
    op: str
    why: str
    where: str  # the innermost pllm (or caller) frame that ran it

    def __str__(self) -> str:
        return f"{self.where}: {self.op} {self.why}"


class _Watch(TorchDispatchMode):
    def __init__(self, found: list[Violation]) -> None:
        super().__init__()
        self.found = found
        self.in_conversion = 0  # inside a watched Tensor method (already recorded)
        self.owner = threading.get_ident()  # other threads' ops are not this step's

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        why = None if self.in_conversion else _FORBIDDEN.get(func)
        name = str(func.overloadpacket.__name__) + "." + func._overloadname
        if why is None and any(part in name for part in _DATA_DEPENDENT):
            why = f"has an output shape that depends on device data ({name})"
        if why is None and func in _INDEXING:
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                why = "indexes with a boolean mask: its shape depends on device data"
        if why is None and _to_host(func, args, kwargs or {}):
            why = "copies a device tensor to the host"
        if why is not None and threading.get_ident() == self.owner:
            self.found.append(Violation(str(func), why, _where()))
        return func(*args, **(kwargs or {}))


def _to_host(func, args, kwargs) -> bool:  # noqa: ANN001
    """A device-to-host copy (on a CPU-only run there is none to see)."""
    if func is aten._to_copy.default:
        target = kwargs.get("device")
        return target is not None and target.type == "cpu" and args[0].device.type != "cpu"
    if func is aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


def _where() -> str:
    """The innermost frame outside torch and this module: the line to fix."""
    here = str(Path(__file__).resolve())
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = str(Path(frame.filename).resolve())
        if path == here or "/torch/" in path:
            continue
        shown = Path(path).relative_to(Path(_PACKAGE).parent) if path.startswith(_PACKAGE) \
            else Path(path)
        return f"{shown}:{frame.lineno} in {frame.name}"
    return "<unknown>"


# Tensor methods that read device values back. Watched as methods too: under
# inference mode (where engines run) ``item()`` and the conversions built on
# it skip the dispatch a mode sees, ``tolist()`` never goes through it, and on
# a CPU-only run ``.cpu()`` copies nothing a mode could see.
_READ_BACK = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
_WHY = {"tolist": "reads device values back to the host (.tolist())",
        "cpu": "copies to the host (.cpu())", "numpy": "copies to the host (.numpy())"}
# The Tensor methods are patched for the whole process: one block at a time.
_LOCK = threading.RLock()


@contextlib.contextmanager
def capture_violations() -> Iterator[list[Violation]]:
    """Collects, into the yielded list, every op run inside the block that
    graph capture cannot record."""
    found: list[Violation] = []
    watch = _Watch(found)

    def watched(name: str, method):  # noqa: ANN001, ANN202
        def read_back(self, *args, **kwargs):  # noqa: ANN001, ANN202
            if not watch.in_conversion and threading.get_ident() == watch.owner:
                why = _WHY.get(name, _FORBIDDEN[aten._local_scalar_dense.default])
                found.append(Violation(f"Tensor.{name}", why, _where()))
            watch.in_conversion += 1
            try:
                return method(self, *args, **kwargs)
            finally:
                watch.in_conversion -= 1
        return read_back

    with _LOCK:
        originals = {name: getattr(torch.Tensor, name) for name in _READ_BACK}
        own = {name for name in _READ_BACK if name in vars(torch.Tensor)}  # not inherited
        for name, method in originals.items():
            setattr(torch.Tensor, name, watched(name, method))
        try:
            with watch:
                yield found
        finally:
            for name, method in originals.items():
                if name in own:
                    setattr(torch.Tensor, name, method)
                else:
                    delattr(torch.Tensor, name)


def check_decode_capturable(
    backend: AttentionBackend,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    block_size: int,
    kv_cache_dtype: torch.dtype | None = None,
    num_seqs: int = 4,
    max_model_len: int = 256,
    num_kv_heads: int = 2,
    num_heads: int = 4,
    head_dim: int = 64,
) -> None:
    """``write_kv`` and ``forward`` of a decode-only step as a graph records
    it: ``num_seqs`` rows (the last one padding: context 0, slot -1) on
    buffers of the worst-case size, metadata prepared before the step (as
    the engine does before capture). Raises AssertionError listing what
    capture could not record."""
    device = torch.device(device)
    max_blocks = -(-max_model_len // block_size)
    num_blocks = num_seqs * max_blocks + 1
    cache_dtype = kv_cache_dtype or dtype
    kv_cache = torch.zeros(backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim),
                           dtype=cache_dtype, device=device)
    lens = [block_size + 3 * i + 1 for i in range(num_seqs - 1)] + [0]
    tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int32, device=device)
    tables[:] = torch.arange(num_seqs * max_blocks, dtype=torch.int32,
                             device=device).view(num_seqs, max_blocks)
    slots = [int(tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
             for i, n in enumerate(lens[:-1])] + [-1]
    metadata = AttentionMetadata(
        num_seqs=num_seqs, num_tokens=num_seqs, num_decodes=num_seqs, max_query_len=1,
        max_seq_len=max_model_len, block_size=block_size,
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device), block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc_cpu=list(range(num_seqs + 1)), seq_lens_cpu=[max_model_len] * num_seqs,
    )
    metadata = backend.prepare_metadata(metadata)
    gen = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(num_seqs, num_heads, head_dim, generator=gen, device=device).to(dtype)
    key = torch.randn(num_seqs, num_kv_heads, head_dim, generator=gen, device=device).to(dtype)
    value = torch.randn_like(key)
    scales = scale_kwargs(cache_dtype, 0.5, 2.0)
    with capture_violations() as found:
        backend.write_kv(key, value, kv_cache, metadata.slot_mapping, **scales)
        backend.forward(query, kv_cache, metadata, scale=head_dim ** -0.5, **scales)
    assert not found, (f"{type(backend).__name__}'s decode step cannot be captured in a graph:\n"
                       + "\n".join(map(str, found)))
