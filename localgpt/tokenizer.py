"""Tokenizer: `tokenizers` for tokenizer.json, special tokens from the config files, chat templates rendered in a
Jinja sandbox, and a streaming decoder that never splits a character or drops a space.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from localgpt.config import read_json
from localgpt.errors import TokenizerError

Message = dict[str, str]


def _token_text(value: Any) -> str | None:
    """Special tokens are written as "text" or as {"content": "text", ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    def __init__(self, model_dir: Path, config_eos_ids: tuple[int, ...] = ()):
        from tokenizers import Tokenizer as FastTokenizer

        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(
                f"no tokenizer.json in {model_dir} — localgpt needs a fast tokenizer file; download it again"
            )
        try:
            self._tokenizer = FastTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses with long messages
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TokenizerError(f"{path} is not a valid tokenizer file ({first_line}) — download it again") from None

        settings: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (model_dir / name).exists():
                settings.update({k: v for k, v in read_json(model_dir / name, "tokenizer config").items() if v})
        self.special_tokens = {
            key: text for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(settings.get(key))) is not None
        }
        self.chat_template, self.chat_template_source = self._find_chat_template(model_dir,
                                                                                 settings.get("chat_template"))
        eos_ids = set(config_eos_ids)
        eos_text = self.special_tokens.get("eos_token")
        if eos_text is not None and (eos_id := self._tokenizer.token_to_id(eos_text)) is not None:
            eos_ids.add(eos_id)
        self.eos_token_ids = frozenset(eos_ids)

    @staticmethod
    def _find_chat_template(model_dir: Path, from_config: Any) -> tuple[str | None, str]:
        """(the chat template or None, the file it comes from, for error messages)."""
        # transformers 5.x writes chat_template.jinja; 4.x keeps it in tokenizer_config.json (a string, or a
        # list of named templates of which "default" is the chat one).
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.exists():
            try:
                return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenizerError(f"cannot read {jinja_file}: {exc}") from None
        source = str(model_dir / "tokenizer_config.json")
        if isinstance(from_config, str):
            return from_config, source
        if isinstance(from_config, list):
            named = {t.get("name"): t.get("template") for t in from_config if isinstance(t, dict)}
            return named.get("default"), source
        return None, source

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def backend_json(self) -> str:
        """tokenizer.json as the tokenizers library holds it (added tokens included): what llguidance reads."""
        return self._tokenizer.to_str()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        if self.chat_template is None:
            raise TokenizerError("this model has no chat template — use --raw to send the text as-is")
        return render_template(self.chat_template, messages, add_generation_prompt, self.special_tokens,
                               self.chat_template_source, tools)

    @property
    def takes_tools(self) -> bool:
        """Whether the chat template renders a `tools` list (function definitions for tool calling)."""
        return self.chat_template is not None and "tools" in self.chat_template

    def default_system_prompt(self) -> str | None:
        """The system prompt the chat template writes by itself when the conversation has none (SmolLM2's "You
        are a helpful AI assistant named SmolLM…"), or None. Found by rendering one user turn with and without a
        marker system prompt: where the template puts the marker, it otherwise puts its default."""
        if self.chat_template is None:
            return None
        marker, user = "\x00system-marker\x00", [{"role": "user", "content": "\x00user-marker\x00"}]
        try:
            alone = self.render_chat(user)
            marked = self.render_chat([{"role": "system", "content": marker}, *user])
        except TokenizerError:
            return None
        prefix = len(os.path.commonprefix([alone, marked]))
        suffix = len(os.path.commonprefix([alone[prefix:][::-1], marked[prefix:][::-1]]))
        if marked[prefix : len(marked) - suffix] != marker:
            return None  # no default: without a system prompt the template writes no system turn at all
        return alone[prefix : len(alone) - suffix] or None

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        # As transformers' apply_chat_template: the template writes any BOS itself, so no special tokens are added.
        return self.encode(self.render_chat(messages, add_generation_prompt, tools), add_special_tokens=False)


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_ENVIRONMENT = None


def _environment():
    """The same Jinja settings transformers uses, in the immutable sandbox: a template cannot reach Python."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _ENVIRONMENT = env
    return _ENVIRONMENT


def render_template(template: str, messages: list[Message], add_generation_prompt: bool,
                    special_tokens: dict[str, str], source: str = "the model's files",
                    tools: list[dict] | None = None) -> str:
    from jinja2.exceptions import SecurityError, TemplateError

    try:
        compiled = _environment().from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                               documents=None, **special_tokens)
    except SecurityError as exc:
        raise TokenizerError(f"the chat template in {source} tried an unsafe operation and was stopped: {exc}") \
            from None
    except TemplateError as exc:
        raise TokenizerError(f"the chat template in {source} failed: {exc} — --raw sends the text without it") \
            from None
    except Exception as exc:  # a template can raise anything Python-level (TypeError on bad data, ...)
        raise TokenizerError(f"the chat template in {source} failed: {type(exc).__name__}: {exc} — --raw sends the "
                             "text without it") from None


@dataclass
class StreamDecoder:
    """Turns token ids into text deltas whose concatenation equals decoding all ids at once.

    It decodes a window that starts a few tokens back (so SentencePiece and byte-level BPE see the context that
    decides a leading space) and holds text back while it ends in an incomplete UTF-8 character (U+FFFD).
    """

    tokenizer: Any
    skip_special_tokens: bool = True

    def __post_init__(self):
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start
        self.read_offset = 0  # ids up to here have been emitted
        self.emitted = 0  # characters emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            return ""  # an incomplete character, or nothing visible yet
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.emitted += len(delta)
        return delta

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end), as one-shot decoding shows it."""
        full = self._decode(self.ids)
        delta = full[self.emitted :]
        self.emitted = len(full)
        self.prefix_offset = self.read_offset = len(self.ids)
        return delta

