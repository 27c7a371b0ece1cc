"""What --int8-activations costs in quality: perplexity of 4-bit SmolLM2 with float and with int8 activations, fed
through the decoding products (16 tokens per pass: the rows the native kernels take), and the greedy answer to
the France question, for each 4-bit layout.

    python benchmarks/bench_int8_activations.py [--model DIR]

Quantized folders are written with `localgpt quantize` into a temporary folder first: the default skip list
(lm_head and q/k/v kept in bfloat16), `--quantize-head`, and everything quantized (`--skip ""`, the bytes of
llama.cpp's Q4_0), in nf4 and fp4. Perplexity is over tests/data/perplexity.txt, as in bench_quantize.py.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_quantize import ROOT, TEXT, perplexity  # the same text and measure, run from this folder

from localgpt.backends.base import DECODE_ROWS  # passes of this many tokens go through the decoding kernels

LAYOUTS = {"default": [], "head quantized": ["--quantize-head"], "everything": ["--skip", "", "--quantize-head"]}


def measure(folder: Path, int8_activations: bool) -> tuple[float, str, str]:
    from localgpt.generate import generate_tokens
    from localgpt.sampling import SamplingOptions
    from localgpt.weights import load_model

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    loaded = load_model(folder, int8_activations=int8_activations)
    ids = loaded.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    answer = loaded.tokenizer.decode(list(generate_tokens(loaded.model, ids, SamplingOptions(temperature=0), 20,
                                                          loaded.tokenizer.eos_token_ids))).strip()
    text = loaded.tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    return perplexity(loaded.model, text, chunk=DECODE_ROWS), answer, loaded.model.backend.describe()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="A float SmolLM2 folder (default: the tests' cached one).")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        import smollm2

        args.model = smollm2.hf_folder()
    print("| 4-bit layout | code | perplexity, float activations | int8 activations | change | answer with int8 |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as scratch:
        for layout, flags in LAYOUTS.items():
            for code in ("nf4", "fp4"):
                folder = Path(scratch) / f"{code}-{layout.replace(' ', '-')}"
                subprocess.run([sys.executable, "-m", "localgpt", "quantize", str(args.model), "--bits", "4", "--type",
                                code, *flags, "-o", str(folder)], check=True, capture_output=True)
                base, _, _ = measure(folder, False)
                rounded, answer, backend = measure(folder, True)
                if "int8 activations" not in backend:
                    sys.exit(f"the int8-activation kernels did not run here: {backend}")
                print(f"| {layout} | {code} | {base:.2f} | {rounded:.2f} | {100 * (rounded / base - 1):+.1f}% "
                      f"| {answer.replace('|', '/')} |", flush=True)


if __name__ == "__main__":
    main()
