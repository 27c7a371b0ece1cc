"""Several sequences decoded as one batch: the engine a server's worker drives (continuous batching).

Each request has its own prompt, sampling settings, token budget, end-of-sequence ids, logit bias and log-prob
report. `Engine.add` prefills a request's prompt into a free row of one batched KV cache; `Engine.step` decodes one
token for every running request at once (one forward pass for all rows, each at its own position), so a request
joins at the next step and N streams cost little more than one (decoding reads the weights once per step,
whatever the row count). A finished or cancelled request frees its row at once.

The rows are kept packed at the front of the cache (a finished row trades places with the last running one), so a
step runs on exactly the running rows. A free row keeps what it held: a new request whose prompt begins with a
free row's tokens (the next turn of a conversation) takes that row and prefills only the rest.

When every running row is at the same position, the step takes the model's ordinary path; otherwise each row's
position goes along (`Transformer.forward`'s `positions`): per-row rotary tables, cache slots and attention, through
the native backend's _rows kernels where it runs.

One thread owns an Engine and its model: the state a step mutates (the cache, the rotary tables, bitsandbytes'
first-forward repacking, a compiled step) is then never shared. A server puts requests on a queue for that thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from localgpt.generate import advance
from localgpt.model import Transformer
from localgpt.prompt import check_prompt_fits
from localgpt.sampling import process_logits, sample
from localgpt.settings import SamplingOptions


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    max_tokens: int = 1024
    eos_ids: frozenset[int] = frozenset()
    top_logprobs: int | None = None  # report log-probs: the chosen token's and this many most likely (None: none)
    logit_bias: dict[int, float] | None = None
    constraint: Any = None  # a grammar the answer must follow (constrain.Constraint: apply, consume), or None


@dataclass
class TokenEvent:
    """One generated token of one request."""

    request: int  # the id Engine.add returned
    token: int
    logprob: float | None  # log-probability of the token under the model (before sampling's processors)
    top_logprobs: list[tuple[int, float]]  # the most likely tokens and theirs, most likely first
    finish_reason: str | None  # "stop" (an end-of-sequence token), "length", or None while it runs


@dataclass
class _Sequence:
    id: int
    request: Request
    history: torch.Tensor  # (1, prompt + max_tokens): the prompt and the answer so far, for the penalties
    length: int  # positions held in the cache (the prompt and every fed-back token)
    generated: int = 0
    logits: torch.Tensor | None = None  # the next token's logits, (1, V) float32
    counts: torch.Tensor | None = None  # the answer's token counts, for presence and frequency penalties
    generator: torch.Generator | None = None


class Engine:
    def __init__(self, model: Transformer, rows: int = 8, max_len: int | None = None):
        self.model = model
        self.rows = rows
        self.max_len = max_len or model.config.context_length
        # Rows hold sequences of different lengths, so a sliding layer cannot become a ring later by position
        # (LayerCache.grow): a model with windows gets its whole length now; the others grow as requests need.
        windowed = any(model.config.layer(i).window for i in range(model.config.num_layers))
        self.cache = model.make_cache(rows, self.max_len if windowed else min(self.max_len, 256))
        self.running: list[_Sequence] = []  # row i of the cache is running[i]
        self.kept: dict[int, list[int]] = {}  # free row → the tokens whose keys and values it still holds
        self.next_id = 0
        self.reused_tokens = 0  # prompt tokens not prefilled again, thanks to kept rows (for tests and stats)

    @property
    def free_rows(self) -> int:
        return self.rows - len(self.running)

    @torch.inference_mode()
    def add(self, request: Request) -> int:
        """Prefill a request into a free row; returns its id. Its first token comes with the next step."""
        if not self.free_rows:
            raise RuntimeError("every row of the batch is running a request")
        prompt_len = len(request.prompt_ids)
        check_prompt_fits(prompt_len, min(self.max_len, self.model.config.context_length))
        max_tokens = min(request.max_tokens, self.max_len - prompt_len)
        total = prompt_len + max_tokens
        self.cache.grow(total)
        device = self.model.device
        history = torch.empty(1, total, dtype=torch.long, device=device)
        history[0, :prompt_len] = torch.tensor(request.prompt_ids, dtype=torch.long)
        options = request.sampling
        sequence = _Sequence(self.next_id, dataclasses.replace(request, max_tokens=max_tokens), history, prompt_len)
        if options.seed is not None and not options.greedy:
            sequence.generator = torch.Generator(device=device).manual_seed(options.seed)
        if options.presence_penalty or options.frequency_penalty:
            sequence.counts = torch.zeros(1, self.model.config.vocab_size, dtype=torch.long, device=device)
        index = len(self.running)
        reused = self._reuse_row(index, request.prompt_ids)
        switch = self.model.recompute_at
        if switch is not None and 0 < reused <= switch < prompt_len:
            reused = 0  # kept with longrope's short tables, which a prompt this long no longer uses
        sequence.logits = advance(self.model, history, self.cache.rows(slice(index, index + 1), reused), prompt_len)
        self.reused_tokens += reused
        self.running.append(sequence)
        self._note_lengths()
        self.next_id += 1
        return sequence.id

    def _reuse_row(self, index: int, prompt_ids: list[int]) -> int:
        """Bring the free row holding the longest prefix of prompt_ids to `index`; returns how many of its
        positions serve (at least the last prompt token is run again: its logits start the answer)."""
        best, shared = None, 0
        for row, tokens in self.kept.items():
            common = 0
            for held, wanted in zip(tokens, prompt_ids[:-1], strict=False):
                if held != wanted:
                    break
                common += 1
            if row >= index and common > shared:
                best, shared = row, common
        if best is None:
            self.kept.pop(index, None)  # whatever it held is overwritten
            return 0
        tokens = self.kept.pop(best)
        if best != index:
            self.cache.swap_rows(best, index, max(len(tokens), len(self.kept.get(index, ()))))
            if index in self.kept:
                self.kept[best] = self.kept.pop(index)
        wrapped = any(layer.ring and len(tokens) > layer.slots for layer in self.cache.layers)
        if wrapped and shared < len(tokens):
            return 0  # a ring that has wrapped lost the positions before its window: going back means anew
        return shared

    def cancel(self, request_id: int) -> None:
        """Stop a request now (its client went away): its row is free for the next."""
        for index, sequence in enumerate(self.running):
            if sequence.id == request_id:
                self._free(index)
                return

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One token for every running request, in row order; finished requests leave."""
        if not self.running:
            return []
        need_forward = [s for s in self.running if s.logits is None]
        if need_forward:
            self._forward(need_forward)
        events, finished = [], []
        for index, sequence in enumerate(self.running):
            event = self._choose(sequence)
            events.append(event)
            if event.finish_reason is not None:
                finished.append(index)
        for index in reversed(finished):
            self._free(index)
        return events

    def _forward(self, sequences: list[_Sequence]) -> None:
        """Feed each sequence's last token at its position. They are the front rows: requests added since the
        last step sit behind them with their prefill's logits (a step consumes every row's logits)."""
        assert self.running[: len(sequences)] == sequences
        switch = self.model.recompute_at
        if switch is not None and any(s.length == switch for s in sequences):
            # a row reaches a longrope model's original length: this step runs row by row, and that row whole
            # again with the long tables (generate.advance)
            for row, sequence in enumerate(sequences):
                view = self.cache.rows(slice(row, row + 1), sequence.length)
                sequence.logits = advance(self.model, sequence.history, view, sequence.length + 1)
                sequence.length += 1
            self._note_lengths()
            return
        tokens = torch.stack([s.history[0, s.length] for s in sequences]).view(-1, 1)
        positions = [s.length for s in sequences]
        if len(set(positions)) == 1:  # all at one position: the ordinary path (and the whole-layer kernels)
            logits = self.model(tokens, self.cache.rows(slice(0, len(sequences)), positions[0]))
        else:
            logits = self.model(tokens, self.cache.rows(slice(0, len(sequences))),
                                positions=torch.tensor(positions, device=self.model.device))
        for row, sequence in enumerate(sequences):
            sequence.logits = logits[row : row + 1, -1].float()
            sequence.length += 1
        self._note_lengths()

    def _note_lengths(self) -> None:
        """The cache's layers hold as many positions as its longest row (what growing it must keep)."""
        longest = max(s.length for s in self.running)
        for layer in self.cache.layers:
            layer.length = max(layer.length, longest)

    def _choose(self, sequence: _Sequence) -> TokenEvent:
        request, options, logits = sequence.request, sequence.request.sampling, sequence.logits
        sequence.logits = None
        logprob, top = None, []
        if request.top_logprobs is not None:
            logprobs = torch.log_softmax(logits[0], dim=-1)
            values, ids = torch.topk(logprobs, max(request.top_logprobs, 1))
            top = list(zip(ids.tolist(), values.tolist(), strict=True))[: request.top_logprobs]
        length = len(request.prompt_ids) + sequence.generated  # the prompt and the tokens chosen so far
        if request.constraint is not None:  # first: the warpers then choose among the tokens the grammar allows
            logits = request.constraint.apply(logits)
        needs_history = options.repetition_penalty != 1.0 or options.no_repeat_ngram_size > 0
        if needs_history or sequence.counts is not None or request.logit_bias or not options.greedy:
            logits = process_logits(logits, sequence.history[:, :length] if needs_history else
                                    sequence.history[:, :0], options, answer_counts=sequence.counts,
                                    logit_bias=request.logit_bias)
        token = int(sample(logits, options, sequence.generator))
        if request.constraint is not None:
            request.constraint.consume(token)
        if request.top_logprobs is not None:
            logprob = float(logprobs[token])
        sequence.generated += 1
        finish = None
        if token in request.eos_ids:
            finish = "stop"
        elif sequence.generated >= request.max_tokens:
            finish = "length"
        else:
            sequence.history[0, length] = token
            if sequence.counts is not None:
                sequence.counts[0, token] += 1
        return TokenEvent(sequence.id, token, logprob, top, finish)

    def _free(self, index: int) -> None:
        """The row's sequence is done: the rows stay packed (the last running row trades places with it) and the
        freed row keeps its tokens for a request that continues them."""
        finished = self.running[index]
        held = finished.history[0, : finished.length].tolist()
        last = len(self.running) - 1
        if index != last:
            moved = self.running[last]
            self.cache.swap_rows(index, last, max(finished.length, moved.length))
            self.running[index] = moved
        self.running.pop()
        self.kept[last] = held


def generate_batch(model: Transformer, requests: list[Request], rows: int | None = None) -> Iterator[TokenEvent]:
    """Decode every request, up to `rows` at a time (all of them by default), yielding tokens as they come; a
    request waiting for a row joins as soon as one is free. Event.request is the index into `requests`."""
    engine = Engine(model, rows or len(requests), max_len=max(len(r.prompt_ids) + r.max_tokens for r in requests))
    pending, ids = list(enumerate(requests)), {}
    while pending or engine.running:
        while pending and engine.free_rows:
            index, request = pending.pop(0)
            ids[engine.add(request)] = index
        for event in engine.step():
            event.request = ids[event.request]
            yield event
