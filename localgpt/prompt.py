"""The prompt of one request: the text (stdin first, then the argument), the chat template or the raw text, and
the fit to the model's context. No torch: it works on the tokenizer alone."""

from __future__ import annotations

from collections.abc import Callable

from localgpt.errors import PromptError, UsageError


def build_prompt(argument: str | None, stdin_text: str | None) -> str:
    """stdin first, then a blank line, then the argument (as llm and ollama do)."""
    parts = [part for part in (stdin_text.strip() if stdin_text else "", argument or "") if part.strip()]
    if not parts:
        if stdin_text is None and argument is None:
            raise UsageError("no prompt — give one as an argument, or pipe text in: echo hi | localgpt generate")
        raise PromptError("the prompt is empty — give a prompt as an argument or on stdin")
    return "\n\n".join(parts)


def check_prompt_fits(prompt_len: int, context_length: int) -> None:
    if prompt_len == 0:
        raise PromptError("the prompt is empty — give a prompt as an argument or on stdin")
    if prompt_len >= context_length:
        raise PromptError(
            f"the prompt is {prompt_len} tokens but the model's context is {context_length} tokens — "
            "shorten it, or pass --truncate to keep its end"
        )


def encode_prompt(tokenizer, text: str, context_length: int, system: str | None = None, raw: bool = False,
                  truncate: bool = False, notify: Callable[[str], None] = lambda message: None) -> list[int]:
    """The ids the model is given. Chat models get the text as a user message after the system prompt; raw, or
    a model without a chat template, gets the text as it is.

    A prompt that fills the context is refused, or with `truncate` the message keeps its end: the text is cut, not
    the templated ids, so the system prompt, the role headers and the generation prompt stay whole. The truncated
    prompt takes at most half the context, leaving the rest to answer."""
    chat = not raw and tokenizer.chat_template is not None
    if system and not chat and not raw:
        notify("this model has no chat template; --system is ignored")
    head = [{"role": "system", "content": system}] if system and chat else []

    def encode(message: str) -> list[int]:
        return tokenizer.encode_chat(head + [{"role": "user", "content": message}]) if chat else \
            tokenizer.encode(message)

    ids = encode(text)
    if len(ids) < context_length and ids:
        return ids
    if not truncate or not ids:
        check_prompt_fits(len(ids), context_length)  # raises the error that names both lengths
    budget = context_length // 2
    text_ids = tokenizer.encode(text)
    if not chat:
        kept = ids[-budget:]
    else:
        if len(encode("")) > budget:
            raise PromptError(f"the system prompt and chat template alone take {len(encode(''))} tokens, more "
                              f"than half the model's context ({context_length}) — shorten the system prompt")
        # The most trailing text tokens whose message still fits: the template around it is not linear in the
        # text, so each candidate is rendered whole (a binary search: a dozen renders for a long prompt).
        low, high = 0, len(text_ids)
        while low < high:
            middle = (low + high + 1) // 2
            if len(encode(tail(tokenizer, text_ids, middle))) <= budget:
                low = middle
            else:
                high = middle - 1
        kept = encode(tail(tokenizer, text_ids, low))
    notify(f"the prompt was {len(ids)} tokens; kept the end of the message ({len(kept)} tokens with the template)"
           if chat else f"the prompt was {len(ids)} tokens; kept its last {len(kept)}")
    return kept


def tail(tokenizer, text_ids: list[int], count: int) -> str:
    """The text of the last `count` tokens, less a character cut in half at its start."""
    return tokenizer.decode(text_ids[len(text_ids) - count :]).lstrip("\ufffd") if count else ""
