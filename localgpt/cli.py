"""The command line: parses flags into plain option objects, calls the library, maps errors to exit codes.

No model logic lives here, and torch is imported only inside commands so `localgpt --help` stays instant.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import typer

from localgpt.errors import Interrupted, LocalGPTError, PromptError, UsageError

app = typer.Typer(
    name="localgpt",
    help="Run open-weight language models on your own machine.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_TOKENS = 512
DTYPES = ("auto", "float32", "bfloat16", "float16")


def read_stdin_text() -> str | None:
    """stdin's text when it is not a terminal (None when it is). Bad UTF-8 is replaced, NUL bytes dropped."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    data = sys.stdin.buffer.read()
    return data.decode("utf-8", errors="replace").replace("\x00", "")


def build_prompt(argument: str | None, stdin_text: str | None) -> str:
    """stdin first, then a blank line, then the argument (as llm and ollama do)."""
    parts = [part for part in (stdin_text.strip() if stdin_text else "", argument or "") if part.strip()]
    if not parts:
        if stdin_text is None and argument is None:
            raise UsageError("no prompt — give one as an argument, or pipe text in: echo hi | localgpt generate")
        raise PromptError("the prompt is empty — give a prompt as an argument or on stdin")
    return "\n\n".join(parts)


def sampling_options(defaults: dict, temperature, top_k, top_p, min_p, repetition_penalty, seed):
    """Flags win; then the model's generation_config.json; then localgpt's defaults."""
    from localgpt.sampling import SamplingOptions

    if temperature is None:
        if defaults.get("do_sample") is False:
            temperature = 0.0  # the model's authors asked for greedy decoding
        else:
            temperature = defaults.get("temperature", DEFAULT_TEMPERATURE)
    return SamplingOptions(
        temperature=float(temperature),
        top_k=int(top_k if top_k is not None else defaults.get("top_k", 0)),
        top_p=float(top_p if top_p is not None else defaults.get("top_p", DEFAULT_TOP_P)),
        min_p=float(min_p if min_p is not None else defaults.get("min_p", 0.0)),
        repetition_penalty=float(
            repetition_penalty if repetition_penalty is not None else defaults.get("repetition_penalty", 1.0)
        ),
        seed=seed,
    ).validate()


def write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.callback()
def root():
    """Run open-weight language models on your own machine."""


def command(function):
    """Register a command; Ctrl-C inside it becomes our own interrupt error (exit 130) instead of Typer's."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted("interrupted") from None

    return app.command()(wrapper)


@command
def generate(
    prompt: str | None = typer.Argument(None, help="The prompt. Text piped on stdin comes first."),
    model: str = typer.Option(None, "--model", "-m", help="Model folder.", envvar="LOCALGPT_MODEL"),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float | None = typer.Option(
        None, "--temperature", "-t", help="0 = greedy. Default: model's, else 0.7."
    ),
    top_k: int | None = typer.Option(None, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float | None = typer.Option(None, "--top-p", help="Nucleus sampling mass. Default: model's, else 0.9."),
    min_p: float | None = typer.Option(None, "--min-p", help="Drop tokens below min_p x the top probability."),
    repetition_penalty: float | None = typer.Option(None, "--repetition-penalty", help="> 1 discourages repeats."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed, for repeatable sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable)."),
    system: str | None = typer.Option(None, "--system", "-s", help="System prompt (chat models)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as-is, without the chat template."),
    truncate: bool = typer.Option(False, "--truncate", help="Keep the end of a prompt longer than the context."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    stats: bool = typer.Option(False, "--stats", help="Print token counts and speed to stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
):
    """Generate an answer to a prompt, streamed to stdout."""
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, not {max_tokens}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    # Validate the flags the user gave before spending seconds on loading.
    sampling_options({}, temperature if temperature is not None else 0.0, top_k, top_p, min_p, repetition_penalty,
                     seed)
    if model is None:
        raise UsageError("no model given — pass -m/--model FOLDER (or set LOCALGPT_MODEL)")
    text = build_prompt(prompt, read_stdin_text())

    from localgpt.generate import stream_generate
    from localgpt.hub import resolve
    from localgpt.weights import load_model

    loaded = load_model(resolve(model), dtype=dtype, device=device)
    options = sampling_options(loaded.generation_defaults, temperature, top_k, top_p, min_p, repetition_penalty, seed)
    prompt_ids = encode_prompt(loaded, text, system, raw, truncate)

    pieces: list[str] = []
    final = None
    for response in stream_generate(loaded.model, loaded.tokenizer, prompt_ids, options, max_tokens, stop):
        if as_json:
            pieces.append(response.text)
        elif response.text:
            write_out(response.text)
        final = response
    if as_json:
        write_out(json.dumps(response_json("".join(pieces), final), ensure_ascii=False) + "\n")
    else:
        write_out("\n")
    if stats:
        print(stats_line(final), file=sys.stderr)


def encode_prompt(loaded, text: str, system: str | None, raw: bool, truncate: bool) -> list[int]:
    """Chat models get the text as a user message (plus the system prompt); --raw or no template: the text as-is."""
    tokenizer = loaded.tokenizer
    if raw or tokenizer.chat_template is None:
        if system and not raw:
            print("localgpt: this model has no chat template; --system is ignored", file=sys.stderr)
        ids = tokenizer.encode(text)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids = tokenizer.encode_chat(messages)
    context = loaded.config.context_length
    if len(ids) >= context:
        if not truncate:
            raise PromptError(
                f"the prompt is {len(ids)} tokens but the model's context is {context} tokens — "
                "shorten it, or pass --truncate to keep its end"
            )
        keep = context // 2  # leave room to answer
        print(f"localgpt: the prompt was {len(ids)} tokens; kept its last {keep}", file=sys.stderr)
        ids = ids[-keep:]
    return ids


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
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        code = report_error("interrupted", 130)
    except typer.TyperException as exc:  # Typer's (vendored click's) usage errors: bad flags, missing values
        if debug:
            raise
        message = exc.format_message().replace("\n", " ") if hasattr(exc, "format_message") else str(exc)
        code = report_error(message, getattr(exc, "exit_code", 2))
    except LocalGPTError as exc:
        if debug:
            raise
        if isinstance(exc, Interrupted):
            sys.stderr.write("\n")
        code = report_error(str(exc), exc.exit_code)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining while it exits.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 141
    except MemoryError:
        code = report_error("out of memory — try a smaller model, --dtype bfloat16, or a shorter prompt", 1)
    sys.exit(code)
