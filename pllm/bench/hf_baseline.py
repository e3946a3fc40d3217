"""HF transformers baselines, each run in its own subprocess so that its peak
RSS is its own and its memory goes back when it ends.

    python -m pllm.bench.hf_baseline SPEC.json RESULT.json

``SPEC.json`` names the mode and the workload (see :func:`run_baseline`);
``RESULT.json`` gets the figures, or ``{"error": ...}`` when the baseline
cannot run (an old transformers without ``generate_batch``, say).

Modes:

- ``generate``: static batches of ``batch_size`` requests in arrival order
  (``order="sorted"``: by prompt length, which pads less), left padding, sdpa
  attention. A batch generates the longest output asked in it
  (``min_new_tokens = max_new_tokens``); only each request's own length counts.
- ``generate_batch``: transformers' continuous batching with a paged cache
  sized to hold the whole workload, one ``max_new_tokens`` per request, EOS
  disabled.
- ``latency``: batch-1 ``generate`` with a streamer timing every token.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

BASELINE_MODES = {"hf-generate": "generate", "hf-generate-batch": "generate_batch"}


def run_baseline(spec: dict, *, timeout_s: float | None = None) -> dict:
    """Run one baseline in a subprocess; its result dict, or one with ``error``.

    ``spec``: mode, model_folder, dtype, device, num_threads, requests (a list
    of ``[prompt_token_ids, output_len]``), pad_token_id, eos_token_id, and per
    mode batch_size / order (generate), page_size / max_batch_tokens
    (generate_batch), num_warmup (latency).
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pllm-bench-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        cmd = [sys.executable, "-m", "pllm.bench.hf_baseline", spec_path, out_path]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  stdin=subprocess.DEVNULL)
            log = (proc.stdout + proc.stderr)[-2000:]
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            log, returncode = f"timed out after {timeout_s}s", None
        if os.path.exists(out_path):
            with open(out_path) as f:
                result = json.load(f)
        else:
            result = {"error": f"baseline process exited with {returncode}: {log.strip()}"}
    result["wall_s"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------- in the subprocess


def _load(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    from pllm.loader.transformers_compat import dtype_kwargs

    torch.set_num_threads(spec["num_threads"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_folder"], **dtype_kwargs(getattr(torch, spec["dtype"])),
        attn_implementation="sdpa")
    model = model.to(spec["device"]).eval()
    return model, time.perf_counter() - t0


def _left_padded(prompts: list[list[int]], pad_id: int, device: str):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _gen_config(spec: dict, num_new: int, eos=None):
    from transformers import GenerationConfig

    # min = max: exactly num_new tokens, EOS suppressed until then (ignore_eos).
    return GenerationConfig(max_new_tokens=num_new, min_new_tokens=num_new, do_sample=False,
                            pad_token_id=spec["pad_token_id"],
                            eos_token_id=spec["eos_token_id"] if eos is None else eos)


def _static_batches(spec: dict) -> dict:
    import torch

    from pllm.bench.figures import throughput_figures

    model, load_s = _load(spec)
    requests = spec["requests"]
    order = list(range(len(requests)))
    if spec.get("order", "arrival") == "sorted":
        order.sort(key=lambda i: len(requests[i][0]))
    batch_size = spec["batch_size"]
    with torch.inference_mode():
        ids, mask = _left_padded([requests[0][0][:8]] * 2, spec["pad_token_id"], spec["device"])
        model.generate(input_ids=ids, attention_mask=mask, generation_config=_gen_config(spec, 2))
        t0 = time.perf_counter()
        generated = 0
        for start in range(0, len(order), batch_size):
            batch = [requests[i] for i in order[start:start + batch_size]]
            num_new = max(o for _, o in batch)
            ids, mask = _left_padded([p for p, _ in batch], spec["pad_token_id"], spec["device"])
            out = model.generate(input_ids=ids, attention_mask=mask,
                                 generation_config=_gen_config(spec, num_new))
            generated += (out.shape[1] - ids.shape[1]) * len(batch)
        elapsed = time.perf_counter() - t0
    figures = throughput_figures(
        elapsed, num_requests=len(requests), num_prompt_tokens=sum(len(p) for p, _ in requests),
        num_useful_tokens=sum(o for _, o in requests), num_generated_tokens=generated)
    figures.update(load_s=load_s, batch_size=batch_size, order=spec.get("order", "arrival"),
                   attn_implementation=model.config._attn_implementation)
    return figures


def _continuous_batching(spec: dict) -> dict:
    import torch

    from pllm.bench.figures import throughput_figures

    model, load_s = _load(spec)
    if not hasattr(model, "generate_batch"):
        import transformers

        return {"error": f"transformers {transformers.__version__} has no generate_batch"}
    from transformers import ContinuousBatchingConfig

    requests = spec["requests"]
    page = spec["page_size"]
    # Room for every request at once (plus the warm-up one): no preemption.
    num_blocks = sum(math.ceil((len(p) + o + 1) / page) for p, o in requests) + 2
    cb_config = ContinuousBatchingConfig(page_size=page, num_blocks=num_blocks,
                                         max_batch_tokens=spec["max_batch_tokens"])
    gen_config = _gen_config(spec, max(o for _, o in requests), eos=-1)
    with torch.inference_mode(), model.continuous_batching_context_manager(
            generation_config=gen_config, continuous_batching_config=cb_config,
            block=True, timeout=30, warmup=False) as manager:
        _collect(manager, [manager.add_request(requests[0][0][:8], max_new_tokens=2,
                                               eos_token_id=-1)])
        t0 = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=o, eos_token_id=-1) for p, o in requests]
        results = _collect(manager, ids)
        elapsed = time.perf_counter() - t0
    errors = [r.error for r in results.values() if r.error]
    if len(results) < len(ids) or errors:
        return {"error": f"generate_batch finished {len(results) - len(errors)} of {len(ids)} "
                         f"requests; first error: {errors[0] if errors else None}"}
    generated = [len(results[i].generated_tokens) for i in ids]
    figures = throughput_figures(
        elapsed, num_requests=len(requests), num_prompt_tokens=sum(len(p) for p, _ in requests),
        num_useful_tokens=sum(min(n, o) for n, (_, o) in zip(generated, requests)),
        num_generated_tokens=sum(generated))
    figures.update(load_s=load_s, page_size=page, num_blocks=num_blocks,
                   max_batch_tokens=spec["max_batch_tokens"],
                   num_short_outputs=sum(n < o for n, (_, o) in zip(generated, requests)))
    return figures


def _collect(manager, request_ids: list[str]) -> dict:
    """Wait for every request to finish (or the manager to die)."""
    pending, done = set(request_ids), {}
    while pending:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                fatal = getattr(manager.background_thread_status, "fatal_error", None)
                raise RuntimeError(f"the generate_batch loop stopped: {fatal!r}")
            continue
        if result.request_id in pending and result.is_finished():
            pending.discard(result.request_id)
            done[result.request_id] = result
    return done


def _latency(spec: dict) -> dict:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from pllm.bench.figures import latency_figures

    class _Clock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.seen_prompt = False

        def put(self, value) -> None:
            if not self.seen_prompt:  # generate first hands over the prompt itself
                self.seen_prompt = True
                return
            self.stamps += [time.perf_counter()] * value.numel()

        def end(self) -> None:
            pass

    model, load_s = _load(spec)
    runs = []
    with torch.inference_mode():
        for prompt, num_new in spec["requests"]:
            ids = torch.tensor([prompt], device=spec["device"])
            clock = _Clock()
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=clock,
                           generation_config=_gen_config(spec, num_new))
            runs.append((start, clock.stamps))
    figures = latency_figures(runs[spec["num_warmup"]:])
    figures["load_s"] = load_s
    return figures


_MODES = {"generate": _static_batches, "generate_batch": _continuous_batching, "latency": _latency}


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        result = _MODES[spec["mode"]](spec)
    except Exception as exc:  # recorded, not raised: a failing baseline must not sink the run
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    from pllm.bench.machine import peak_rss_bytes

    result.update(mode=spec["mode"], peak_rss_bytes=peak_rss_bytes(),
                  num_threads=spec["num_threads"], dtype=spec["dtype"], device=spec["device"])
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
