"""`pllm serve | generate | chat | bench | platforms`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pllm.entrypoints.engine_args import EngineArgs

# The least KV cache `pllm generate` sizes for itself, in blocks.
_MIN_KV_BLOCKS = 4


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64, help="most new tokens per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sample-seed", type=int, default=None, help="seed of this generation")


def _sampling_params(args):
    from pllm.core.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed)


def _generate(args) -> int:
    from pllm.entrypoints.engine_args import EngineArgs
    from pllm.entrypoints.llm import LLM

    params = _sampling_params(args)
    ea, prompts = _fit_kv_cache(EngineArgs.from_cli_args(args), args.prompts or ["Hello"],
                                args.max_tokens)
    llm = LLM(**vars(ea))
    for out in llm.generate(prompts, params, use_tqdm=False):
        print(f"{out.prompt}{out.outputs[0].text}")
        print("-" * 40)
    return 0


def _fit_kv_cache(ea: EngineArgs, prompts: list[str],
                  max_tokens: int) -> tuple[EngineArgs, list[str | dict]]:
    """Engine args whose KV cache holds these prompts and their outputs, all
    at once, and little more, and the prompts tokenized (so the engine counts
    what was counted here): the platform's default budget (4 GiB on the CPU)
    would be zeroed at start for a few hundred tokens. A --kv-cache-memory
    given is kept.

    The context becomes the longest prompt plus ``max_tokens`` (at most the
    model's), unless --max-model-len is given: left at the model's, it would
    not fit the cache, and the engine would lower it with a warning."""
    import dataclasses

    from pllm.core.resolve import DEFAULT_CONTEXT
    from pllm.loader import load_model
    from pllm.models import describe_model
    from pllm.plugins.manager import PluginManager

    if ea.kv_cache_memory is not None or ea.num_blocks_override is not None:
        return ea, prompts
    # What the engine will decide too; the tokenizer and config load lazily,
    # without the weights.
    plugins = PluginManager()
    platform = plugins.select_platform(ea.device)
    block_size = (plugins.update_config(platform, ea.create_engine_config()).cache.block_size
                  or platform.capabilities.default_block_size)
    loaded = load_model(ea.model, tokenizer=ea.tokenizer, chat_template=ea.chat_template)
    context = (ea.max_model_len or describe_model(loaded.hf_config).max_position_embeddings
               or DEFAULT_CONTEXT)
    token_ids = [loaded.tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    lengths = [min(len(ids) + max_tokens, context) for ids in token_ids]
    max_model_len = ea.max_model_len or max(lengths)
    num_blocks = max(sum(-(-n // block_size) for n in lengths), -(-max_model_len // block_size),
                     _MIN_KV_BLOCKS)
    ea = dataclasses.replace(ea, max_model_len=max_model_len, num_blocks_override=num_blocks)
    return ea, [{"prompt": p, "prompt_token_ids": ids} for p, ids in zip(prompts, token_ids)]


def _chat(args) -> int:
    from pllm.entrypoints.engine_args import EngineArgs
    from pllm.entrypoints.llm import LLM

    ea = EngineArgs.from_cli_args(args)
    llm = LLM(**vars(ea))
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    turns = list(args.message) if args.message else None
    while True:
        if turns is not None:
            if not turns:
                return 0
            user = turns.pop(0)
        else:
            try:
                user = input("> ")
            except EOFError:
                return 0
            if user.strip() in ("", "/exit", "/quit"):
                return 0
        messages.append({"role": "user", "content": user})
        out = llm.chat(messages, _sampling_params(args), use_tqdm=False)[0].outputs[0].text
        print(out)
        messages.append({"role": "assistant", "content": out})


def build_parser() -> argparse.ArgumentParser:
    from pllm import __version__
    from pllm.entrypoints import bench_cmd, platforms_cmd, serve_cmd
    from pllm.entrypoints.engine_args import EngineArgs

    parser = argparse.ArgumentParser(prog="pllm", description="LLM inference and serving")
    parser.add_argument("--version", action="version", version=f"pllm {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts offline and print the results")
    gen.add_argument("prompts", nargs="*", help="prompts (default: 'Hello')")
    EngineArgs.add_cli_args(gen, model_positional=False)
    _add_sampling_args(gen)
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("--message", action="append", help="send this message instead of reading stdin (repeatable)")
    chat.add_argument("--system", default=None, help="system prompt")
    EngineArgs.add_cli_args(chat, model_positional=False)
    _add_sampling_args(chat)
    chat.set_defaults(func=_chat)

    serve_cmd.register(sub)
    platforms_cmd.register(sub)
    bench_cmd.register(sub)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from pllm.plugins.errors import PluginError

    try:
        return int(args.func(args) or 0)
    except (ValueError, PluginError) as exc:  # a user's mistake: the message says what and why
        print(f"pllm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
