"""Problems per minute of ``agentkit eval gsm8k`` with N problems in flight (issue 17).

The same GSM8K problems (rows 200-215 of the shared sample by default: the tuning range, so no
reported item is spent here) are solved by PAL at concurrency 1, 4 and 16 against one vLLM
server, which batches the requests it has at once. The baseline is concurrency 1 in the same
run; accuracy is recorded at each level (greedy decoding, so it should barely move).

Starts the embedded model with ``ModelServer`` unless ``--url`` names a running server.
"""

from __future__ import annotations

import argparse
import time

from common import SHARED, write_result

from agentkit import Settings
from agentkit.evaluation import eval_gsm8k
from agentkit.llm import OpenAIChatModel
from agentkit.services.model_server import ModelServer, ServeOptions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", help="a running OpenAI-compatible server (else start one)")
    parser.add_argument("--start", type=int, default=200)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--mode", default="pal", choices=["pal", "cot"])
    args = parser.parse_args()
    data = SHARED / "data" / "gsm8k" / "train_sample_250.jsonl"
    settings = Settings()
    server = None
    url = args.url
    if url is None:
        server = ModelServer(ServeOptions(port=8124), settings.cache_dir)
        url = server.start()
    levels: dict[str, dict] = {}
    try:
        with OpenAIChatModel(url) as model:
            model.complete([{"role": "user", "content": "Hi"}], max_tokens=1)  # warm
            for n in (int(level) for level in args.levels.split(",")):
                started = time.perf_counter()
                report = eval_gsm8k(
                    model, data, start=args.start, limit=args.problems, mode=args.mode,
                    concurrency=n,
                )  # fmt: skip
                levels[str(n)] = {
                    "concurrency": n,
                    "problems": report["n"],
                    "wall_s": time.perf_counter() - started,
                    "problems_per_minute": report["problems_per_minute"],
                    "accuracy": report["accuracy"],
                    "mean_latency_s": report["mean_latency_s"],
                }
                print(levels[str(n)], flush=True)
            served = model.model
    finally:
        if server is not None:
            server.stop()
    base = levels[min(levels, key=int)]["problems_per_minute"]
    write_result(
        "eval_concurrency",
        {
            "model": served,
            "mode": args.mode,
            "items": [args.start, args.start + args.problems],
            "levels": levels,
            "vs_concurrency_1": {
                n: level["problems_per_minute"] / base for n, level in levels.items()
            },
        },
    )


if __name__ == "__main__":
    main()
