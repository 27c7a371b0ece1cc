"""Greedy and beam-search decode speed, localgpt against transformers, on the same model in one run.

    python benchmarks/bench_generate.py [--model DIR] [--dtypes float32,bfloat16] [--prompt-tokens 128]
                                        [--new-tokens 64] [--beams 4]

Greedy figures come from `localgpt bench` (localgpt/bench.py: each implementation in its own process); this
script adds beam search (`early_stopping="never"`, so every run decodes all --new-tokens steps) and the ratios
beam / greedy and localgpt / transformers. Without --model it uses the SmolLM2-135M-Instruct folder the tests
build (tests/smollm2.py). transformers is needed (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from localgpt.bench import measure, prompt_ids

ROOT = Path(__file__).resolve().parent.parent


def beam_tps(implementation: str, model_dir: str, dtype: str, prompt_tokens: int, new_tokens: int,
             beams: int) -> float:
    """Decode tok/s of one beam search (prefill excluded by timing a one-token search first)."""
    import torch

    if implementation == "localgpt":
        from localgpt.beam import BeamOptions, beam_search
        from localgpt.sampling import SamplingOptions
        from localgpt.weights import load_model

        loaded = load_model(Path(model_dir), dtype=dtype, device="cpu")
        prompt = prompt_ids(prompt_tokens, loaded.config.vocab_size)

        def search(count: int) -> None:
            beam_search(loaded.model, prompt, SamplingOptions(temperature=0),
                        BeamOptions(beams, early_stopping="never"), count)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        ids = torch.tensor([prompt_ids(prompt_tokens, model.config.vocab_size)])

        def search(count: int) -> None:
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                               num_beams=beams, early_stopping="never", do_sample=False, eos_token_id=None,
                               pad_token_id=0)

    search(2)  # warm-up
    start = time.perf_counter()
    search(1)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    search(new_tokens)
    return (new_tokens - 1) / (time.perf_counter() - start - prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct from the tests)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # implementation dtype
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        import smollm2

        args.model = str(smollm2.hf_folder())
    if args.child:
        implementation, dtype = args.child
        print(json.dumps(beam_tps(implementation, args.model, dtype, args.prompt_tokens, args.new_tokens, args.beams)))
        return

    print(f"model: {args.model}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens; "
          f"beam search with {args.beams} beams, early_stopping='never'\n")
    header = f"{'dtype':<9} {'impl':<13} {'greedy tok/s':>12} {f'beam-{args.beams} tok/s':>12} {'beam/greedy':>11}"
    print(header)
    print("-" * len(header))
    for dtype in args.dtypes.split(","):
        rows = {}
        for implementation in ("localgpt", "transformers"):
            greedy = measure(implementation, model=args.model, dtype=dtype, prompt_tokens=args.prompt_tokens,
                             new_tokens=args.new_tokens, repeats=3).decode_tps
            command = [sys.executable, __file__, "--child", implementation, dtype, "--model", args.model,
                       "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                       "--beams", str(args.beams)]
            output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
            beam = json.loads(output.strip().splitlines()[-1])
            rows[implementation] = (greedy, beam)
            print(f"{dtype:<9} {implementation:<13} {greedy:>12.1f} {beam:>12.1f} {beam / greedy:>10.2f}x")
        (ours_greedy, ours_beam), (their_greedy, their_beam) = rows["localgpt"], rows["transformers"]
        print(f"{dtype:<9} {'ratio':<13} {ours_greedy / their_greedy:>11.2f}x {ours_beam / their_beam:>11.2f}x\n")


if __name__ == "__main__":
    main()
