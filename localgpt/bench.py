"""`localgpt bench`: time to first token, prefill and decode speed, bandwidth and peak memory, optionally beside
transformers or llama.cpp on the same workload.

Each implementation runs in its own child process (`python -m localgpt.bench --child …`) so that its peak RSS is
its own and one cannot warm the other's caches; the child prints one JSON line. Greedy decoding of exactly
`new_tokens` tokens (end-of-sequence ignored) after a fixed prompt of `prompt_tokens` ids; best of `repeats`.
Decode speed counts the tokens after the first; GB/s is weight bytes x decode tok/s, since decoding one token
reads every weight once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from localgpt.errors import LocalGPTError, UsageError

IMPLEMENTATIONS = ("localgpt", "transformers", "llama.cpp")


@dataclass
class BenchResult:
    implementation: str
    dtype: str  # what the weights are stored in while decoding (float32, bfloat16, nf4, Q8_0 …)
    ttft_s: float  # prompt in → first token out
    prefill_tps: float
    decode_tps: float
    weight_bytes: int
    peak_rss_mb: float
    load_s: float
    threads: int
    compile_s: float = 0.0
    compute_dtype: str = ""  # what the products run in
    prefill_sd: float = 0.0  # standard deviations over the repeats, where the tool reports them (llama-bench)
    decode_sd: float = 0.0
    source: str = ""  # how the figures were taken, when not by localgpt's own harness

    @property
    def gb_per_s(self) -> float:
        return self.weight_bytes * self.decode_tps / 1e9


def prompt_ids(count: int, vocab_size: int) -> list[int]:
    # A fixed, ordinary token sequence (past the special ids at the start of most vocabularies); its content does
    # not change the cost of a forward pass.
    span = min(vocab_size, 4100) - 100
    return [(i * 37) % span + 100 for i in range(count)]


def best_of(runs: list[dict]) -> dict:
    """Best of each figure: the first run also pays for cold caches, and this machine is shared."""
    return {"ttft_s": min(r["ttft_s"] for r in runs), "decode_tps": max(r["decode_tps"] for r in runs)}


def timed_stream(tokens) -> dict:
    """Consume a token iterator; time to its first token and decode speed after it."""
    start = time.perf_counter()
    first = None
    count = 0
    for _ in tokens:
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_s": first - start, "decode_tps": (count - 1) / (end - first) if count > 1 else 0.0}


def run_localgpt(model: str, dtype: str, quantize: str | None, prompt_tokens: int, new_tokens: int, repeats: int,
                 compile_step: bool, int8_activations: bool = False) -> BenchResult:
    import torch

    from localgpt.generate import generate_tokens
    from localgpt.hub import resolve
    from localgpt.sampling import SamplingOptions
    from localgpt.weights import freeze_heap, load_model

    start = time.perf_counter()
    loaded = load_model(resolve(model), dtype=dtype, device="auto", quantize=quantize,
                        int8_activations=int8_activations)
    load_s = time.perf_counter() - start
    freeze_heap()  # as the CLI does after loading
    compile_s = 0.0
    if compile_step:
        from localgpt.compiled import compile_decode

        start = time.perf_counter()
        if compile_decode(loaded.model, notify=lambda message: None):  # skipped where native kernels run
            compile_s = time.perf_counter() - start
    prompt = prompt_ids(prompt_tokens, loaded.config.vocab_size)
    options = SamplingOptions(temperature=0)
    runs = [timed_stream(generate_tokens(loaded.model, prompt, options, new_tokens)) for _ in range(repeats)]
    best = best_of(runs)
    compute = str(loaded.model.dtype).removeprefix("torch.")
    quantization = getattr(loaded.model, "quantization", None)  # -q, or a quantized folder
    return BenchResult("localgpt", format_name(compute, quantization and quantization.label), best["ttft_s"],
                       prompt_tokens / best["ttft_s"], best["decode_tps"], loaded.model.weight_bytes(), 0.0, load_s,
                       torch.get_num_threads(), compile_s, compute,
                       source=f"backend {loaded.model.backend.describe()}")


def format_name(compute_dtype: str, quantization: str | None) -> str:
    """float32, bfloat16, or the quantized code with its compute dtype: int8/float32, nf4/bfloat16."""
    if not quantization:
        return compute_dtype
    code = "int8" if quantization == "8-bit" else quantization.split()[-1]
    return f"{code}/{compute_dtype}"


def run_transformers(model: str, dtype: str, quantize: str | None, prompt_tokens: int, new_tokens: int,
                     repeats: int) -> BenchResult:
    import torch

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UsageError("--compare transformers needs transformers: pip install 'localgpt-cli[bench]'") from None
    from localgpt.hub import resolve

    folder = resolve(model)
    torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
    spec = None
    kwargs = {}
    if quantize:
        from transformers import BitsAndBytesConfig

        from localgpt.quantize import parse_spec

        spec = parse_spec(quantize)  # bits and code only: transformers keeps its own skip list and threshold
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=spec.bits == 8, load_in_4bit=spec.bits == 4, bnb_4bit_quant_type=spec.quant_type,
            bnb_4bit_compute_dtype=torch_dtype)
    start = time.perf_counter()
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs).eval()
    load_s = time.perf_counter() - start
    ids = torch.tensor([prompt_ids(prompt_tokens, hf_model.config.vocab_size)])
    common = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)
    runs = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            hf_model.generate(ids, max_new_tokens=1, min_new_tokens=1, **common)
            ttft = time.perf_counter() - start
            start = time.perf_counter()
            hf_model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **common)
            total = time.perf_counter() - start
            # The full run minus its own prefill (measured by the one-token run) is the decode time.
            runs.append({"ttft_s": ttft, "decode_tps": (new_tokens - 1) / max(total - ttft, 1e-9)})
    best = best_of(runs)
    # as Transformer.weight_bytes counts: an embedding that is not also the head is read one row per token
    embedding = hf_model.get_input_embeddings().weight
    untied = getattr(hf_model.get_output_embeddings(), "weight", None) is not embedding
    weights = sum(p.numel() * p.element_size() for p in hf_model.parameters() if not (untied and p is embedding))
    compute = str(torch_dtype).removeprefix("torch.")
    label = format_name(compute, spec and spec.label)
    return BenchResult("transformers", label, best["ttft_s"], prompt_tokens / best["ttft_s"], best["decode_tps"],
                       weights, 0.0, load_s, torch.get_num_threads(), 0.0, compute)


def run_llama_cpp(gguf: str, prompt_tokens: int, new_tokens: int, repeats: int, threads: int) -> BenchResult:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UsageError("--compare llama.cpp needs llama-cpp-python: pip install llama-cpp-python") from None
    start = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=prompt_tokens + new_tokens + 8, n_threads=threads, n_batch=512,
                verbose=False)
    load_s = time.perf_counter() - start
    prompt = prompt_ids(prompt_tokens, llm.n_vocab())

    def tokens():
        llm.reset()
        count = 0
        # top_k=1 is greedy; generate() evaluates the prompt, then one token per step.
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            yield token
            count += 1
            if count == new_tokens:
                return

    runs = [timed_stream(tokens()) for _ in range(repeats)]
    best = best_of(runs)
    quant = Path(gguf).stem.rsplit(".", 1)[-1]
    return BenchResult("llama.cpp", quant, best["ttft_s"], prompt_tokens / best["ttft_s"], best["decode_tps"],
                       os.path.getsize(gguf), 0.0, load_s, threads,
                       source="llama-cpp-python's Python loop, slower than llama.cpp itself: pass --llama-bench PATH")


def run_llama_bench(binary: str, gguf: str, prompt_tokens: int, new_tokens: int, repeats: int,
                    threads: int) -> BenchResult:
    """llama.cpp's own `llama-bench` on the GGUF: its pp (prompt) row, and its tg (generation) row at depth
    prompt_tokens (`-d`), since ours decodes after the prompt too: mean ± sd over `repeats` runs. Its time to
    first token is the prompt's processing time (pp), the nearest figure it reports."""
    common = ["-m", gguf, "-r", str(repeats), "-t", str(threads), "-o", "json"]
    prompt = llama_bench_row(binary, [*common, "-p", str(prompt_tokens), "-n", "0"], prompt_tokens, 0)
    generation = llama_bench_row(binary, [*common, "-p", "0", "-n", str(new_tokens), "-d", str(prompt_tokens)],
                                 0, new_tokens)
    quant = str(generation.get("model_type", "")).split()[-1] if generation.get("model_type") else \
        Path(gguf).stem.rsplit(".", 1)[-1]
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KB on Linux: llama-bench's own
    return BenchResult("llama.cpp", quant, prompt_tokens / prompt["avg_ts"], prompt["avg_ts"], generation["avg_ts"],
                       os.path.getsize(gguf), child_peak, 0.0, int(generation.get("n_threads", threads)),
                       prefill_sd=prompt.get("stddev_ts", 0.0), decode_sd=generation.get("stddev_ts", 0.0),
                       source=f"llama-bench pp{prompt_tokens}/tg{new_tokens} @ d{prompt_tokens}, "
                              f"mean ± sd of {repeats}")


def llama_bench_row(binary: str, arguments: list[str], prompt_tokens: int, new_tokens: int) -> dict:
    """The one JSON row of a llama-bench run for these token counts."""
    try:
        process = subprocess.run([binary, *arguments], capture_output=True, text=True, timeout=3600)
    except OSError as exc:
        raise UsageError(f"cannot run llama-bench at {binary}: {exc.strerror or exc}") from None
    try:
        rows = json.loads(process.stdout)
        return next(r for r in rows if r["n_prompt"] == prompt_tokens and r["n_gen"] == new_tokens)
    except (ValueError, StopIteration, KeyError, TypeError):
        last = (process.stderr.strip().splitlines() or ["no JSON on stdout"])[-1]
        what = f"pp{prompt_tokens}" if prompt_tokens else f"tg{new_tokens}"
        raise LocalGPTError(f"llama-bench gave no {what} row ({last})") from None


def memory_bandwidth(size_mb: int = 512, repeats: int = 5) -> float:
    """GB/s of this machine's read bandwidth: the best time to read a buffer far larger than any cache on all
    intra-op threads, by torch's sum and, where they run, by the native product of one row (which streams faster
    than torch's sum here). A decode step cannot read its weights faster than this for long."""
    import torch

    from localgpt import native

    buffer = torch.ones(size_mb * 1024 * 1024 // 4)
    reads = [buffer.sum]
    if native.supports(buffer.view(-1, 1024)):
        row = torch.ones(1, 1024)
        reads.append(lambda: native.linear(row, buffer.view(-1, 1024)))
    best = float("inf")
    for _ in range(repeats):
        for read in reads:
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage: Linux carries ru_maxrss across fork and exec,
    so a child would report its parent's peak if that was higher (the parent's bandwidth buffer was)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def child_main(argv: list[str]) -> None:
    """`python -m localgpt.bench --child IMPL …`: one measurement, one JSON line on stdout."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=IMPLEMENTATIONS, required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--int8-activations", action="store_true")
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--llama-bench", default=None)
    args = parser.parse_args(argv)
    try:
        if args.child == "localgpt":
            result = run_localgpt(args.model, args.dtype, args.quantize, args.prompt_tokens, args.new_tokens,
                                  args.repeats, args.compile, args.int8_activations)
        elif args.child == "transformers":
            result = run_transformers(args.model, args.dtype, args.quantize, args.prompt_tokens, args.new_tokens,
                                      args.repeats)
        elif args.llama_bench:
            result = run_llama_bench(args.llama_bench, args.gguf, args.prompt_tokens, args.new_tokens, args.repeats,
                                     args.threads)
        else:
            result = run_llama_cpp(args.gguf, args.prompt_tokens, args.new_tokens, args.repeats, args.threads)
    except LocalGPTError as exc:
        print(json.dumps({"error": str(exc)}))
        return
    if not result.peak_rss_mb:  # llama-bench's is its own process's, measured above
        result.peak_rss_mb = peak_rss_mb()
    print(json.dumps(asdict(result)))


def measure(implementation: str, **options) -> BenchResult:
    """Run one implementation in a child process and return its figures (errors come back as LocalGPTError)."""
    command = [sys.executable, "-m", "localgpt.bench", "--child", implementation]
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        command += [flag] if value is True else [flag, str(value)]
    process = subprocess.run(command, capture_output=True, text=True)
    lines = process.stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        last = (process.stderr.strip().splitlines() or ["no output"])[-1]
        raise LocalGPTError(f"the {implementation} benchmark failed: {last}")
    record = json.loads(lines[-1])
    if "error" in record:
        raise LocalGPTError(record["error"])
    return BenchResult(**record)


def machine_description() -> str:
    import torch

    from localgpt import native

    cpu = native.cpuinfo_field("model name") or platform.processor() or platform.machine()

    kernels = f"on ({native.isa()})" if native.library() is not None else "off (torch's ops)"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
            f"Python {platform.python_version()}; localgpt native kernels {kernels}")


def format_table(results: list[BenchResult], bandwidth: float) -> str:
    header = (f"{'':<13} {'format':<9} {'TTFT ms':>8} {'prefill tok/s':>13} {'decode tok/s':>12} {'GB/s':>6} "
              f"{'of peak':>7} {'peak RSS MB':>11} {'load s':>6}")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.implementation:<13} {r.dtype:<9} {r.ttft_s * 1000:>8.0f} {r.prefill_tps:>13.0f} "
                     f"{r.decode_tps:>12.1f} {r.gb_per_s:>6.1f} {r.gb_per_s / bandwidth:>6.0%} "
                     f"{r.peak_rss_mb:>11.0f} {r.load_s:>6.2f}")
        if r.decode_sd or r.prefill_sd:
            lines.append(f"{'':<13} {'± sd':<9} {'':>8} {r.prefill_sd:>13.0f} {r.decode_sd:>12.1f}")
    ours = results[0]
    for other in results[1:]:
        # Ratios are ours / theirs: above 1 is better for speeds, below 1 is better for times and memory.
        lines.append(f"{'ratio':<13} {'vs ' + other.implementation:<9} {ours.ttft_s / other.ttft_s:>7.2f}x "
                     f"{ours.prefill_tps / other.prefill_tps:>12.2f}x {ours.decode_tps / other.decode_tps:>11.2f}x "
                     f"{'':>6} {'':>7} {ours.peak_rss_mb / other.peak_rss_mb:>10.2f}x")
    lines += [f"{r.implementation}: {r.source}" for r in results if r.source]
    return "\n".join(lines)


if __name__ == "__main__":
    child_main(sys.argv[1:])
