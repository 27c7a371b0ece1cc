"""Quantized SmolLM2 against float: size on disk, peak RSS while generating, perplexity, answers and decode speed,
with transformers' bitsandbytes models as the speed and memory reference, in one run.

    python benchmarks/bench_quantize.py [--model DIR] [--new-tokens 128] [--formats float32,bfloat16,8,nf4,fp4]

Each (implementation, format) runs in its own process, so its peak RSS is its own. Quantized folders are written
with `localgpt quantize` into a temporary folder first (CPU defaults: 8-bit computes in float32, 4-bit in
bfloat16). Perplexity is over tests/data/perplexity.txt (~2,100 tokens of plain English written for this).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from localgpt.bench import peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "perplexity.txt"
QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What gas do plants absorb from the air?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
]
FLOAT_FORMATS = ("float32", "bfloat16")


def perplexity(model, ids: list[int], chunk: int = 256) -> float:
    """exp(mean next-token NLL) over the whole text in one pass, fed in chunks through the KV cache."""
    import torch

    cache = model.make_cache(1, len(ids))
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, chunk):
            piece = ids[start : start + chunk]
            logits = model(torch.tensor([piece]), cache, start, last_only=False)[0].float()  # (T, vocab)
            targets = torch.tensor(ids[start + 1 : start + 1 + len(piece)])
            logits = logits[: len(targets)]
            nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
    return math.exp(nll / count)


def run_localgpt(folder: Path, fmt: str, new_tokens: int) -> dict:
    from localgpt.generate import generate_tokens
    from localgpt.sampling import SamplingOptions
    from localgpt.weights import load_model

    # float formats say their dtype (auto on CPU is float32); quantized folders carry their compute dtype
    loaded = load_model(folder, dtype=fmt if fmt in FLOAT_FORMATS else "auto", device="cpu")
    greedy = SamplingOptions(temperature=0)
    prompt = loaded.tokenizer.encode_chat([{"role": "user", "content": "Tell me a long story about a baker."}])
    start = first = None
    count = 0
    start = time.perf_counter()
    for _ in generate_tokens(loaded.model, prompt, greedy, new_tokens, eos_ids=set()):
        count += 1
        if first is None:
            first = time.perf_counter()
    decode_tps = (count - 1) / (time.perf_counter() - first)
    rss = peak_rss_mb()
    answers = []
    for question in QUESTIONS:
        ids = loaded.tokenizer.encode_chat([{"role": "user", "content": question}])
        tokens = list(generate_tokens(loaded.model, ids, greedy, 30, loaded.tokenizer.eos_token_ids))
        answers.append(loaded.tokenizer.decode(tokens).strip())
    text_ids = loaded.tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    return {"decode_tps": decode_tps, "ttft_s": first - start, "peak_rss_mb": rss,
            "perplexity": perplexity(loaded.model, text_ids), "tokens": len(text_ids), "answers": answers}


def run_transformers(folder: Path, fmt: str, new_tokens: int) -> dict:
    import logging

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from localgpt.quantize import DEFAULT_INT8_THRESHOLD, DEFAULT_SKIP

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # The same quantization as ours (our defaults, which transformers accepts as options): the same workload.
    kwargs = {"dtype": getattr(torch, fmt)} if fmt in FLOAT_FORMATS else {}
    if fmt == "8":
        kwargs = {"dtype": torch.float32, "quantization_config": BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=DEFAULT_INT8_THRESHOLD, llm_int8_skip_modules=list(DEFAULT_SKIP[8]))}
    elif fmt in ("nf4", "fp4"):
        kwargs = {"dtype": torch.bfloat16, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=fmt, bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=list(DEFAULT_SKIP[4]))}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    ids = torch.tensor([[(i * 37) % 4000 + 100 for i in range(32)]])
    options = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **options)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
        total = time.perf_counter() - start
    return {"decode_tps": (new_tokens - 1) / (total - ttft), "ttft_s": ttft,
            "peak_rss_mb": peak_rss_mb()}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def write_bfloat16(source: Path, target: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(source / "model.safetensors").items()}
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (target / "config.json").write_text(json.dumps(config, indent=2))


def prepare(model: Path, fmt: str, scratch: Path) -> Path:
    if fmt == "float32":
        return model
    target = scratch / fmt
    if fmt == "bfloat16":
        write_bfloat16(model, target)
        return target
    args = ["--bits", "8"] if fmt == "8" else ["--bits", "4", "--type", fmt]
    subprocess.run([sys.executable, "-m", "localgpt", "quantize", str(model), *args, "-o", str(target)], check=True,
                   capture_output=True)
    return target


def measure(implementation: str, folder: Path, fmt: str, new_tokens: int) -> dict:
    command = [sys.executable, __file__, "--child", implementation, "--child-format", fmt, "--model", str(folder),
               "--new-tokens", str(new_tokens)]
    output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--formats", default="float32,bfloat16,8,nf4,fp4")
    parser.add_argument("--child", choices=["localgpt", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--child-format", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder = Path(args.model)
        result = (run_localgpt(folder, args.child_format, args.new_tokens) if args.child == "localgpt"
                  else run_transformers(folder, args.child_format, args.new_tokens))
        print(json.dumps(result))
        return
    if args.model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        import smollm2

        args.model = smollm2.hf_folder()
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for fmt in args.formats.split(","):
            folder = prepare(args.model, fmt, Path(scratch))
            ours = measure("localgpt", folder, fmt, args.new_tokens)
            theirs = measure("transformers", args.model, fmt, args.new_tokens)
            rows[fmt] = {"size_mb": folder_size(folder) / 1e6, "ours": ours, "transformers": theirs}
            print(f"{fmt}: done", file=sys.stderr, flush=True)
    base = rows.get("bfloat16", {}).get("ours", {}).get("perplexity")
    print(f"SmolLM2-135M-Instruct, {args.new_tokens} new tokens greedy, CPU\n")
    print("| format | size on disk | peak RSS ours / transformers | decode tok/s ours / transformers (ratio) "
          "| perplexity (vs bf16) |")
    print("| --- | --- | --- | --- | --- |")
    for fmt, row in rows.items():
        ours, theirs = row["ours"], row["transformers"]
        ppl = ours["perplexity"]
        delta = f" ({(ppl / base - 1) * 100:+.1f}%)" if base else ""
        label = {"8": "8-bit", "nf4": "4-bit nf4", "fp4": "4-bit fp4"}.get(fmt, fmt)
        ratio = ours["decode_tps"] / theirs["decode_tps"]
        print(f"| {label} | {row['size_mb']:.0f} MB | {ours['peak_rss_mb']:.0f} / {theirs['peak_rss_mb']:.0f} MB "
              f"| {ours['decode_tps']:.1f} / {theirs['decode_tps']:.1f} ({ratio:.2f}x) | {ppl:.3f}{delta} |")
    print(f"\nPerplexity text: {TEXT.relative_to(ROOT)}, {next(iter(rows.values()))['ours']['tokens']} tokens.\n")
    print("| question | " + " | ".join(rows) + " |")
    print("| --- |" + " --- |" * len(rows))
    for i, question in enumerate(QUESTIONS):
        answers = [rows[fmt]["ours"]["answers"][i].replace("\n", " ").replace("|", "/") for fmt in rows]
        print(f"| {question} | " + " | ".join(answers) + " |")


if __name__ == "__main__":
    main()
