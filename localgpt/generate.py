"""The generation loop: prefill + decode yielding tokens, and a text layer yielding Response records.

`generate_tokens` is the token generator (the model and the cache in, token ids out). `stream_generate` turns
those into text deltas with stop strings, finish reasons and speed figures — the only API the CLI and chat use.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from localgpt.cache import KVCache
from localgpt.model import Transformer
from localgpt.prompt import check_prompt_fits
from localgpt.sampling import SamplingOptions, process_logits, sample
from localgpt.tokenizer import StreamDecoder

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds activation memory on long prompts


@dataclass
class Response:
    """One step of a streamed answer. `text` is the new text (may be empty); the last record has finish_reason."""

    text: str
    token: int | None
    prompt_tokens: int
    generation_tokens: int
    finish_reason: str | None = None  # stop | length | stop-sequence
    time_to_first_token: float = 0.0  # seconds from the call to the first generated token
    prompt_tps: float = 0.0
    generation_tps: float = 0.0


def timed_response(text: str, token: int | None, prompt_tokens: int, generated: int, finish_reason: str | None,
                   start: float, first_token_time: float | None) -> Response:
    """A Response with its speed figures: prompt speed up to the first token, decode speed after it."""
    now = time.perf_counter()
    ttft = (first_token_time or now) - start
    decode_time = now - (first_token_time or now)
    return Response(text, token, prompt_tokens, generated, finish_reason, ttft,
                    prompt_tokens / ttft if ttft > 0 else 0.0,
                    (generated - 1) / decode_time if generated > 1 and decode_time > 0 else 0.0)


def advance(model: Transformer, history: torch.Tensor, cache: KVCache, end: int) -> torch.Tensor:
    """Run history (B, ≥ end) from cache.length to `end`; the last position's logits (B, V) in float32. When `end`
    first passes a longrope model's original length (Transformer.recompute_at), the cache is dropped and the whole
    sequence run again with the long tables, as transformers' Phi-3 does."""
    switch = model.recompute_at
    if switch is not None and 0 < cache.length <= switch < end:
        cache.trim(0)
    return prefill(model, history[:, cache.length : end], cache)


def prefill(model: Transformer, ids: torch.Tensor, cache: KVCache, chunk: int | None = None) -> torch.Tensor:
    """Run ids (B, T) from cache.length on, in chunks; return the logits of the last position (B, V) in float32."""
    chunk = chunk or PREFILL_CHUNK
    logits = None
    for begin in range(0, ids.shape[1], chunk):
        logits = model(ids[:, begin : begin + chunk], cache)
    return logits[:, -1].float()


@torch.inference_mode()
def generate_tokens(model: Transformer, prompt_ids: Sequence[int], options: SamplingOptions, max_tokens: int,
                    eos_ids: frozenset[int] | set[int] = frozenset(), cache: KVCache | None = None,
                    ) -> Iterator[int]:
    """Yield up to max_tokens token ids; stops after yielding an end-of-sequence id.

    A cache passed in may already hold a prefix of prompt_ids (cache.length positions): only the rest is
    prefilled. That is how a chat reuses its conversation across turns.
    """
    prompt_len = len(prompt_ids)
    check_prompt_fits(prompt_len, model.config.context_length)
    max_tokens = min(max_tokens, model.config.context_length - prompt_len)
    total = prompt_len + max_tokens
    if cache is None:
        cache = model.make_cache(1, total)
    else:
        cache.grow(total)
        cache.trim(prompt_len - 1)  # at least the last prompt token is run again: its logits start the answer
    device = model.device
    history = torch.empty(1, total, dtype=torch.long, device=device)  # prompt + answer, for the penalties
    history[0, :prompt_len] = torch.tensor(list(prompt_ids), dtype=torch.long)
    generator = None
    if options.seed is not None and not options.greedy:
        generator = torch.Generator(device=device).manual_seed(options.seed)
    needs_history = options.repetition_penalty != 1.0 or options.no_repeat_ngram_size > 0
    counts = None  # the answer's token counts, for the presence and frequency penalties
    if options.presence_penalty or options.frequency_penalty:
        counts = torch.zeros(1, model.config.vocab_size, dtype=torch.long, device=device)

    logits = advance(model, history, cache, prompt_len)
    length = prompt_len
    for _ in range(max_tokens):
        if needs_history or counts is not None or not options.greedy:
            logits = process_logits(logits, history[:, :length] if needs_history else history[:, :0], options,
                                    answer_counts=counts)
        next_token = sample(logits, options, generator)  # (1,)
        token = int(next_token)
        yield token
        if token in eos_ids:
            return
        if counts is not None:
            counts[0, token] += 1
        history[0, length] = token
        length += 1
        if length >= total:
            return
        logits = advance(model, history, cache, length)


def find_stop(text: str, stops: Sequence[str]) -> tuple[int, int]:
    """(start of the stop string that completes first in text, or -1; length of the longest tail that could
    still begin a stop string). "Completes first" = earliest end, then earliest start: what a reader of the
    stream sees first, whatever the token boundaries."""
    found = [(i + len(stop), i) for stop in stops if (i := text.find(stop)) >= 0]
    if found:
        return min(found)[1], 0
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if stop.startswith(text[-size:]):
                hold = size
                break
    return -1, hold


def stream_generate(model: Transformer, tokenizer, prompt_ids: Sequence[int], options: SamplingOptions,
                    max_tokens: int, stop: Sequence[str] = (), cache: KVCache | None = None,
                    ) -> Iterator[Response]:
    """Text deltas of the answer. Stop strings are never printed; text that may begin one is held back."""
    tokens = generate_tokens(model, prompt_ids, options, max_tokens, tokenizer.eos_token_ids, cache)
    return responses(tokens, tokenizer, len(prompt_ids), stop)


class TextStream:
    """Tokens in, text deltas out, for one answer: bytes split across tokens wait for their character, stop
    strings are never given out, and text that may begin one is held back until it is resolved. Push-style (the
    batch engine's consumers feed it); `responses` is the same as a generator."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.stops = [s for s in stop if s]
        self.decoder = StreamDecoder(tokenizer)
        self.pending = ""
        self.stopped = False  # a stop string appeared: nothing more comes

    def add(self, token: int) -> str:
        self.pending += self.decoder.add(token)
        return self._release(hold=True)

    def finish(self) -> str:
        """The text held back, at the end of the answer."""
        self.pending += self.decoder.flush()
        return self._release(hold=False)

    def _release(self, hold: bool) -> str:
        if self.stopped:
            return ""
        index, held = find_stop(self.pending, self.stops)
        if index >= 0:
            self.stopped = True
            ready, self.pending = self.pending[:index], ""
            return ready
        held = held if hold else 0
        ready, self.pending = self.pending[: len(self.pending) - held], self.pending[len(self.pending) - held :]
        return ready


def responses(tokens: Iterable[int], tokenizer, prompt_tokens: int, stop: Sequence[str] = ()) -> Iterator[Response]:
    """The text layer over any token stream: deltas, stop strings, finish reason and speed figures."""
    text = TextStream(tokenizer, stop)
    start = time.perf_counter()
    first_token_time = None
    generated = 0
    finish = "length"
    last_token = None

    def record(delta: str, finish_reason: str | None = None) -> Response:
        return timed_response(delta, last_token, prompt_tokens, generated, finish_reason, start, first_token_time)

    for token in tokens:
        if first_token_time is None:
            first_token_time = time.perf_counter()
        generated += 1
        last_token = token
        if token in tokenizer.eos_token_ids:
            finish = "stop"
            break
        delta = text.add(token)
        if text.stopped:
            yield record(delta, "stop-sequence")
            return
        yield record(delta)
    delta = text.finish()
    yield record(delta, "stop-sequence" if text.stopped else finish)
