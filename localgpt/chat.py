"""`localgpt chat`: the conversation (state, KV cache reuse, context trimming, save/load) and the REPL around it.

`ChatSession` has no terminal in it: it takes user text and streams the reply as Response records, keeping the
KV cache of the conversation so each turn prefills only its new tokens. `Repl` is the prompt-toolkit loop with
slash commands; `run_piped` is the same conversation when stdin is not a terminal.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from localgpt.errors import LocalGPTError, UsageError
from localgpt.generate import Response, stream_generate
from localgpt.logs import new_conversation_id
from localgpt.settings import SETTINGS, GenerationSettings, SettingError

# What /set takes: the chat's generation settings (the schema of settings.py), and the REPL's own switch.
CHAT_SETTINGS = {name: declared for name, declared in SETTINGS.items() if declared.chat}
SETTINGS_HELP = {**{name: declared.help for name, declared in CHAT_SETTINGS.items()},
                 "verbose": "on/off: the stats line after each reply."}


class ChatSession:
    """A conversation with a model. Messages are the source of truth; the KV cache mirrors their tokens."""

    def __init__(self, loaded, settings: GenerationSettings | None = None, system: str | None = None,
                 notify=lambda message: None):
        self.loaded = loaded
        self.settings = settings or GenerationSettings()
        self.verbose = True  # the stats line after each reply (the REPL's; piped chat turns it off)
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.notify = notify  # one-line notices (e.g. "dropped the oldest turns")
        self.cache = loaded.model.make_cache(1, 256)
        self.cached_ids: list[int] = []  # the tokens whose keys/values the cache holds, in order
        self.last: Response | None = None
        # Called with (session, prompt, reply, its last Response or None) when a reply ends, Ctrl-C included.
        self.on_reply: Callable[[ChatSession, str, str, Response | None], None] | None = None
        self.conversation_id = new_conversation_id()  # what the log files this conversation's replies under

    def set(self, key: str, value: str) -> None:
        """`/set key value`: a chat setting, checked; raises UsageError with a one-line reason."""
        key = key.replace("-", "_")
        if key == "verbose":
            parsed = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}.get(value.lower())
            if parsed is None:
                raise UsageError(f"'{value}' is not a valid value for verbose (on or off)")
            self.verbose = parsed
            return
        if key not in CHAT_SETTINGS:
            raise UsageError(f"unknown setting '{key}' — settings: {', '.join(SETTINGS_HELP)}")
        self.settings = self.settings.replace(**{key: value})

    @property
    def context_length(self) -> int:
        return self.loaded.config.context_length

    def conversation(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def encode(self) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if tokenizer.chat_template is None:  # a base model: the turns as plain text
            text = "".join(f"{m['role']}: {m['content']}\n" for m in self.conversation()) + "assistant:"
            return tokenizer.encode(text)
        return tokenizer.encode_chat(self.conversation())

    def fit_to_context(self) -> list[int]:
        """The prompt ids, dropping the oldest turns (never the system prompt or the latest message) if needed."""
        room = max(16, min(self.settings.max_tokens, self.context_length // 4))
        ids = self.encode()
        dropped = 0
        while len(ids) + room > self.context_length and len(self.messages) > 1:
            # drop the oldest user turn and the reply to it
            self.messages.pop(0)
            if self.messages and self.messages[0]["role"] == "assistant":
                self.messages.pop(0)
            dropped += 1
            ids = self.encode()
        if dropped:
            self.notify(f"the conversation was longer than the context ({self.context_length} tokens): "
                        f"dropped the oldest {dropped} turn{'s' if dropped > 1 else ''}")
        if len(ids) >= self.context_length:
            raise LocalGPTError(f"the message is {len(ids)} tokens but the model's context is "
                                f"{self.context_length} tokens — send something shorter")
        return ids

    def send(self, text: str) -> Iterator[Response]:
        self.messages.append({"role": "user", "content": text})
        return self._reply()

    def retry(self) -> Iterator[Response]:
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise UsageError("nothing to retry yet")
        self.messages.pop()
        return self._reply()

    def _reply(self) -> Iterator[Response]:
        try:
            prompt_ids = self.fit_to_context()
        except LocalGPTError:
            self.messages.pop()
            raise
        # Reuse the cache for the longest prefix it already holds.
        common = 0
        for cached, new in zip(self.cached_ids, prompt_ids, strict=False):
            if cached != new:
                break
            common += 1
        self.cache.trim(common)
        generated: list[int] = []
        reply = ""
        self.messages.append({"role": "assistant", "content": ""})
        settings = self.settings
        beams = settings.beams()
        if beams is None:
            responses = stream_generate(self.loaded.model, self.loaded.tokenizer, prompt_ids, settings.sampling,
                                        settings.max_tokens, settings.stop, cache=self.cache)
        else:  # beams run in their own batched cache; the conversation's cache stays as it was
            from localgpt.beam import stream_beam_search

            responses = stream_beam_search(self.loaded.model, self.loaded.tokenizer, prompt_ids, settings.sampling,
                                           beams, settings.max_tokens, settings.stop)
        final = None
        try:
            for response in responses:
                if beams is None and response.generation_tokens > len(generated):  # a record per new token
                    generated.append(response.token)
                reply += response.text
                self.messages[-1]["content"] = reply
                self.last = final = response
                yield response
        finally:
            # Also on Ctrl-C: the partial reply stays, and the cache keeps what it holds.
            self.cached_ids = (prompt_ids + generated)[: self.cache.length]
            if self.on_reply is not None:
                self.on_reply(self, self.messages[-2]["content"], reply, final)

    def resume(self, messages: list[dict[str, str]], conversation_id: str) -> None:
        """Continue an earlier conversation: its messages, and its tokens prefilled into the cache now, so the
        next turn prefills only itself."""
        import torch

        from localgpt.generate import prefill

        self.messages = [dict(m) for m in messages]
        self.conversation_id = conversation_id
        ids = self.fit_to_context()
        self.cache.trim(0)
        self.cache.grow(len(ids))
        with torch.inference_mode():
            prefill(self.loaded.model, torch.tensor([ids], device=self.loaded.model.device), self.cache)
        self.cached_ids = ids[: self.cache.length]

    def reset(self) -> None:
        self.messages = []
        self.last = None  # /stats speaks of this conversation's replies only
        self.conversation_id = new_conversation_id()

    def to_json(self) -> dict:
        return {"format": "localgpt-chat/1", "model": str(self.loaded.path), "system": self.system,
                "messages": self.messages, "settings": {**self.settings.flat(), "verbose": self.verbose}}

    def save(self, path: Path) -> None:
        """Write the conversation as JSON atomically (a temporary file renamed over the target)."""
        path = path.expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(self.to_json(), out, ensure_ascii=False, indent=2)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def load(self, path: Path) -> None:
        path = path.expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LocalGPTError(f"no conversation file at {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LocalGPTError(f"{path} is not a conversation file ({type(exc).__name__}) — nothing loaded") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise LocalGPTError(f"{path} is not a conversation file (no valid 'messages') — nothing loaded")
        settings, saved = GenerationSettings(), data.get("settings")
        for key, value in (saved.items() if isinstance(saved, dict) else ()):
            if key in CHAT_SETTINGS:
                try:
                    settings = settings.replace(**{key: value})
                except SettingError:  # a value this version does not take: the default stays
                    continue
        system = data.get("system")
        self.reset()  # a loaded conversation is a new one: no /stats of before, a new id in the log
        self.system = system if isinstance(system, str) else None
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        self.settings = settings
        if isinstance(saved, dict) and isinstance(saved.get("verbose"), bool):
            self.verbose = saved["verbose"]


def setting_text(session: ChatSession, name: str) -> str:
    """A setting's value as /set takes it: on/off for switches, none for an unset seed."""
    if name == "verbose":
        return "on" if session.verbose else "off"
    return SETTINGS[name].text(session.settings.get(name))


def stats_text(response: Response, session: ChatSession) -> str:
    used = len(session.cached_ids) + 1
    return (f"{response.generation_tokens} tokens · {response.generation_tps:.1f} tok/s · first token "
            f"{response.time_to_first_token * 1000:.0f} ms · context {used}/{session.context_length}")


def read_blocks(lines: Iterator[str]) -> Iterator[str]:
    """One message per line, or a block between lines that are just \"\"\" (the piped and the REPL syntax)."""
    block: list[str] | None = None
    for raw in lines:
        line = raw.rstrip("\n")
        if block is None:
            if line.strip().startswith('"""'):
                rest = line.strip()[3:]
                if rest.endswith('"""') and len(rest) >= 3:
                    yield rest[:-3]
                    continue
                block = [rest] if rest else []
                continue
            if line.strip():
                yield line
        else:
            if line.strip().endswith('"""'):
                block.append(line.rstrip()[:-3])
                yield "\n".join(block).strip("\n")
                block = None
            else:
                block.append(line)
    if block:
        yield "\n".join(block)


def run_piped(session: ChatSession, stdin, stdout) -> None:
    """stdin is not a terminal: each line (or \"\"\" block) is a user message; each reply ends with a blank line."""
    for message in read_blocks(iter(stdin.readline, "")):
        for response in session.send(message):
            stdout.write(response.text)
            stdout.flush()
        stdout.write("\n\n")
        stdout.flush()
