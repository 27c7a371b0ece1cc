"""localgpt against transformers on the same model, prompt and settings, in one run.

    python benchmarks/bench_generate.py [--model DIR] [--dtypes float32,bfloat16] [--prompt-tokens 128]
                                        [--new-tokens 128] [--repeats 3]

Each (implementation, dtype) runs in its own process, so peak RSS is that implementation's alone. Greedy decoding
of exactly --new-tokens tokens (end-of-sequence ignored), best of --repeats. Without --model it uses the
SmolLM2-135M-Instruct folder the tests build (tests/smollm2.py). transformers is needed (the `test` extra).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prompt_ids(count: int) -> list[int]:
    # A fixed, ordinary token sequence; the content does not change the cost of a forward pass.
    return [(i * 37) % 4000 + 100 for i in range(count)]


def run_localgpt(model_dir: Path, dtype: str, prompt: list[int], new_tokens: int, repeats: int, beams: int) -> dict:
    import torch

    from localgpt.generate import generate_tokens
    from localgpt.sampling import SamplingOptions
    from localgpt.weights import load_model

    start = time.perf_counter()
    loaded = load_model(model_dir, dtype=dtype, device="cpu")
    load_s = time.perf_counter() - start
    options = SamplingOptions(temperature=0)
    best, ttfts = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        first = None
        count = 0
        for _ in generate_tokens(loaded.model, prompt, options, new_tokens, eos_ids=set()):
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        result = {"ttft_s": first - start, "decode_tps": (count - 1) / (end - first), "tokens": count}
        ttfts.append(result["ttft_s"])
        if best is None or result["decode_tps"] > best["decode_tps"]:
            best = result
    best["ttft_s"] = min(ttfts)  # best of each figure: the first run also pays for cold caches
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    beam_tps = None
    if beams > 1:
        from localgpt.beam import BeamOptions, beam_search

        start = time.perf_counter()
        hypotheses = beam_search(loaded.model, prompt, options, BeamOptions(beams, early_stopping="never"), new_tokens)
        total = time.perf_counter() - start
        beam_tps = len(hypotheses[0].tokens) / (total - best["ttft_s"])  # minus the prompt, as measured above
    return {**best, "load_s": load_s, "weight_bytes": weights, "threads": torch.get_num_threads(),
            "beam_tps": beam_tps}


def run_transformers(model_dir: Path, dtype: str, prompt: list[int], new_tokens: int, repeats: int,
                     beams: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - start
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)
    best, ttfts = None, []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            ttft = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            total = time.perf_counter() - start
            # The full run minus its own prefill (measured by the one-token run) is the decode time.
            result = {"ttft_s": ttft, "decode_tps": (new_tokens - 1) / max(total - ttft, 1e-9), "tokens": new_tokens}
            ttfts.append(ttft)
            if best is None or result["decode_tps"] > best["decode_tps"]:
                best = result
        best["ttft_s"] = min(ttfts)
        beam_tps = None
        if beams > 1:
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams,
                           early_stopping="never", **kwargs)
            beam_tps = new_tokens / (time.perf_counter() - start - best["ttft_s"])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {**best, "load_s": load_s, "weight_bytes": weights, "threads": torch.get_num_threads(),
            "beam_tps": beam_tps}


def child(args) -> None:
    runner = run_localgpt if args.child == "localgpt" else run_transformers
    result = runner(Path(args.model), args.child_dtype, prompt_ids(args.prompt_tokens), args.new_tokens, args.repeats,
                    args.beams)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(args, implementation: str, dtype: str) -> dict:
    command = [sys.executable, __file__, "--child", implementation, "--child-dtype", dtype, "--model", str(args.model),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats), "--beams", str(args.beams)]
    output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct from the tests)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beams", type=int, default=4, help="also time beam search with this many beams (1: skip)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        import smollm2

        args.model = smollm2.hf_folder()
    if args.child:
        child(args)
        return

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"model: {args.model}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, "
          f"best of {args.repeats}\n")
    header = (f"{'dtype':<9} {'impl':<13} {'decode tok/s':>12} {'TTFT ms':>8} {'peak RSS MB':>11} {'GB/s':>6} "
              f"{'load s':>6} {'beam tok/s':>10}")
    print(header)
    print("-" * len(header))
    for dtype in args.dtypes.split(","):
        results = {impl: measure(args, impl, dtype) for impl in ("localgpt", "transformers")}
        for impl, r in results.items():
            bandwidth = r["weight_bytes"] * r["decode_tps"] / 1e9
            beam = f"{r['beam_tps']:>10.1f}" if r["beam_tps"] else f"{'-':>10}"
            print(f"{dtype:<9} {impl:<13} {r['decode_tps']:>12.1f} {r['ttft_s'] * 1000:>8.0f} "
                  f"{r['peak_rss_mb']:>11.0f} {bandwidth:>6.1f} {r['load_s']:>6.2f} {beam}")
        ours, theirs = results["localgpt"], results["transformers"]
        beam_ratio = f"{ours['beam_tps'] / theirs['beam_tps']:>9.2f}x" if ours["beam_tps"] else ""
        print(f"{dtype:<9} {'ratio':<13} {ours['decode_tps'] / theirs['decode_tps']:>11.2f}x "
              f"{ours['ttft_s'] / theirs['ttft_s']:>7.2f}x {ours['peak_rss_mb'] / theirs['peak_rss_mb']:>10.2f}x "
              f"{'':>6} {'':>6} {beam_ratio}")
        if ours["beam_tps"]:
            ratio = ours["beam_tps"] / ours["decode_tps"]
            print(f"{dtype:<9} {'localgpt':<13} beam-{args.beams} / greedy = {ratio:.2f}x")
        print()


if __name__ == "__main__":
    main()
