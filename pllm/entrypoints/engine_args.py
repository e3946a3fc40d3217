"""Flat engine arguments shared by the Python API and the CLI (vLLM's flag names)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from pllm.core.config import (
    EXECUTOR_BACKENDS,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    parse_memory,
)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def memory_size(text: str) -> str:
    """An argparse type: a size such as 2GiB or 512MB, checked here and kept
    as typed (parsed to bytes with the rest of the config)."""
    try:
        value = parse_memory(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GiB or 512MB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text!r}")
    return text


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def speculative_config(text: str) -> str:
    """An argparse type: vLLM's speculative_config JSON, checked here and
    kept as typed (parsed with the rest of the config)."""
    try:
        SpeculativeConfig.from_dict(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "auto"
    max_model_len: int | None = None
    block_size: int | None = None  # None: the platform's default
    kv_cache_memory: int | str | None = None
    kv_cache_dtype: str = "auto"
    memory_utilization: float | None = None  # None: the platform's default
    gpu_memory_utilization: float | None = None  # vLLM's name for memory_utilization
    enable_prefix_caching: bool = True
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    # While requests decode, steps aim at this many ms (prefill chunks sized
    # from measured step times); None or 0: off.
    target_itl_ms: float | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str = "mp"
    ray_address: str | None = None
    seed: int = 0
    served_model_name: str | None = None
    chat_template: str | None = None
    enforce_eager: bool = False
    num_threads: int | None = None
    num_blocks_override: int | None = None
    # vLLM's speculative_config: a dict or its JSON text, e.g.
    # {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}.
    speculative_config: dict | str | None = None

    def create_engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=ModelConfig(
                model=self.model, tokenizer=self.tokenizer, dtype=self.dtype,
                max_model_len=self.max_model_len, seed=self.seed,
                served_model_name=self.served_model_name, chat_template=self.chat_template,
                quantization=self.quantization,
            ),
            cache=CacheConfig(
                block_size=self.block_size, kv_cache_memory=parse_memory(self.kv_cache_memory),
                memory_utilization=self.memory_utilization,
                gpu_memory_utilization=self.gpu_memory_utilization,
                enable_prefix_caching=self.enable_prefix_caching,
                num_blocks_override=self.num_blocks_override, kv_cache_dtype=self.kv_cache_dtype,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
                target_step_latency_s=self.target_itl_ms / 1000 if self.target_itl_ms else None,
            ),
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                                    pipeline_parallel_size=self.pipeline_parallel_size,
                                    distributed_executor_backend=self.distributed_executor_backend,
                                    ray_address=self.ray_address),
            device=DeviceConfig(
                device=self.device, enforce_eager=self.enforce_eager, num_threads=self.num_threads,
            ),
            speculative=SpeculativeConfig.from_dict(self.speculative_config),
        )

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, *, model_positional: bool = True) -> None:
        if model_positional:
            parser.add_argument("model", nargs="?", default=None,
                                help="model folder, .gguf file, or name (default: SmolLM2-135M-Instruct)")
        else:
            parser.add_argument("--model", default=None, help="model folder, .gguf file, or name")
        g = parser.add_argument_group("engine")
        g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
        g.add_argument("--device", default="auto",
                       help="platform to run on (auto, cpu, cuda, rocm, tpu, neuron, or a plugin's name); "
                            "`pllm platforms` lists them")
        g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                       help="weight and activation dtype (auto: the platform's default)")
        g.add_argument("--quantization", "-q", default="auto", choices=list(QUANTIZATIONS),
                       help="gguf keeps a .gguf file's quantized tensors in their formats "
                            "(Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) where the platform "
                            "multiplies them (`pllm platforms` lists which); none dequantizes "
                            "them at load; int8 rounds every linear weight and the embedding "
                            "to int8 at load, one scale per output channel (weight-only); "
                            "fp8 rounds every linear weight but the LM head to fp8 e4m3, one "
                            "scale per output channel, and quantizes activations per token "
                            "as they go (GPUs); "
                            "auto: gguf for a .gguf file unless --dtype is given, else none")
        g.add_argument("--max-model-len", type=positive_int, default=None,
                       help="context length (prompt + output); default: the model's")
        g.add_argument("--block-size", type=positive_int, default=None,
                       help="tokens per KV-cache block (default: the platform's, 16 on most)")
        g.add_argument("--kv-cache-memory", type=memory_size, default=None,
                       help="KV-cache budget, e.g. 2GiB or 512MB (default: the platform decides)")
        g.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                       help="KV-cache storage: auto (the model dtype), or 8-bit floats with "
                            "about twice the blocks of bf16 (fp8 = fp8_e4m3: the platform's "
                            "e4m3; fp8_e5m2); `pllm platforms` says what the selected platform stores")
        g.add_argument("--memory-utilization", "--gpu-memory-utilization", type=float,
                       default=None, dest="memory_utilization",
                       help="when --kv-cache-memory is not given: on GPUs the fraction of "
                            "the device's memory for weights, activations and KV cache "
                            "(default 0.9); on the CPU the fraction of the RAM available "
                            "after loading for the KV cache, at most 4 GiB (default 0.5)")
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse KV blocks of shared prompt prefixes (on by default)")
        g.add_argument("--max-num-seqs", type=positive_int, default=128, help="most sequences in one step")
        g.add_argument("--max-num-batched-tokens", type=positive_int, default=2048,
                       help="token budget of one step (long prompts are prefilled in chunks)")
        g.add_argument("--target-itl-ms", type=non_negative_float, default=None,
                       help="inter-token latency to aim for while requests are decoding: decodes "
                            "go first and each step's prefill chunk is sized, from measured step "
                            "times, to finish within it (0: off, every step may carry "
                            "--max-num-batched-tokens; default: 800 for pllm serve, off "
                            "offline); it trades some time to first token and throughput "
                            "for it, see the README")
        g.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1,
                       help="ranks to shard the model over, one process each (attention heads, "
                            "KV heads and the MLP width must divide by it); on the CPU the ranks "
                            "split the cores and --kv-cache-memory is their total")
        g.add_argument("--pipeline-parallel-size", "-pp", type=positive_int, default=1,
                       help="pipeline stages to split the layers into, each of "
                            "--tensor-parallel-size ranks (tp x pp ranks in all); up to pp "
                            "batches are in flight, one per stage (see docs/multi-node.md)")
        g.add_argument("--distributed-executor-backend", default="mp", choices=list(EXECUTOR_BACKENDS),
                       help="how the ranks (tensor and pipeline parallel) run: mp, a process each on this machine; "
                            "ray, a Ray actor each in a Ray cluster, across machines "
                            "(pip install 'pllm[ray]'; see docs/multi-node.md)")
        g.add_argument("--ray-address", default=None,
                       help="the Ray cluster to join with --distributed-executor-backend ray "
                            "(default: RAY_ADDRESS, else a local cluster is started)")
        g.add_argument("--seed", type=int, default=0, help="seed for requests that give none")
        g.add_argument("--served-model-name", default=None, help="model name the API reports")
        g.add_argument("--chat-template", default=None, help="Jinja chat template, or a path to one")
        g.add_argument("--enforce-eager", action="store_true",
                       help="run every layer module by module: on the CPU, no one-call "
                            "decoder layers for decode steps")
        g.add_argument("--num-threads", type=positive_int, default=None,
                       help="CPU threads per rank (default: the cores over the tensor-parallel ranks)")
        g.add_argument("--speculative-config", type=speculative_config, default=None,
                       help='speculative decoding, as JSON (vLLM\'s keys): {"method": "ngram", '
                            '"num_speculative_tokens": 4, "prompt_lookup_min": 2, '
                            '"prompt_lookup_max": 4} proposes the 4 tokens that followed an '
                            "earlier occurrence of the text's last 4 (down to 2) tokens "
                            "(prompt lookup); {\"method\": \"draft_model\", \"model\": DRAFT, "
                            "\"num_speculative_tokens\": 4} has a smaller model with the same "
                            "tokenizer propose them; either is checked in one forward pass with "
                            "exact rejection sampling; \"disable_by_batch_size\": N turns it off "
                            "while N or more sequences run")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})
