"""A small random Mixtral for measuring mixture-of-experts throughput
(there is no published MoE model small enough for two CPU cores): hidden
256, 4 layers, 8 query / 4 KV heads, 8 experts of width 512, two per token,
fp32 (52 MB), with the tiny test tokenizer.

    python ci/bench/moe_small.py OUT
    pllm bench throughput --model OUT --num-prompts 64 --input-len-range 32:256 \\
        --output-len-range 32:128 --kv-cache-memory 1GiB --compare hf
"""

from __future__ import annotations

import sys

from pllm.loader.testing import make_tiny_model


def main(out: str) -> None:
    make_tiny_model(out, "mixtral", hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=32, intermediate_size=512,
                    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)


if __name__ == "__main__":
    main(sys.argv[1])
