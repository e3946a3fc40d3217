"""`pllm bench throughput | latency | serve` on the tiny model: the JSON a run
writes, the ratios it records, the HF baselines, and the serving client
against a fake OpenAI server on loopback."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pllm.bench import hf_baseline
from pllm.bench.serve import ServeBenchError, check_loopback
from pllm.bench.workload import build_requests, parse_range, special_token_ids
from pllm.entrypoints import bench_cmd

ENGINE = ["--device", "cpu", "--kv-cache-memory", "16MB", "--max-model-len", "128"]


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from pllm.loader import load_model

    return load_model(tiny_model_dir).tokenizer


# ---------------------------------------------------------------- workload


def test_default_workload_is_the_documented_mix(tokenizer):
    reqs = build_requests(tokenizer, 320, num_requests=64, input_range=(16, 256),
                          output_range=(32, 128), seed=0)
    # BENCHMARKS.md: 9,703 prompt and 4,962 output tokens with the default seed.
    assert sum(r.prompt_len for r in reqs) == 9703
    assert sum(r.output_len for r in reqs) == 4962
    ids = {t for r in reqs for t in r.prompt_token_ids}
    assert not ids & special_token_ids(tokenizer)
    assert max(ids) < len(tokenizer)  # the 320-row embedding is padded past the tokenizer
    text = build_requests(tokenizer, 320, num_requests=64, input_range=(16, 256),
                          output_range=(32, 128), seed=0, dataset="text")
    assert [r.prompt_len for r in text] == [r.prompt_len for r in reqs]
    assert [r.output_len for r in text] == [r.output_len for r in reqs]
    assert "the" in tokenizer.decode(text[0].prompt_token_ids)
    # Another prompt seed (each serve rate gets one): same lengths, other prompts.
    other = build_requests(tokenizer, 320, num_requests=64, input_range=(16, 256),
                           output_range=(32, 128), seed=0, prompt_seed=7919)
    assert [(r.prompt_len, r.output_len) for r in other] == [(r.prompt_len, r.output_len) for r in reqs]
    assert all(a.prompt_token_ids != b.prompt_token_ids for a, b in zip(other, reqs))


def test_bad_ranges_and_baselines_are_user_errors(capsys):
    assert parse_range("16:256", "x") == (16, 256) and parse_range("7", "x") == (7, 7)
    for bad in ("0,4", "9,3", "a,b", "1,2,3"):
        with pytest.raises(ValueError, match="LO"):
            parse_range(bad, "--input-len-range")
    assert bench_cmd.main(["latency", "--compare", "hf-generate-batch"]) == 2
    assert "unknown --compare 'hf-generate-batch' for bench latency" in capsys.readouterr().err


def test_bench_registers_as_a_pllm_subcommand():
    parser = argparse.ArgumentParser(prog="pllm")
    bench_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "throughput", "--max-num-seqs", "8", "--compare", "hf",
                              "--num-prompts", "3", "--hf-batch-size", "2"])
    assert args.func is bench_cmd.run_throughput
    assert (args.max_num_seqs, args.num_prompts, args.hf_batch_size, args.compare) == (8, 3, 2, ["hf"])
    args = parser.parse_args(["bench", "serve", "--request-rate", "1", "inf"])
    assert args.func is bench_cmd.run_serve and args.request_rate == [1.0, float("inf")]


# ---------------------------------------------------------------- offline benchmarks


def test_throughput_against_hf_generate(tiny_model_dir, tmp_path):
    out = tmp_path / "t.json"
    rc = bench_cmd.main(["throughput", "--model", tiny_model_dir, *ENGINE, "--num-prompts", "5",
                         "--input-len-range", "4,20", "--output-len-range", "3,9",
                         "--compare", "hf-generate", "--hf-batch-size", "2",
                         "--output-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "throughput"
    assert {"cpu_model", "num_logical_cpus", "torch_num_threads"} <= set(result["machine"])
    assert {"pllm", "torch", "transformers"} <= set(result["versions"])
    w = result["workload"]
    assert (w["num_requests"], w["input_len_range"], w["seed"]) == (5, [4, 20], 0)
    pllm, hf = result["pllm"], result["baselines"]["hf-generate"]
    assert "error" not in hf, hf.get("error")
    for run in (pllm, hf):
        assert run["num_useful_output_tokens"] == w["num_output_tokens"]
        assert run["num_prompt_tokens"] == w["num_prompt_tokens"]
        assert run["useful_output_tokens_per_s"] == pytest.approx(
            run["num_useful_output_tokens"] / run["elapsed_s"])
        assert run["peak_rss_bytes"] > 0
    assert pllm["num_short_outputs"] == 0
    # HF pads each batch of 2 to its longest output; only the asked tokens count.
    assert hf["num_generated_tokens"] >= hf["num_useful_output_tokens"]
    assert hf["batch_size"] == 2 and hf["num_threads"] == result["machine"]["torch_num_threads"]
    assert result["ratios"]["hf-generate"] == pytest.approx(
        pllm["useful_output_tokens_per_s"] / hf["useful_output_tokens_per_s"])
    assert result["plot"] == str(tmp_path / "t.png") and _is_png(result["plot"])


def _spec(folder, mode, requests, **extra) -> dict:
    return {"mode": mode, "model_folder": folder, "dtype": "float32", "device": "cpu",
            "num_threads": 1, "pad_token_id": 0, "eos_token_id": [2],
            "requests": requests, **extra}


def _run_in_process(tmp_path, spec) -> tuple[int, dict]:
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    rc = hf_baseline.main([str(spec_path), str(out_path)])
    return rc, json.loads(out_path.read_text())


def test_hf_generate_batch_and_latency_baselines(tiny_model_dir, tmp_path):
    requests = [[[5, 6, 7, 8, 9], 4], [[10, 11, 12], 7], [list(range(20, 40)), 2]]
    rc, cb = _run_in_process(tmp_path, _spec(tiny_model_dir, "generate_batch", requests,
                                             page_size=16, max_batch_tokens=64))
    if "has no generate_batch" not in cb.get("error", ""):  # else: an old transformers, recorded
        assert rc == 0, cb.get("error")
        assert cb["num_useful_output_tokens"] == cb["num_generated_tokens"] == 13
        assert cb["num_short_outputs"] == 0
    rc, lat = _run_in_process(tmp_path, _spec(tiny_model_dir, "latency", requests, num_warmup=1))
    assert rc == 0, lat.get("error")
    assert lat["num_iters"] == 2 and lat["ttft_s"] > 0 and lat["decode_tokens_per_s"] > 0


def test_failing_baseline_is_recorded_not_raised(tmp_path):
    rc, result = _run_in_process(tmp_path, _spec(str(tmp_path / "missing"), "generate",
                                                 [[[5, 6], 2]], batch_size=1))
    assert rc == 1 and result["error"] and result["mode"] == "generate"


def test_latency_reports_bandwidth_fraction(tiny_model_dir, tmp_path):
    from pllm.loader import load_model

    out = tmp_path / "lat.json"
    rc = bench_cmd.main(["latency", "--model", tiny_model_dir, *ENGINE, "--input-len", "12",
                         "--output-len", "6", "--num-iters", "2", "--bandwidth-mib", "16",
                         "--output-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    pllm, bw = result["pllm"], result["bandwidth"]
    assert result["workload"]["batch_size"] == 1 and pllm["num_iters"] == 2
    assert pllm["num_output_tokens"] == 6 and pllm["ttft_s"] > 0
    assert pllm["decode_tokens_per_s"] == pytest.approx(1 / pllm["time_per_output_token_s"])
    assert pllm["peak_rss_bytes"] > 0
    # Untied tiny model: a decode step reads every weight but the input embedding.
    weights = dict(load_model(tiny_model_dir).weights())
    expected = sum(t.numel() * 4 for n, t in weights.items() if "embed_tokens" not in n)
    assert bw["weight_bytes"] == expected
    assert bw["achieved_gb_per_s"] == pytest.approx(
        expected / pllm["time_per_output_token_s"] / 1e9)
    assert bw["bandwidth_fraction"] == pytest.approx(
        bw["achieved_gb_per_s"] / bw["read_bandwidth_gb_per_s"])
    assert result["baselines"] == {} and _is_png(result["plot"])


# ---------------------------------------------------------------- serving


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Streams one chunk per asked token, 2 ms apart, then usage and [DONE]."""

    protocol_version = "HTTP/1.0"  # the body ends when the connection closes
    bodies: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.end_headers()

    def do_GET(self) -> None:
        self._send(200, "application/json")
        self.wfile.write(json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        self._send(200, "text/event-stream")
        for i in range(body["max_tokens"]):
            time.sleep(0.002)
            done = "length" if i == body["max_tokens"] - 1 else None
            chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": done}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def fake_server():
    _FakeOpenAI.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_serve_bench_against_a_streaming_server(tiny_model_dir, tmp_path, fake_server):
    out = tmp_path / "serve.json"
    rc = bench_cmd.main(["serve", "--base-url", fake_server, "--model", tiny_model_dir,
                         "--num-prompts", "4", "--input-len-range", "4,12",
                         "--output-len-range", "3,6", "--request-rate", "40", "inf",
                         "--max-seconds", "20", "--output-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["model"] == "fake-model" and result["workload"]["request_rates"] == [40.0, "inf"]
    asked = result["workload"]["num_output_tokens"]
    for row in result["per_rate"]:
        assert (row["num_completed"], row["num_failed"], row["num_cancelled"]) == (4, 0, 0)
        assert row["num_output_tokens"] == asked
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] <= row["e2e_p99_s"]
        assert 0 < row["itl_p50_s"] <= row["itl_p99_s"]
        assert row["output_tokens_per_s"] == pytest.approx(asked / row["duration_s"])
        if sys.platform == "linux":
            assert 0.0 <= row["cpu_steal"] <= 1.0
    sent = _FakeOpenAI.bodies[1:]  # after the warm-up request
    assert len(sent) == 8
    assert all(b["stream"] and b["ignore_eos"] and isinstance(b["prompt"][0], int) for b in sent)
    assert _is_png(result["plot"])


@pytest.mark.skipif(sys.platform != "linux", reason="steal is reported by Linux's /proc/stat")
def test_cpu_steal_is_the_share_of_host_time_given_to_others(tmp_path, monkeypatch):
    import os

    import psutil

    from pllm.bench.machine import cpu_times, steal_fraction

    monkeypatch.setattr(psutil, "PROCFS_PATH", str(tmp_path))
    tick = 1 / os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 0 50 800 10 0 5 35 7 0\ncpu0 50 0 25 400 5 0 2 18 3 0\n")
    before = cpu_times()
    assert before == pytest.approx((35 * tick, 1000 * tick))  # guest time is inside user time
    stat.write_text("cpu  400 0 150 900 10 0 5 535 7 0\n")
    assert steal_fraction(before, cpu_times()) == pytest.approx(500 / 1000)
    stat.unlink()
    assert cpu_times() is None
    assert steal_fraction(None, before) is None and steal_fraction(before, before) is None


def test_serve_bench_refuses_remote_hosts(capsys):
    for url in ("http://127.0.0.1:8000/v1", "http://localhost:1/v1", "http://[::1]:8000/v1"):
        check_loopback(url, allow_remote=False)
    with pytest.raises(ServeBenchError, match="--allow-remote"):
        check_loopback("http://example.com/v1", allow_remote=False)
    check_loopback("http://example.com/v1", allow_remote=True)
    assert bench_cmd.main(["serve", "--base-url", "http://192.0.2.7:8000/v1"]) == 2
    assert "refusing to benchmark '192.0.2.7'" in capsys.readouterr().err


def test_pllm_on_another_device_is_a_baseline_of_the_same_run(tiny_model_dir, tmp_path):
    """``--compare pllm-DEVICE``: pllm again, same engine arguments and
    requests, on another platform (here the cpu itself, and one that is not
    installed: recorded as failed, naming the installed platforms)."""
    out = tmp_path / "tp.json"
    rc = bench_cmd.main(["throughput", "--model", tiny_model_dir, *ENGINE, "--num-prompts", "3",
                         "--input-len-range", "4,12", "--output-len-range", "2,4",
                         "--compare", "pllm-cpu,pllm-nosuchchip", "--output-json", str(out),
                         "--no-plot"])
    assert rc == 0
    result = json.loads(out.read_text())
    cpu = result["baselines"]["pllm-cpu"]
    assert cpu["device"] == "cpu" and cpu["num_useful_output_tokens"] > 0
    assert result["ratios"]["pllm-cpu"] > 0
    assert "nosuchchip" in result["baselines"]["pllm-nosuchchip"]["error"]
    assert "cpu" in result["baselines"]["pllm-nosuchchip"]["error"]


def test_pllm_on_another_device_is_a_latency_baseline_too(tiny_model_dir, tmp_path):
    out = tmp_path / "lat.json"
    rc = bench_cmd.main(["latency", "--model", tiny_model_dir, *ENGINE, "--input-len", "8",
                         "--output-len", "4", "--num-iters", "1", "--num-iters-warmup", "0",
                         "--bandwidth-mib", "16", "--compare", "pllm-cpu", "--output-json",
                         str(out), "--no-plot"])
    assert rc == 0
    result = json.loads(out.read_text())
    cpu = result["baselines"]["pllm-cpu"]
    assert cpu["device"] == "cpu" and cpu["decode_tokens_per_s"] > 0 and cpu["ttft_s"] > 0
    assert result["ratios"]["pllm-cpu"] > 0 and result["ttft_speedups"]["pllm-cpu"] > 0
    assert 0 < cpu["bandwidth_fraction"]


def test_throughput_with_structured_outputs_against_the_same_requests_without(tiny_model_dir,
                                                                              tmp_path):
    """``--structured-output json``: every request held to a schema that
    cannot close before its length, so it runs to the same length as
    without (``--compare no-structured``)."""
    pytest.importorskip("xgrammar")
    out = tmp_path / "s.json"
    rc = bench_cmd.main(["throughput", "--model", tiny_model_dir, *ENGINE, "--num-prompts", "4",
                         "--input-len-range", "4,20", "--output-len-range", "30,40",
                         "--structured-output", "json", "--compare", "no-structured",
                         "--no-plot", "--output-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["workload"]["structured_output"] == "json"
    pllm, plain = result["pllm"], result["baselines"]["no-structured"]
    assert "error" not in plain, plain.get("error")
    for run in (pllm, plain):
        assert run["num_short_outputs"] == 0
        assert run["num_useful_output_tokens"] == result["workload"]["num_output_tokens"]
    assert result["ratios"]["no-structured"] == pytest.approx(
        pllm["useful_output_tokens_per_s"] / plain["useful_output_tokens_per_s"])
