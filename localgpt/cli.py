"""The command line: parses flags into plain option objects, calls the library, maps errors to exit codes.

No model logic lives here, and torch is imported only inside commands so `localgpt --help` stays instant.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys

import typer

from localgpt import interrupts
from localgpt.errors import Interrupted, LocalGPTError, ModelError, ReaderGone, UsageError
from localgpt.logs import Log, logging_disabled, new_conversation_id
from localgpt.prompt import build_prompt, encode_prompt
from localgpt.settings import (
    DTYPES,
    SETTINGS,
    GenerationSettings,
    Setting,
    SettingError,
    check_quantize_choice,
    resolve,
)

# Typer 0.29 prints a type after every option, `<bool>` after on/off flags (`--raw <bool>`), as if they took a
# value: flags show none.
if hasattr(typer.core.TyperOption, "display_type_rich"):
    _display_type = typer.core.TyperOption.display_type_rich
    typer.core.TyperOption.display_type_rich = lambda self, ctx: "" if self.is_flag else _display_type(self, ctx)

app = typer.Typer(
    name="localgpt",
    help="Run open-weight language models on your own machine.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs rewrap; [quant] in a pip extra is text, not a style tag
    context_settings={"help_option_names": ["-h", "--help"]},
)

MODEL_OPTION = typer.Option(
    None, "--model", "-m", help="Folder, hub repo id or name from 'localgpt list'. Default: SmolLM2-135M-Instruct.",
    envvar="LOCALGPT_MODEL",
)
COMPILE_OPTION = typer.Option(
    False, "--compile",
    help="torch.compile the decode step, after up to a minute of compiling: ~10-25% faster float32 decoding where "
         "localgpt's native kernels cannot run (neither AVX-512 nor AVX2, or no C compiler). Skipped, with a "
         "notice, where they run: they are faster.",
)
NO_LOG_OPTION = typer.Option(False, "--no-log", help="Do not log this to LOCALGPT_HOME/logs.db (LOCALGPT_NO_LOG=1).")
QUANTIZE_OPTION = typer.Option(
    None, "--quantize", "-q", help="Quantize while loading: 8 | 4 (nf4) | nf4 | fp4 (needs localgpt-cli[quant]).",
)
INT8_ACTIVATIONS_OPTION = typer.Option(
    False, "--int8-activations",
    help="4-bit models: decode with each layer's input rounded to int8 per 64 values and integer products, as "
         "llama.cpp's Q4_0 does. Faster, most of all on AVX2 (docs/benchmarks.md); no longer bitsandbytes' float "
         "numerics (perplexity: docs/quantization.md).",
)


def read_stdin_text() -> str | None:
    """stdin's text when it is not a terminal (None when it is). Bad UTF-8 is replaced, NUL bytes dropped."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    data = sys.stdin.buffer.read()
    return data.decode("utf-8", errors="replace").replace("\x00", "")


def check_load_flags(dtype: str, quantize: str | None) -> None:
    """Refuse a bad --dtype or --quantize before spending seconds on loading a model (or importing torch)."""
    if quantize is not None:
        check_quantize_choice(quantize)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")


def setting_parameter(declared: Setting) -> inspect.Parameter:
    """A generation setting as a Typer option: --top-p, with its help, from the one schema (settings.py)."""
    names = [declared.flag] + ([declared.short] if declared.short else [])
    default_text = "the model's, else " if declared.model_key else ""
    default = declared.text(declared.default) if declared.kind != "texts" else None
    help_text = declared.help + (f" Default: {default_text}{default}." if default is not None else "")
    if declared.kind == "bool":
        default_value, annotation = False, bool
    elif declared.kind == "texts":
        default_value, annotation = [], list[str]
    else:  # None: not given, so the model's generation_config.json or the declared default applies
        default_value, annotation = None, {"float": float, "int": int, "optional-int": int}.get(declared.kind, str)
        annotation = annotation | None
    option = typer.Option(default_value, *names, help=help_text, metavar=declared.metavar,
                          rich_help_panel="Generation settings")
    return inspect.Parameter(declared.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def generation_flags(chat: bool = False):
    """Give a command one flag per generation setting; it receives `given`, the settings the user typed, already
    checked (before any model is loaded)."""

    def decorate(function):
        declared = [s for s in SETTINGS.values() if s.chat or not chat]
        signature = inspect.signature(function)
        own = [p for p in signature.parameters.values() if p.name != "given"]

        @functools.wraps(function)
        def wrapper(**kwargs):
            given = {}
            for setting in declared:
                value = kwargs.pop(setting.name)
                if value is not None and value is not False and value != []:
                    given[setting.name] = value
            try:
                GenerationSettings.of(**given)
            except SettingError as error:
                raise error.for_flags() from None
            return function(**kwargs, given=given)

        parameters = own + [setting_parameter(s) for s in declared]
        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {**{k: v for k, v in function.__annotations__.items() if k != "given"},
                                   **{p.name: p.annotation for p in parameters[len(own):]}}
        return wrapper

    return decorate


def request_settings(given: dict, loaded) -> GenerationSettings:
    """The flags, over the model's generation_config.json, over the declared defaults."""
    try:
        return resolve(given, loaded.generation_defaults)
    except SettingError as error:
        raise error.for_flags() from None


def write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def print_version(value: bool) -> None:
    if value:
        from localgpt import __version__

        print(f"localgpt {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=print_version,
                                 help="Print localgpt's version and exit."),
):
    """Run open-weight language models on your own machine."""


def command(function=None, *, name: str | None = None):
    """Register a command; Ctrl-C inside it becomes our own interrupt error (exit 130) instead of Typer's."""

    def register(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except KeyboardInterrupt:
                raise Interrupted("interrupted") from None
            except BrokenPipeError:  # ours to answer: Typer would turn it into a silent exit 1
                raise ReaderGone("stdout closed") from None

        return app.command(name=name)(wrapper)

    return register(function) if function is not None else register


@command
@generation_flags()
def generate(
    prompt: str | None = typer.Argument(None, help="The prompt. Text piped on stdin comes first."),
    model: str = MODEL_OPTION,
    system: str | None = typer.Option(None, "--system", "-s", help="System prompt (chat models)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as-is, without the chat template."),
    truncate: bool = typer.Option(False, "--truncate", help="Keep the end of a prompt longer than the context."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    stats: bool = typer.Option(False, "--stats", help="Print token counts and speed to stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    quantize: str | None = QUANTIZE_OPTION,
    int8_activations: bool = INT8_ACTIVATIONS_OPTION,
    compile_step: bool = COMPILE_OPTION,
    no_log: bool = NO_LOG_OPTION,
    given: dict | None = None,
):
    """Generate an answer to a prompt, streamed to stdout."""
    check_load_flags(dtype, quantize)
    text = build_prompt(prompt, read_stdin_text())

    loaded = load_for_generation(model, dtype, device, quantize, compile_step, int8_activations)
    from localgpt.generate import stream_generate

    settings = request_settings(given, loaded)
    interrupts.marker("tokenizing")
    with interrupts.deferred():  # the tokenizer is a native extension
        prompt_ids = encode_prompt(loaded.tokenizer, text, loaded.config.context_length, system, raw, truncate,
                                   notify=say)
    interrupts.marker("generating")
    options, beams = settings.sampling, settings.beams()

    def log_reply(reply: str, final=None) -> None:
        if not (no_log or logging_disabled()):
            Log().record(new_conversation_id(), model_name(loaded.path), system, text, reply, settings.flat(), final)

    if beams is not None and beams.num_return_sequences > 1:
        log_reply(print_beams(loaded, prompt_ids, options, beams, settings.max_tokens, settings.stop, as_json))
        return

    if beams is None:
        responses = stream_generate(loaded.model, loaded.tokenizer, prompt_ids, options, settings.max_tokens,
                                    settings.stop)
    else:
        from localgpt.beam import stream_beam_search

        responses = stream_beam_search(loaded.model, loaded.tokenizer, prompt_ids, options, beams,
                                       settings.max_tokens, settings.stop)
    pieces: list[str] = []
    final = None
    try:
        for response in responses:
            if final is None:
                interrupts.marker("decoding")
            pieces.append(response.text)
            if response.text and not as_json:
                write_out(response.text)
            final = response
    finally:  # a reply stopped by Ctrl-C or a closed pipe is logged as far as it got
        if final is not None:
            log_reply("".join(pieces), final)
    if as_json:
        write_out(json.dumps(response_json("".join(pieces), final), ensure_ascii=False) + "\n")
    else:
        write_out("\n")
    if stats:
        print(stats_line(final), file=sys.stderr)
        print(f"backend: {loaded.model.backend.describe()}", file=sys.stderr)


def load_for_generation(model: str | None, dtype: str, device: str, quantize: str | None, compile_step: bool,
                        int8_activations: bool = False):
    interrupts.marker("importing")
    from localgpt.weights import load_reference  # torch: a Ctrl-C waits for the import (localgpt/interrupts.py)

    return load_reference(model, dtype, device, quantize, compile_step, int8_activations)


def print_beams(loaded, prompt_ids: list[int], options, beams, max_tokens: int, stop, as_json: bool) -> str:
    """--num-return-sequences > 1: nothing streams; every sequence at the end, best first, each cut at its first
    stop string. Returns the best."""
    from localgpt.beam import beam_search
    from localgpt.generate import find_stop

    tokenizer = loaded.tokenizer
    hypotheses = beam_search(loaded.model, prompt_ids, options, beams, max_tokens, tokenizer.eos_token_ids)
    texts = [tokenizer.decode([t for t in h.tokens if t not in tokenizer.eos_token_ids]) for h in hypotheses]
    texts = [text[:index] if (index := find_stop(text, stop)[0]) >= 0 else text for text in texts]
    if as_json:
        sequences = [{"text": text, "tokens": len(h.tokens), "score": round(h.score, 6)}
                     for text, h in zip(texts, hypotheses, strict=True)]
        write_out(json.dumps({"sequences": sequences, "prompt_tokens": len(prompt_ids)}, ensure_ascii=False) + "\n")
    else:
        write_out("\n\n".join(texts) + "\n")
    return texts[0]


def response_json(text: str, final) -> dict:
    return {
        "text": text,
        "finish_reason": final.finish_reason,
        "prompt_tokens": final.prompt_tokens,
        "tokens": final.generation_tokens,
        "timings": {
            "time_to_first_token_s": round(final.time_to_first_token, 4),
            "prompt_tokens_per_s": round(final.prompt_tps, 2),
            "generation_tokens_per_s": round(final.generation_tps, 2),
        },
    }


def stats_line(final) -> str:
    return (
        f"prompt: {final.prompt_tokens} tokens, {final.prompt_tps:.1f} tok/s · "
        f"answer: {final.generation_tokens} tokens, {final.generation_tps:.1f} tok/s · "
        f"first token: {final.time_to_first_token * 1000:.0f} ms · finish: {final.finish_reason}"
    )


def say(message: str) -> None:
    """A one-line notice on stderr, in localgpt's voice."""
    print(f"localgpt: {message}", file=sys.stderr)


def report_error(message: str, code: int) -> int:
    print(f"Error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> None:
    """Entry point: one `Error: …` line and an exit code for every failure; tracebacks only with LOCALGPT_DEBUG=1."""
    debug = os.environ.get("LOCALGPT_DEBUG") == "1"
    args = sys.argv[1:] if argv is None else argv
    try:
        code = app(args=args or ["--help"], prog_name="localgpt", standalone_mode=False)
        code = code if isinstance(code, int) else 0
        if code == 130:  # Typer's own answer to a Ctrl-C while it parses, returned silently: say it as elsewhere
            sys.stderr.write("\n")
            report_error("interrupted", 130)
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a command's own handler (while parsing, say)
        sys.stderr.write("\n")
        code = report_error("interrupted", 130)
    except typer.TyperException as exc:  # Typer's (vendored click's) usage errors: bad flags, missing values
        if debug:
            raise
        message = exc.format_message().replace("\n", " ") if hasattr(exc, "format_message") else str(exc)
        code = report_error(message, getattr(exc, "exit_code", 2))
    except (BrokenPipeError, ReaderGone):
        # The reader went away (`| head`): stop quietly, and keep Python from complaining while it exits.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 141
    except LocalGPTError as exc:
        if debug:
            raise
        if isinstance(exc, Interrupted):
            sys.stderr.write("\n")
        code = report_error(str(exc), exc.exit_code)
    except MemoryError:
        code = report_error("out of memory — try a smaller model, --dtype bfloat16, or a shorter prompt", 1)
    except Exception as exc:  # a bug of ours: still one line, with the way to see more
        if debug:
            raise
        code = report_error(f"unexpected {type(exc).__name__}: {exc} — this is a bug in localgpt; "
                            "LOCALGPT_DEBUG=1 shows the traceback", 1)
    sys.exit(code)


@command
def serve(
    model: str = MODEL_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless told otherwise)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port, printed on stderr)."),
    parallel: int = typer.Option(4, "--parallel", help="Sequences decoded together as one batch."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="LOCALGPT_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' on every request."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    quantize: str | None = QUANTIZE_OPTION,
    int8_activations: bool = INT8_ACTIVATIONS_OPTION,
):
    """Serve the model over the OpenAI API (chat and completions, streaming) until Ctrl-C. Needs
    localgpt-cli[serve]."""
    check_load_flags(dtype, quantize)
    if not 1 <= parallel <= 64:
        raise UsageError(f"--parallel must be between 1 and 64, not {parallel}")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, not {port}")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("serve needs FastAPI and uvicorn: pip install 'localgpt-cli[serve]'") from None
    from localgpt.serve import listen
    from localgpt.serve import serve as run_server

    listener = listen(host, port)
    loaded = load_for_generation(model, dtype, device, quantize, False, int8_activations)
    run_server(loaded, model_name(loaded.path), listener, parallel, api_key)


@command
def download(
    repo_id: str = typer.Argument(..., metavar="ORG/NAME", help="Hub repo id, ORG/NAME."),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit."),
    dtype: str = typer.Option("auto", "--dtype", help="The dtype the memory estimate assumes: auto (float32) | "
                                                      "bfloat16 | float16 | float32"),
    force: bool = typer.Option(False, "--force", help="Download even when the model will not fit in memory."),
):
    """Download a model from the Hugging Face hub (safetensors only) into the HF cache. Says first how much it
    fetches and the memory it will need, and refuses when that is more than this machine has (--force)."""
    from localgpt.hub import download as download_repo

    check_load_flags(dtype, None)
    folder = download_repo(repo_id, revision, dtype=dtype, force=force)
    print(folder)


@command
def convert(
    gguf_file: str = typer.Argument(..., metavar="FILE.gguf", help="A .gguf file (llama or qwen2 architecture)."),
    output: str | None = typer.Option(
        None, "--output", "-o", help="Folder to write. Default: LOCALGPT_HOME/models/NAME."
    ),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 | float32"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
):
    """Convert a GGUF file into a Hugging Face style model folder that localgpt (and transformers) can load."""
    from pathlib import Path

    from localgpt.atomic import refuse_existing
    from localgpt.gguf import check_gguf_counts, gguf_stem
    from localgpt.gguf import convert as convert_gguf
    from localgpt.paths import writable_models_dir

    if dtype not in ("bfloat16", "float32"):
        raise UsageError(f"--dtype must be bfloat16 or float32, not {dtype!r}")
    source = Path(gguf_file).expanduser()
    if not source.is_file():
        raise ModelError(f"no GGUF file at {source} — check the path")
    check_gguf_counts(source)  # refused before saying "converting"
    target = Path(output).expanduser() if output else writable_models_dir() / gguf_stem(source.name)
    refuse_existing(target, force)
    say(f"converting {source} → {target}")
    convert_gguf(source, target, dtype=dtype, force=force)
    print(target)


@command
def quantize(
    model: str = typer.Argument(..., help="Folder, hub repo id or name from 'localgpt list' (a float model)."),
    bits: int = typer.Option(4, "--bits", help="8 or 4."),
    quant_type: str = typer.Option("nf4", "--type", help="4-bit code: nf4 | fp4."),
    compute_dtype: str = typer.Option(
        "auto", "--compute-dtype", help="auto | bfloat16 | float32. auto on CPU: float32 for 8-bit, bfloat16 for 4-bit."
    ),
    skip: str | None = typer.Option(
        None, "--skip", help="Comma-separated module names kept unquantized. Default: none for 8-bit; "
        "lm_head,q_proj,k_proj,v_proj,qkv_proj for 4-bit (half the quality loss for ~20% more size).",
    ),
    quantize_head: bool = typer.Option(
        False, "--quantize-head", help="Quantize the output head too, whatever --skip says (for a tied head, a "
        "quantized copy of the embedding, which stays as it is). 8-bit does by default.",
    ),
    int8_threshold: float | None = typer.Option(
        None, "--int8-threshold",
        help="8-bit: input columns above this run in float16. Default 1.5 (transformers' default: 6.0).",
    ),
    output: str | None = typer.Option(
        None, "--output", "-o", help="Folder to write. Default: LOCALGPT_HOME/models/NAME-q4 (-q8, -q4-fp4)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N (where to quantize)."),
):
    """Write an 8-bit or 4-bit copy of a model through bitsandbytes (needs localgpt-cli[quant]).

    On CPU localgpt's own kernels decode these folders as bitsandbytes stores them, reading 1 or 1/2 byte per
    weight, so they decode faster than float32 (docs/benchmarks.md); on CUDA bitsandbytes runs them. The folder
    loads in localgpt and in transformers.
    """
    from pathlib import Path

    from localgpt.atomic import refuse_existing
    from localgpt.hub import human_size, resolve
    from localgpt.inventory import folder_size
    from localgpt.paths import writable_models_dir
    from localgpt.quantize import DEFAULT_INT8_THRESHOLD, load_bitsandbytes, parse_spec, write_quantized
    from localgpt.weights import choose_device, load_model

    if bits not in (4, 8):
        raise UsageError(f"--bits must be 8 or 4, not {bits}")
    if quant_type not in ("nf4", "fp4"):
        raise UsageError(f"--type must be nf4 or fp4, not {quant_type!r}")
    flag = "8" if bits == 8 else quant_type
    int8_threshold = DEFAULT_INT8_THRESHOLD if int8_threshold is None else int8_threshold
    spec = parse_spec(flag, compute_dtype, skip, threshold=int8_threshold, quantize_head=quantize_head)
    load_bitsandbytes(choose_device(device))  # a missing bitsandbytes is said before any work starts
    source = resolve(model)
    target = Path(output).expanduser() if output else writable_models_dir() / f"{model_name(source)}-{spec.suffix}"
    refuse_existing(target, force)
    say(f"quantizing {source} → {target}")
    interrupts.marker("loading")
    loaded = load_model(source, dtype=compute_dtype, device=device, quantize=flag, skip=",".join(spec.skip),
                        int8_threshold=int8_threshold, backend=None)
    interrupts.marker("writing")
    write_quantized(loaded.model, source, target, force=force)
    say(f"{loaded.model.quantization.label}, {human_size(folder_size(source))} → "
        f"{human_size(folder_size(target))}")
    print(target)


def model_name(folder) -> str:
    """A model's short name: the repo name for a Hugging Face cache snapshot (models--org--name/snapshots/sha),
    else the folder's own name."""
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].split("--")[-1]
    return folder.name


@command
def bench(
    model: str = MODEL_OPTION,
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="Prompt length."),
    new_tokens: int = typer.Option(128, "--new-tokens", help="Tokens to decode (end-of-sequence ignored)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    quantize: str | None = QUANTIZE_OPTION,
    int8_activations: bool = INT8_ACTIVATIONS_OPTION,
    repeats: int = typer.Option(3, "--repeats", help="Runs per implementation; the best figures are kept."),
    compare: list[str] = typer.Option(
        [], "--compare", metavar="<name>",
        help="Also run transformers (localgpt-cli[bench]) or llama.cpp (llama-cpp-python, needs --gguf).",
    ),
    gguf: str | None = typer.Option(None, "--gguf", help="The GGUF file llama.cpp runs (the same model)."),
    llama_bench: str | None = typer.Option(
        None, "--llama-bench", help="llama.cpp's own llama-bench binary, for --compare llama.cpp (else the slower "
        "llama-cpp-python loop)."),
    compile_step: bool = COMPILE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="JSON for scripts."),
):
    """Measure time to first token, prefill and decode speed, memory bandwidth used and peak memory.

    Each implementation runs in its own process on the same prompt and token counts (greedy); ratios are
    localgpt / the other.
    """
    from pathlib import Path

    from localgpt.bench import format_table, machine_description, measure, memory_bandwidth
    from localgpt.hub import resolve

    check_load_flags(dtype, quantize)
    if prompt_tokens < 1 or new_tokens < 2 or repeats < 1:
        raise UsageError("--prompt-tokens must be >= 1, --new-tokens >= 2 and --repeats >= 1")
    unknown = [name for name in compare if name not in ("transformers", "llama.cpp")]
    if unknown:
        raise UsageError(f"--compare takes transformers or llama.cpp, not {unknown[0]!r}")
    if "llama.cpp" in compare and not (gguf and Path(gguf).expanduser().is_file()):
        raise UsageError("--compare llama.cpp needs --gguf FILE, a GGUF of the same model")
    import importlib.util

    if llama_bench is not None:
        import shutil

        found = shutil.which(str(Path(llama_bench).expanduser()))
        if found is None:
            raise UsageError(f"--llama-bench {llama_bench} is not an executable file")
        llama_bench = found
    needs = {"transformers": ("transformers", "pip install 'localgpt-cli[bench]'"),
             "llama.cpp": ("llama_cpp", "pip install llama-cpp-python, or pass --llama-bench PATH")}
    for name in compare:
        if name == "llama.cpp" and llama_bench:
            continue
        module, install = needs[name]
        if importlib.util.find_spec(module) is None:  # said before minutes of measuring, not after
            raise LocalGPTError(f"--compare {name} needs {module}: {install}")
    folder = resolve(model)
    workload = dict(prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats)
    bandwidth = memory_bandwidth()
    say(f"benchmarking {folder.name}, {prompt_tokens} prompt tokens, {new_tokens} new, best of {repeats}")
    if compile_step:
        say("compiling the decode step first, unless the native kernels run here (about a minute on a "
            "cold cache)")
    results = [measure("localgpt", model=folder, dtype=dtype, quantize=quantize, compile=compile_step,
                       int8_activations=int8_activations, **workload)]
    if compile_step and not results[0].compile_s:
        say("--compile skipped: the native kernels decode faster than a compiled step here")
    for name in compare:
        say(f"running {name}")
        if name == "transformers":
            results.append(measure(name, model=folder, dtype=results[0].compute_dtype, quantize=quantize, **workload))
        else:
            results.append(measure(name, gguf=Path(gguf).expanduser(), threads=results[0].threads,
                                   llama_bench=llama_bench, **workload))
    if as_json:
        from dataclasses import asdict

        report = {"machine": machine_description(), "memory_bandwidth_gb_s": bandwidth, "model": str(folder),
                  **workload, "results": [{**asdict(r), "gb_per_s": r.gb_per_s} for r in results]}
        write_out(json.dumps(report, indent=2) + "\n")
        return
    print(f"machine: {machine_description()}")
    print(f"memory bandwidth (best read of 512 MB): {bandwidth:.1f} GB/s")
    print(f"model: {folder}; prompt {prompt_tokens} tokens, {new_tokens} new tokens, greedy, best of {repeats}")
    if results[0].compile_s:
        print(f"torch.compile of the decode step: {results[0].compile_s:.1f} s (not in the figures below)")
    print()
    print(format_table(results, bandwidth))


@command(name="list")
def list_models(as_json: bool = typer.Option(False, "--json", help="JSON for scripts.")):
    """List the models on this machine."""
    from localgpt.hub import human_size
    from localgpt.inventory import list_models as inventory

    entries = inventory()
    if as_json:
        write_out(json.dumps([e.to_json() for e in entries], indent=2) + "\n")
        return
    if not entries:
        print("No models yet. 'localgpt generate \"hi\"' fetches the default; "
              "'localgpt download ORG/NAME' gets others.")
        return
    # Plain aligned columns, one model a line, as `ollama list` prints them: nothing is cut at any width (a name
    # is what -m takes), and a pipe gets the same text with no escape codes.
    rows = [("NAME", "ARCH", "PARAMS", "DTYPE", "SIZE", "WHERE")] + [
        (e.name, e.architecture, f"{e.parameters / 1e6:.0f}M", e.quantization or e.dtype, human_size(e.size_bytes),
         e.path) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])


@command
def show(model: str | None = typer.Argument(
        None, metavar="[MODEL]", envvar="LOCALGPT_MODEL",
        help="Folder, hub repo id or name from 'localgpt list'. Default: the default model.")):
    """Describe a model: architecture, size, context, dtype, quantization, files."""
    from localgpt.hub import DEFAULT_LOCAL_NAME, DEFAULT_REPO, human_size, resolve
    from localgpt.inventory import describe

    if model is None:
        try:
            folder = resolve(None, download_missing=False)
        except LocalGPTError:  # said in the words of this command: nothing is fetched by show
            raise LocalGPTError(f"the default model ({DEFAULT_REPO}) is not on this machine yet — "
                                "'localgpt generate \"hi\"' fetches it") from None
        model = DEFAULT_LOCAL_NAME if folder.name == DEFAULT_LOCAL_NAME else str(folder)
    else:
        folder = resolve(model, download_missing=False)
    entry = describe(folder, model)
    d = entry.details
    from localgpt.config import read_json
    from localgpt.families import family_for
    from localgpt.fit import describe as describe_memory
    from localgpt.hub import memory_needed

    raw = read_json(folder / "config.json", "model config")
    try:
        family_for(str(raw.get("model_type")), f"{folder}/config.json")
        runs = "yes"
    except LocalGPTError as error:
        runs = f"no — {str(error).split(': ', 1)[-1]}"
    weight_bytes = sum(size for name, size in d["files"].items() if name.endswith(".safetensors"))
    memory = describe_memory(memory_needed(folder / "config.json", weight_bytes)) if runs == "yes" else "—"
    lines = [
        ("model", entry.name), ("path", entry.path), ("architecture", entry.architecture),
        ("parameters", f"{entry.parameters:,}"), ("layers", d["layers"]),
        ("heads / kv heads", f"{d['heads']} / {d['kv_heads']}"), ("hidden size", d["hidden_size"]),
        ("context length", d["context_length"]), ("vocabulary", d["vocab_size"]), ("dtype", entry.dtype),
        ("quantization", entry.quantization or "none"), ("chat template", "yes" if d["chat_template"] else "no"),
        ("size on disk", human_size(entry.size_bytes)), ("runs here", runs), ("memory", memory),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    print("files")
    for name, size in d["files"].items():
        print(f"  {name:<40} {human_size(size):>10}")


@command
def rm(
    model: str = typer.Argument(..., help="A name from 'localgpt list'."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
):
    """Delete a model from localgpt's or the Hugging Face cache."""
    from localgpt.hub import human_size
    from localgpt.inventory import find, remove

    entry, folder = find(model)
    if not yes:
        if not sys.stdin or not sys.stdin.isatty():
            raise UsageError(f"not deleting {folder} without confirmation — pass --yes")
        if not typer.confirm(f"Delete {entry.name} ({human_size(entry.size_bytes)}) at {folder}?"):
            print("Nothing deleted.")
            return
    remove(model)
    print(f"Deleted {entry.name} ({human_size(entry.size_bytes)}).")


@command
def logs(
    conversation_id: str | None = typer.Argument(None, metavar="[ID]", help="A conversation to show in full."),
    count: int = typer.Option(20, "--count", "-n", help="How many conversations to list, latest first."),
    as_json: bool = typer.Option(False, "--json", help="JSON for scripts."),
):
    """List the logged conversations, or show one (prompts, replies, model, settings, timings)."""
    from localgpt.logs import default_path

    if count < 1:
        raise UsageError(f"--count must be >= 1, not {count}")
    log = Log()
    if conversation_id is not None:
        conversation = log.conversation(conversation_id)
        if as_json:
            write_out(json.dumps(conversation, ensure_ascii=False, indent=2) + "\n")
            return
        print(f"conversation {conversation['id']} · {conversation['model']} · {conversation['created']}")
        if conversation["system"]:
            print(f"system: {conversation['system']}")
        for reply in conversation["responses"]:
            timing = (f" · {reply['generation_tokens']} tokens, {reply['generation_tokens_per_s']} tok/s"
                      if reply["generation_tokens"] is not None else "")
            print(f"\n> {reply['prompt']}\n{reply['response']}\n[{reply['datetime']}{timing}]")
        return
    conversations = log.conversations(count)
    if as_json:
        write_out(json.dumps(conversations, ensure_ascii=False, indent=2) + "\n")
        return
    if not conversations:
        print(f"No conversations logged yet ({default_path()}).")
        return
    for c in conversations:
        first = " ".join(c["first_prompt"].split())
        print(f"{c['id']}  {c['created'][:16].replace('T', ' ')}  {c['model']}  {c['turns']} "
              f"{'reply' if c['turns'] == 1 else 'replies'}  {first[:60] + ('…' if len(first) > 60 else '')}")


@command
@generation_flags(chat=True)
def chat(
    model: str = MODEL_OPTION,
    system: str | None = typer.Option(None, "--system", "-s", help="System prompt."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    no_history: bool = typer.Option(False, "--no-history", help="Do not read or write LOCALGPT_HOME/history."),
    quantize: str | None = QUANTIZE_OPTION,
    int8_activations: bool = INT8_ACTIVATIONS_OPTION,
    compile_step: bool = COMPILE_OPTION,
    resume_latest: bool = typer.Option(False, "--continue", "-c", help="Continue the latest logged conversation."),
    conversation_id: str | None = typer.Option(None, "--cid", help="Continue the logged conversation with this id."),
    no_log: bool = NO_LOG_OPTION,
    given: dict | None = None,
):
    """Chat with a model. With stdin not a terminal: one message per line, each reply followed by a blank line."""
    check_load_flags(dtype, quantize)
    if resume_latest and conversation_id:
        raise UsageError("--continue and --cid both name a conversation — give one")
    from localgpt.chat import ChatSession, run_piped
    from localgpt.logs import messages_of
    from localgpt.paths import home

    history = Log()
    log = None if no_log or logging_disabled() else history
    earlier = None
    if resume_latest or conversation_id:  # looked up before seconds of loading
        conversation_id = conversation_id or history.latest_conversation_id()
        if conversation_id is None:
            raise LocalGPTError("no logged conversation to continue yet — 'localgpt chat' starts one")
        earlier = history.conversation(conversation_id)

    loaded = load_for_generation(model, dtype, device, quantize, compile_step, int8_activations)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    session = ChatSession(loaded, request_settings(given, loaded), system, notify=say)
    if earlier is not None:
        session.system = system if system is not None else earlier["system"]
        session.resume(messages_of(earlier), earlier["id"])
        replies = len(earlier['responses'])
        say(f"continuing conversation {earlier['id']} ({replies} {'reply' if replies == 1 else 'replies'})")
    if log is not None:
        name = model_name(loaded.path)
        session.on_reply = lambda chat, prompt, reply, final: log.record(
            chat.conversation_id, name, chat.system, prompt, reply, chat.settings.flat(), final)
    if not interactive:
        session.verbose = False
        run_piped(session, sys.stdin, sys.stdout)
        return
    from rich.console import Console

    from localgpt.repl import Repl

    Repl(session, Console(), history_path=None if no_history else home() / "history").run()
