"""The model runner's input preparation, without a model: the flat batch a
scheduled step becomes, and its padding on static-shape platforms."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from test_scheduler import add, make_scheduler, run_step

from pllm.core.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pllm.core.interfaces import PlatformCapabilities
from pllm.core.runner import ModelRunner, bucket


def make_runner(caps: PlatformCapabilities | None = None, max_model_len: int = 64,
                max_num_seqs: int = 4) -> ModelRunner:
    config = EngineConfig(model=ModelConfig(max_model_len=max_model_len),
                          cache=CacheConfig(block_size=4),
                          scheduler=SchedulerConfig(max_num_seqs=max_num_seqs))
    backend = SimpleNamespace(prepare_metadata=lambda metadata: metadata)
    return ModelRunner(model=None, backend=backend, kv_caches=[], config=config,
                       device=torch.device("cpu"), caps=caps or PlatformCapabilities())


def _mixed_step():
    """A step with a decode ("a") and a prefill chunk ("b"), in that order
    whatever the scheduler's order was."""
    sched = make_scheduler(budget=64)
    add(sched, "a", [10, 11, 12, 13, 14], max_tokens=8)
    run_step(sched)
    add(sched, "b", [20, 21, 22])
    return sched, sched.schedule()


def test_flat_inputs_put_decodes_first_with_their_slots():
    sched, out = _mixed_step()
    batch, inputs = make_runner().prepare(out)
    a, b = (item.seq for item in batch)
    assert [s.request.request_id for s in (a, b)] == ["a", "b"] and inputs.num_decodes == 1
    assert inputs.input_ids.tolist() == [7, 20, 21, 22]  # a's sampled token, then b's prompt
    assert inputs.positions.tolist() == [5, 0, 1, 2]
    assert inputs.query_start_loc == [0, 1, 4] and inputs.seq_lens == [6, 3]
    slot = lambda seq, pos: seq.block_ids[pos // 4] * 4 + pos % 4  # noqa: E731
    assert inputs.slot_mapping.tolist() == [slot(a, 5), slot(b, 0), slot(b, 1), slot(b, 2)]
    assert inputs.block_tables.shape == (2, 2)
    assert inputs.block_tables[0].tolist() == a.block_ids
    assert inputs.block_tables[1].tolist() == b.block_ids + [0]
    assert inputs.sample_rows == [0, 3]  # the last row of each sequence


def test_static_shapes_pad_tokens_sequences_and_table_width():
    """Tokens to a token bucket; sequences always to max_num_seqs' bucket (one
    forward program per token bucket); sampled rows to a sequence bucket."""
    caps = PlatformCapabilities(token_buckets=(8, 16), seq_buckets=(1, 4, 8))
    _, out = _mixed_step()
    _, inputs = make_runner(caps, max_model_len=64, max_num_seqs=5).prepare(out)
    assert inputs.input_ids.tolist() == [7, 20, 21, 22, 0, 0, 0, 0]
    assert inputs.slot_mapping.tolist()[4:] == [-1] * 4  # padding: the backend's padding slots
    assert inputs.query_start_loc == [0, 1, 4] + [4] * 6  # six empty sequences: 8 in all
    assert inputs.seq_lens == [6, 3] + [0] * 6
    assert inputs.block_tables.shape == (8, 16)  # 64 tokens / 4 per block
    assert inputs.sample_rows == [0, 3, 3, 3]  # two rows, repeated up to the bucket of 4
    metadata = make_runner(caps).build(inputs)[2]
    assert metadata.num_tokens == 8 and metadata.num_seqs == 8
    assert metadata.max_query_len == 3 and metadata.max_seq_len == 6


def test_bucket_is_the_smallest_that_holds():
    assert bucket(5, (4, 8, 16)) == 8 and bucket(8, (4, 8, 16)) == 8 and bucket(17, (4, 8, 16)) == 17
    assert bucket(3, ()) == 3
