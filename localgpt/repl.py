"""The interactive chat: prompt-toolkit input (history, emacs keys, bracketed paste, \"\"\" blocks, Alt-Enter for a
newline), replies streamed as they come, slash commands, rich for everything that is not the reply itself."""

from __future__ import annotations

import functools
from pathlib import Path

from prompt_toolkit.history import FileHistory, InMemoryHistory
from rich.cells import cell_len

from localgpt.chat import SETTINGS_HELP, ChatSession, setting_text, stats_text
from localgpt.errors import LocalGPTError


class MessageHistory:
    """prompt-toolkit appends every line it accepts to the history, so a \"\"\" block became one entry per line
    and Up-arrow could not bring the message back: here the REPL remembers each whole message instead."""

    def append_string(self, string: str) -> None:  # called by prompt-toolkit for every accepted line
        pass

    def remember(self, message: str) -> None:
        super().append_string(message)


class MemoryMessageHistory(MessageHistory, InMemoryHistory):
    pass


class ForgivingFileHistory(MessageHistory, FileHistory):
    """prompt-toolkit's history file (append-only: one small write per entry, so a crash loses at most that entry)
    that turns a file it cannot read or write into one dim notice instead of a crash: the chat matters more than
    its history. Undecodable bytes in it are already replaced, not fatal."""

    def __init__(self, path: Path, console):
        with open(path, "a+b") as probe:  # said before the prompt is drawn, not on its line: OSError to the caller
            probe.seek(0)
            probe.read(1)
        super().__init__(str(path))
        self.console = console
        self.warned = False

    def warn(self, exc: OSError) -> None:
        if not self.warned:
            self.console.print(f"[dim]history is off: cannot use {self.filename} ({exc.strerror or exc})[/dim]")
            self.warned = True

    def load_history_strings(self):
        try:
            return list(super().load_history_strings())
        except OSError as exc:
            self.warn(exc)
            return []

    def store_string(self, string: str) -> None:
        try:
            super().store_string(string)
        except OSError as exc:
            self.warn(exc)

HELP = """Commands:
  /help, /?            this help
  /system [TEXT]       set the system prompt (without TEXT: show it)
  /set KEY VALUE       change a setting (/set alone lists them; /set verbose toggles the stats line)
  /show                settings and model
  /reset               start a new conversation (same system prompt)
  /retry               regenerate the last reply
  /save FILE           save the conversation (JSON)
  /load FILE           load a saved conversation
  /stats               figures of the last reply
  /bye, /exit          leave (or Ctrl-D)
Type \"\"\" to start and end a multi-line message; Alt-Enter (Esc Enter) inserts a newline.
Ctrl-C stops a reply; on an empty prompt it says how to leave."""

LEAVE = object()


class Repl:
    def __init__(self, session: ChatSession, console, input=None, output=None, history_path: Path | None = None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.key_binding import KeyBindings

        self.session = session
        self.console = console
        session.notify = lambda message: console.print(f"[dim]{message}[/dim]", highlight=False)
        bindings = KeyBindings()

        @bindings.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        history = MemoryMessageHistory()
        if history_path is not None:
            try:
                history_path.parent.mkdir(parents=True, exist_ok=True)
                history = ForgivingFileHistory(history_path, console)
            except OSError as exc:
                console.print(f"[dim]history is off: cannot use {history_path} ({exc.strerror})[/dim]")
        self.history = history
        self.prompt = PromptSession(history=history, key_bindings=bindings, input=input, output=output,
                                    enable_open_in_editor=False)

    def read_message(self) -> str:
        text = self.prompt.prompt(">>> ")
        if text.strip().startswith('"""'):
            lines = [text.strip()[3:]]
            while not lines[-1].rstrip().endswith('"""') or (len(lines) == 1 and lines[0].strip() == ""):
                lines.append(self.prompt.prompt("... "))
            lines[-1] = lines[-1].rstrip()[:-3]
            text = "\n".join(lines).strip("\n")
        if text.strip():
            self.history.remember(text)  # the whole message: Up-arrow brings a multi-line one back as it was
        return text

    def run(self) -> None:
        self.console.print("[dim]Type /help for commands, /bye or Ctrl-D to leave.[/dim]", highlight=False)
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                self.console.print("[dim]Use Ctrl-D or /bye to leave.[/dim]", highlight=False)
                continue
            except EOFError:
                break
            if text.strip().startswith("/"):
                if self.command(text.strip()) is LEAVE:
                    break
                continue
            if text.strip():
                self.answer(functools.partial(self.session.send, text))

    def answer(self, start) -> None:
        """Stream one reply; Ctrl-C stops it and keeps what was written."""
        out = WordWrap(self.console.file, self.console.width)
        try:
            responses = start()
            for response in responses:
                out.write(response.text)
        except KeyboardInterrupt:
            out.end()
            self.console.print("[dim]stopped[/dim]", highlight=False)
            return
        except LocalGPTError as exc:
            out.end()
            self.console.print(f"[red]Error: {exc}[/red]", highlight=False)
            return
        out.end()
        last = self.session.last
        if self.session.verbose and last is not None:
            self.console.print(f"[dim]{stats_text(last, self.session)}[/dim]", highlight=False)

    def command(self, line: str):
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        session, console = self.session, self.console
        try:
            if name in ("/bye", "/exit"):
                return LEAVE
            if name in ("/help", "/?"):
                console.print(HELP, markup=False, highlight=False)
            elif name == "/system":
                if argument:
                    session.system = argument
                    console.print("[dim]System prompt set.[/dim]")
                else:
                    console.print(session.system or "(no system prompt)", markup=False, highlight=False)
            elif name == "/set":
                self.set(argument)
            elif name == "/show":
                self.show()
            elif name == "/reset":
                session.reset()
                console.print("[dim]New conversation.[/dim]")
            elif name == "/retry":
                self.answer(session.retry)
            elif name == "/save":
                if not argument:
                    raise LocalGPTError("/save needs a file name: /save chat.json")
                session.save(Path(argument))
                console.print(f"[dim]Saved {len(session.messages)} messages to {argument}.[/dim]", highlight=False)
            elif name == "/load":
                if not argument:
                    raise LocalGPTError("/load needs a file name: /load chat.json")
                session.load(Path(argument))
                console.print(f"[dim]Loaded {len(session.messages)} messages from {argument}.[/dim]", highlight=False)
            elif name == "/stats":
                if session.last is None:
                    console.print("[dim]No reply yet.[/dim]")
                else:
                    console.print(stats_text(session.last, session), highlight=False)
            else:
                console.print(f"Unknown command '{name}'. Type /help.", markup=False, highlight=False)
        except LocalGPTError as exc:
            console.print(f"Error: {exc}", markup=False, highlight=False, style="red")
        return None

    def set(self, argument: str) -> None:
        session = self.session
        key, _, value = argument.partition(" ")
        if not key:
            for name, hint in SETTINGS_HELP.items():
                self.console.print(f"  {name:<22} {setting_text(session, name):<8} {hint}", markup=False,
                                   highlight=False)
            return
        if key == "verbose" and not value.strip():
            session.verbose = not session.verbose
            self.console.print(f"[dim]verbose {'on' if session.verbose else 'off'}[/dim]")
            return
        if not value.strip():
            raise LocalGPTError(f"/set {key} needs a value ({SETTINGS_HELP.get(key, 'see /set')})")
        session.set(key, value.strip())
        self.console.print(f"[dim]Set {key.replace('-', '_')} to {value.strip()}.[/dim]", highlight=False)

    def show(self) -> None:
        loaded, session = self.session.loaded, self.session
        config = loaded.config
        parameters = sum(p.numel() for p in loaded.model.parameters())
        rows = [
            ("model", str(loaded.path)), ("architecture", config.model_type), ("parameters", f"{parameters:,}"),
            ("context", f"{config.context_length} tokens"), ("dtype", str(loaded.model.dtype).removeprefix("torch.")),
            ("system", self.system_shown()), ("messages", str(len(session.messages))),
        ] + [(name, setting_text(session, name)) for name in SETTINGS_HELP]
        for key, value in rows:
            self.console.print(f"  {key:<22} {value}", markup=False, highlight=False)

    def system_shown(self) -> str:
        """What the model sees as its system prompt: ours, or the one its chat template adds by itself."""
        if self.session.system:
            return self.session.system
        default = self.session.loaded.tokenizer.default_system_prompt()
        return f"{default} (the chat template's default)" if default else "(none)"


class WordWrap:
    """Streams text to a terminal, breaking lines between words as rich does for Markdown: the terminal itself
    breaks at the last column, mid-word (`I'` / `m your`), and starts the next line with the space. A word is held
    back until it ends (a space or a newline comes) so it can go whole onto the next line; a word wider than
    the screen is broken where it must be."""

    def __init__(self, out, width: int):
        self.out, self.width = out, max(width, 2)
        self.column = 0
        self.spaces = ""  # spaces after the last word written: dropped if the next word starts a new line
        self.word = ""

    def write(self, text: str) -> None:
        for char in text:
            if char == "\n":
                self._word()
                self.out.write("\n")
                self.column, self.spaces = 0, ""
            elif char in " \t":
                self._word()
                self.spaces += char
            else:
                self.word += char
        self.out.flush()

    def _word(self) -> None:
        if not self.word:
            return
        word, self.word = self.word, ""
        needed = cell_len(self.spaces) + cell_len(word)
        if self.column and self.column + needed > self.width:
            self.out.write("\n")
            self.column = 0
        elif self.spaces:
            self.out.write(self.spaces)
            self.column += cell_len(self.spaces)
        self.spaces = ""
        for char in word:  # a word wider than the line: broken at the edge
            if self.column + cell_len(char) > self.width:
                self.out.write("\n")
                self.column = 0
            self.out.write(char)
            self.column += cell_len(char)

    def end(self) -> None:
        """The reply is over (or stopped): write what is held back and end the line."""
        self._word()
        self.out.write("\n")
        self.out.flush()
