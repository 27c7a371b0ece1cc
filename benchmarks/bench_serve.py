"""`localgpt serve` under load, through the openai client against a real server on 127.0.0.1.

    python benchmarks/bench_serve.py [-m MODEL] [--parallel 8] [--tokens 64]

Prints, with the machine it ran on: one stream's decode tok/s; the aggregate decode tok/s of `--parallel`
concurrent streams and its ratio to one stream; the time to first token of a first turn and of a second turn
that extends it (the prompt-cache target is ≤ 1.5x). End-of-sequence tokens are banned through logit_bias so every
stream decodes exactly --tokens tokens.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from openai import OpenAI


def start(model: str, parallel: int, log: Path) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, "-m", "localgpt", "serve", "-m", model, "--port", "0",
                                "--parallel", str(parallel)], stderr=log.open("w"), stdout=subprocess.DEVNULL)
    while "serving" not in log.read_text():
        if process.poll() is not None:
            raise SystemExit(log.read_text())
        time.sleep(0.2)
    return process, int(log.read_text().split("http://127.0.0.1:")[1].split("/")[0])


def stream(client: OpenAI, model: str, messages: list[dict], tokens: int,
           bias: dict) -> tuple[float, float, int, str]:
    """(seconds to the first token, seconds from the first to the last, chunks with text, the text)."""
    started = time.perf_counter()
    first = None
    pieces = []
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=tokens, temperature=0,
                                                stream=True, logit_bias=bias):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
    return first - started, time.perf_counter() - first, len(pieces), "".join(pieces)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model",
                        default=os.environ.get("LOCALGPT_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    from localgpt.bench import machine_description
    from localgpt.hub import resolve
    from localgpt.tokenizer import Tokenizer

    folder = resolve(args.model)
    eos = Tokenizer(folder).eos_token_ids
    bias = {str(token): -100 for token in eos}
    with tempfile.TemporaryDirectory() as scratch:
        process, port = start(str(folder), args.parallel, Path(scratch) / "serve.log")
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
            model = client.models.list().data[0].id
            question = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
            stream(client, model, question, 8, bias)  # warm-up
            _, decode_s, count, _ = stream(client, model, question, args.tokens, bias)
            single = (count - 1) / decode_s
            results: list[tuple[float, float, int, str]] = []
            threads = [threading.Thread(target=lambda i=i: results.append(stream(
                client, model, [{"role": "user", "content": f"Story {i} about a lighthouse keeper."}], args.tokens,
                bias))) for i in range(args.parallel)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
            aggregate = sum(result[2] for result in results) / wall
            # A conversation: its first turn, then a second whose messages hold the first answer (the server keeps
            # the finished turn's row, so only the new tokens are prefilled).
            talk = [{"role": "user", "content": "Describe a lighthouse at night in detail."}]
            first_turn, _, _, reply = stream(client, model, talk, args.tokens, bias)
            follow = talk + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Go on."}]
            second_turn, _, _, _ = stream(client, model, follow, args.tokens, bias)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    print(f"machine: {machine_description()}")
    print(f"model: {folder}; {args.tokens} new tokens per stream, greedy, end-of-sequence banned")
    print(f"one stream: {single:.1f} tok/s decode")
    print(f"{args.parallel} concurrent streams (--parallel {args.parallel}): {aggregate:.1f} tok/s aggregate, "
          f"{aggregate / single:.2f}x one stream (wall time, prefills included)")
    print(f"time to first token: first turn {first_turn * 1000:.0f} ms, second turn extending it "
          f"{second_turn * 1000:.0f} ms ({second_turn / first_turn:.2f}x)")


if __name__ == "__main__":
    main()
