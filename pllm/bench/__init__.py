"""Benchmarks: `pllm bench throughput | latency | serve`.

Every figure is reported beside a baseline measured in the same run on the
same machine (HF transformers, in a subprocess) or beside the machine's own
measured limit (memory read bandwidth), and written as JSON with a plot.

    workload.py     the standard request mixes (random tokens or real text)
    machine.py      CPU, versions, read bandwidth, peak RSS
    offline.py      pllm's throughput and latency runs (in this process)
    hf_baseline.py  HF `generate` / `generate_batch`, run as a subprocess
    serve.py        a Poisson stream of streaming completions against a server
    launch.py       servers the serve benchmark starts itself, one process a rate
    report.py       JSON results, summaries and plots
"""
