"""The chat: conversation state and cache reuse, context trimming, save/load, the REPL driven through
prompt-toolkit's pipe input, and the non-terminal mode through a subprocess."""

from __future__ import annotations

import io
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import run_cli, tiny_model
from localgpt.chat import ChatSession, read_blocks
from localgpt.errors import LocalGPTError, UsageError
from localgpt.settings import GenerationSettings
from localgpt.weights import load_model

GREEDY = dict(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-model")
    tiny_model(path, "llama", tokenizer=True, eos_token_id=None)
    return path


@pytest.fixture(scope="module")
def loaded(folder):
    return load_model(folder, dtype="float32", device="cpu")


def reply(session: ChatSession, text: str) -> str:
    return "".join(r.text for r in session.send(text))


def test_turns_remember_and_reuse_the_cache(loaded, monkeypatch):
    session = ChatSession(loaded, GenerationSettings.of(**GREEDY), system="Be brief.")
    first = reply(session, "Hello there")
    assert [m["role"] for m in session.messages] == ["user", "assistant"] and session.messages[1]["content"] == first
    prefilled = []
    original = loaded.model.forward
    monkeypatch.setattr(loaded.model, "forward",
                        lambda ids, cache, *a, **k: prefilled.append(ids.shape[1]) or original(ids, cache, *a, **k))
    second = reply(session, "And again")
    full_prompt = len(session.loaded.tokenizer.encode_chat(session.conversation()[:-1]))
    assert prefilled[0] < full_prompt / 2  # only the new turn was prefilled
    # The same conversation from scratch gives the same answer: the reused cache is exact.
    fresh = ChatSession(loaded, GenerationSettings.of(**GREEDY), system="Be brief.")
    fresh.messages = [dict(m) for m in session.messages[:2]]
    assert reply(fresh, "And again") == second


def test_interrupted_reply_is_kept_and_the_next_turn_is_exact(loaded):
    session = ChatSession(loaded, GenerationSettings.of(temperature=0.0, max_tokens=20))
    responses = session.send("Tell me a story")
    partial = "".join(next(responses).text for _ in range(3))
    responses.close()  # what Ctrl-C does to the stream
    assert session.messages[-1] == {"role": "assistant", "content": partial}
    after = reply(session, "Go on")
    fresh = ChatSession(loaded, GenerationSettings.of(temperature=0.0, max_tokens=20))
    fresh.messages = [dict(m) for m in session.messages[:2]]
    assert reply(fresh, "Go on") == after


def test_overflow_drops_oldest_turns_not_system_or_latest(loaded):
    notices = []
    session = ChatSession(loaded, GenerationSettings.of(temperature=0.0, max_tokens=8), system="SYSTEM",
                          notify=notices.append)
    for turn in range(12):
        reply(session, f"message {turn} " + "word " * 20)
    assert notices and "dropped the oldest" in notices[0]
    assert session.system == "SYSTEM" and session.conversation()[0]["content"] == "SYSTEM"
    assert session.messages[-2]["content"].startswith("message 11")
    assert len(session.encode()) <= loaded.config.context_length


def test_a_message_longer_than_the_context_is_refused(loaded):
    session = ChatSession(loaded, GenerationSettings.of(**GREEDY))
    with pytest.raises(LocalGPTError, match="context"):
        list(session.send("word " * 400))
    assert session.messages == []


def test_retry_regenerates_the_last_reply(loaded):
    session = ChatSession(loaded, GenerationSettings.of(**GREEDY))
    first = reply(session, "Hello")
    again = "".join(r.text for r in session.retry())
    assert again == first and len(session.messages) == 2
    session.reset()
    with pytest.raises(UsageError):
        session.retry()


def test_save_and_load_round_trip(loaded, tmp_path):
    session = ChatSession(loaded, GenerationSettings.of(**GREEDY), system="S")
    reply(session, "Hello")
    session.set("top_k", "5")
    session.save(tmp_path / "chat.json")
    data = json.loads((tmp_path / "chat.json").read_text())
    assert data["messages"] == session.messages and data["system"] == "S" and data["settings"]["top_k"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # no temporary file left behind
    other = ChatSession(loaded, GenerationSettings())
    other.load(tmp_path / "chat.json")
    assert other.messages == session.messages and other.system == "S" and other.settings.get("top_k") == 5


@pytest.mark.parametrize("content", ["{broken", '{"messages": [{"role": "x"}]}', "[]", "\x00\xff"])
def test_corrupt_conversation_files_change_nothing(loaded, tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content)
    session = ChatSession(loaded, GenerationSettings.of(**GREEDY))
    session.messages = [{"role": "user", "content": "keep me"}]
    with pytest.raises(LocalGPTError, match="nothing loaded"):
        session.load(path)
    assert session.messages == [{"role": "user", "content": "keep me"}]


@pytest.mark.parametrize("key, value", [("temperature", "-1"), ("top_p", "2"), ("top_k", "x"), ("max_tokens", "0"),
                                        ("bogus", "1"), ("verbose", "maybe"), ("num_beams", "0"),
                                        ("early_stopping", "sometimes")])
def test_settings_are_validated(loaded, key, value):
    session = ChatSession(loaded)
    with pytest.raises(UsageError) as refused:
        session.set(key, value)
    assert session.settings == GenerationSettings() and session.verbose
    assert "--" not in str(refused.value) and key in str(refused.value)  # said in /set's words, not a flag's


def test_blocks_and_lines():
    lines = ['first\n', '"""\n', 'a\n', '\n', 'b\n', '"""\n', '"""inline"""\n', '\n', 'last\n']
    assert list(read_blocks(iter(lines))) == ["first", "a\n\nb", "inline", "last"]


def drive_repl(loaded, keys: str, tmp_path, history_path=None):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput
    from rich.console import Console

    from localgpt.repl import Repl

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, color_system=None, width=200)
    session = ChatSession(loaded, GenerationSettings.of(temperature=0.0, max_tokens=5))
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        Repl(session, console, input=pipe, output=DummyOutput(),
             history_path=history_path or tmp_path / "history").run()
    return session, out.getvalue()


def test_repl_commands_and_state(loaded, tmp_path):
    saved = tmp_path / "saved.json"
    keys = ("/set temperature 0\r/set top_p 2\r/set verbose\r/x\r/help\r/system Be kind.\r/show\r"
            f"Hello\r/save {saved}\r/reset\r/stats\r/load {saved}\r/set max_tokens 3\r"
            '"""\rline one\rline two\r"""\r/bye\r')
    session, output = drive_repl(loaded, keys, tmp_path)
    assert "Set temperature to 0." in output
    assert "Error: top_p must be in (0, 1], not 2\n" in output  # the setting named as /set names it
    assert "verbose off" in output
    assert "Unknown command '/x'. Type /help." in output
    assert "/retry" in output and "System prompt set." in output and "architecture" in output
    assert "Saved 2 messages" in output and "New conversation." in output and "Loaded 2 messages" in output
    assert session.system == "Be kind."
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["Hello", "line one\nline two"]
    assert session.settings.max_tokens == 3
    assert (tmp_path / "history").exists()


@pytest.mark.parametrize("kind", ["corrupt", "directory", "unwritable"])
def test_a_bad_history_file_never_stops_the_chat(loaded, tmp_path, kind):
    history = tmp_path / "history"
    if kind == "corrupt":
        history.write_bytes(b"\xff\xfe\x00garbage\n+\xc3(\n# 2026\n+earlier question\n")
    elif kind == "directory":
        history.mkdir()
    else:
        history.write_text("# 2026\n+earlier question\n")
        history.chmod(0o400)
        if os.access(history, os.W_OK):  # root writes anyway: a path under a file fails for everyone
            history = tmp_path / "history" / "inside"
    session, output = drive_repl(loaded, "Hello\r/bye\r", tmp_path, history_path=history)
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["Hello"]
    if kind == "corrupt":
        assert b"+Hello" in history.read_bytes() and b"garbage" in history.read_bytes()  # appended, nothing lost
    else:
        assert output.count("history is off") == 1


def test_piped_chat_is_scriptable_and_remembers(folder, loaded):
    result = run_cli("chat", "-m", str(folder), "-t", "0", "-n", "5", stdin="Hi\nWhat did I say?\n",
                     env={"LOCALGPT_MODEL": ""}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and ">>>" not in result.stdout
    replies = result.stdout.split("\n\n")
    assert len(replies) == 3 and replies[2] == ""  # two replies, each followed by a blank line
    # the second reply is the one a conversation that holds the first turn gives, not a fresh one's
    session = ChatSession(loaded, GenerationSettings.of(temperature=0.0, max_tokens=5))
    assert replies[:2] == [reply(session, "Hi"), reply(session, "What did I say?")]
    fresh = ChatSession(loaded, GenerationSettings.of(temperature=0.0, max_tokens=5))
    assert reply(fresh, "What did I say?") != replies[1]


def test_beams_in_chat_match_beam_search(loaded):
    from localgpt.beam import BeamOptions, beam_search

    session = ChatSession(loaded, GenerationSettings.of(temperature=0.0, max_tokens=8))
    session.set("num_beams", "3")
    session.set("early_stopping", "never")
    text = reply(session, "Hello")
    ids = loaded.tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    best = beam_search(loaded.model, ids, session.settings.sampling, BeamOptions(3, early_stopping="never"), 8,
                       loaded.tokenizer.eos_token_ids)[0]
    assert text == loaded.tokenizer.decode([t for t in best.tokens if t not in loaded.tokenizer.eos_token_ids])
    session.set("num_beams", "1")
    assert reply(session, "Again")  # back to sampling/greedy with the conversation cache


def test_repl_remembers_whole_messages_and_speaks_as_set_does(loaded, tmp_path):
    """A \"\"\" block is one history entry (Up-arrow brings the message back, not its last line); /stats after
    /reset has no reply to speak of; /show and /set say on/off and none, as /set takes them."""
    from prompt_toolkit.history import FileHistory

    keys = '"""\rline one\rline two\r"""\rHello\r/set\r/show\r/stats\r/reset\r/stats\r/bye\r'
    _, output = drive_repl(loaded, keys, tmp_path)
    entries = list(FileHistory(str(tmp_path / "history")).load_history_strings())
    assert entries == ["/bye", "/stats", "/reset", "/stats", "/show", "/set", "Hello", "line one\nline two"]
    after_reset = output.split("New conversation.")[1]
    assert "tok/s" not in after_reset and after_reset.count("No reply yet.") == 1  # the first /stats had figures
    shown = {line.split()[0]: line.split(None, 1)[1] for line in output.splitlines() if line.startswith("  ")
             and len(line.split()) >= 2}
    assert shown["verbose"].startswith("on") and shown["seed"].startswith("none")
    assert "True" not in output and "None" not in output


def test_a_history_file_that_cannot_be_used_is_said_before_the_prompt(loaded, tmp_path):
    (tmp_path / "history").mkdir()
    _, output = drive_repl(loaded, "/bye\r", tmp_path)
    assert output.splitlines()[0].startswith("history is off") and output.count("history is off") == 1


def test_show_names_the_system_prompt_the_template_adds(loaded, tmp_path):
    """SmolLM2's template writes "You are a helpful AI assistant named SmolLM…" when there is no system prompt:
    /show says so instead of "(none)"; a template without a default shows (none)."""
    import shutil

    from localgpt.tokenizer import Tokenizer
    from localgpt.weights import load_model

    assert loaded.tokenizer.default_system_prompt() is None
    _, output = drive_repl(loaded, "/show\r/bye\r", tmp_path)
    assert "(none)" in output
    folder = tmp_path / "with-default"
    shutil.copytree(loaded.path, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe terse.<|im_end|>\n"
                               "{% endif %}" + config["chat_template"])
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer(folder).default_system_prompt() == "Be terse."
    _, output = drive_repl(load_model(folder, dtype="float32", device="cpu"), "/show\r/bye\r", tmp_path)
    assert "Be terse. (the chat template's default)" in output


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.text(alphabet="abcdéf東京😀,.'", min_size=1, max_size=14), min_size=1, max_size=30),
       width=st.integers(4, 40), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_replies_wrap_between_words(words, width, cuts):
    """However the reply arrives in pieces, lines break between words, never start with the space, and fit the
    screen; a word is broken only when it is wider than the screen. Nothing else changes."""
    from rich.cells import cell_len

    from localgpt.repl import WordWrap

    text = " ".join(words)
    out = io.StringIO()
    wrap = WordWrap(out, width)
    points = sorted({0, len(text), *[c % (len(text) + 1) for c in cuts]})
    for start, end in zip(points, points[1:], strict=False):
        wrap.write(text[start:end])
    wrap.end()
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and all(cell_len(line) <= width for line in lines)
    assert not any(line.startswith(" ") for line in lines)
    assert "".join(out.getvalue().split()) == "".join(text.split())  # only white space moved
    if all(cell_len(word) <= width for word in words):
        assert [word for line in lines for word in line.split(" ") if word] == words  # words kept whole
