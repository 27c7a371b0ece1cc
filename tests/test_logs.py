"""The conversation log (LOCALGPT_HOME/logs.db): what generate and chat record, `localgpt logs`, resuming with
`chat --continue` / `--cid`, opting out, and a locked or corrupt database that never costs a reply."""

from __future__ import annotations

import json
import sqlite3

import pytest

from helpers import assert_clean_error, tiny_model
from localgpt.chat import ChatSession
from localgpt.settings import GenerationSettings
from localgpt.weights import load_model
from test_cli import run_in_process


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("log-model")
    tiny_model(path, "llama", tokenizer=True, eos_token_id=None)
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALGPT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOCALGPT_NO_LOG", raising=False)
    return tmp_path / "home"


def cli(capsys, monkeypatch, *args: str, stdin: str = ""):
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))  # a pipe, not a terminal
    return run_in_process(capsys, *args)


def logged(capsys, monkeypatch) -> list[dict]:
    result = cli(capsys, monkeypatch, "logs", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_generate_logs_prompt_reply_model_settings_and_timings(folder, home, capsys, monkeypatch):
    answer = cli(capsys, monkeypatch, "generate", "-m", str(folder), "Hello there", "-t", "0", "-n", "6", "-s",
                 "Be brief.")
    assert answer.returncode == 0 and answer.stderr == "", answer.stderr
    (conversation,) = logged(capsys, monkeypatch)
    assert conversation["turns"] == 1 and conversation["first_prompt"] == "Hello there"
    shown = cli(capsys, monkeypatch, "logs", conversation["id"], "--json")
    detail = json.loads(shown.stdout)
    (reply,) = detail["responses"]
    assert detail["model"] == folder.name and detail["system"] == "Be brief."
    assert reply["prompt"] == "Hello there" and reply["response"] + "\n" == answer.stdout
    assert reply["settings"]["temperature"] == 0.0 and reply["settings"]["max_tokens"] == 6
    assert reply["generation_tokens"] == 6 and reply["finish_reason"] == "length"
    assert reply["time_to_first_token_s"] > 0 and reply["generation_tokens_per_s"] > 0
    text = cli(capsys, monkeypatch, "logs", conversation["id"]).stdout
    assert "> Hello there" in text and reply["response"] in text and "system: Be brief." in text


def test_chat_continue_and_cid_resume_the_conversation(folder, home, capsys, monkeypatch):
    """The second chat, resumed from the log, answers as one chat holding both turns does; --cid picks one."""
    first = cli(capsys, monkeypatch, "chat", "-m", str(folder), "-t", "0", "-n", "5", stdin="Hi\n")
    assert first.returncode == 0, first.stderr
    resumed = cli(capsys, monkeypatch, "chat", "-m", str(folder), "-t", "0", "-n", "5", "--continue",
                  stdin="What did I say?\n")
    assert resumed.returncode == 0 and "continuing conversation" in resumed.stderr, resumed.stderr
    loaded = load_model(folder, dtype="float32", device="cpu")
    together = ChatSession(loaded, GenerationSettings.of(temperature=0.0, max_tokens=5))
    expected = ["".join(r.text for r in together.send(text)) for text in ("Hi", "What did I say?")]
    assert [first.stdout, resumed.stdout] == [f"{expected[0]}\n\n", f"{expected[1]}\n\n"]
    fresh = ChatSession(loaded, GenerationSettings.of(temperature=0.0, max_tokens=5))
    assert "".join(r.text for r in fresh.send("What did I say?")) != expected[1]  # the history mattered
    (conversation,) = logged(capsys, monkeypatch)
    assert conversation["turns"] == 2  # continued under the same id
    again = cli(capsys, monkeypatch, "chat", "-m", str(folder), "-t", "0", "-n", "2", "--cid", conversation["id"],
                stdin="And now?\n")
    assert again.returncode == 0 and logged(capsys, monkeypatch)[0]["turns"] == 3


def test_resume_errors_are_one_line(folder, home, capsys, monkeypatch):
    assert_clean_error(cli(capsys, monkeypatch, "chat", "-m", str(folder), "--continue"), 1,
                       "no logged conversation to continue yet")
    assert_clean_error(cli(capsys, monkeypatch, "chat", "-m", str(folder), "--cid", "nope"), 1,
                       "no logged conversation 'nope'")
    assert_clean_error(cli(capsys, monkeypatch, "chat", "--continue", "--cid", "x"), 2, "give one")
    assert cli(capsys, monkeypatch, "logs").stdout.startswith("No conversations logged yet")


def test_no_log_and_the_variable_log_nothing(folder, home, capsys, monkeypatch):
    assert cli(capsys, monkeypatch, "generate", "-m", str(folder), "Hi", "-n", "2", "--no-log").returncode == 0
    assert cli(capsys, monkeypatch, "chat", "-m", str(folder), "-n", "2", "--no-log", stdin="Hi\n").returncode == 0
    monkeypatch.setenv("LOCALGPT_NO_LOG", "1")
    assert cli(capsys, monkeypatch, "generate", "-m", str(folder), "Hi", "-n", "2").returncode == 0
    assert logged(capsys, monkeypatch) == []


@pytest.mark.parametrize("damage", ["corrupt", "locked"])
def test_a_broken_log_never_costs_the_reply(folder, home, capsys, monkeypatch, damage):
    import localgpt.logs

    home.mkdir(parents=True)
    database = home / "logs.db"
    holder = None
    if damage == "corrupt":
        database.write_bytes(b"\x8b not sqlite \xff" * 200)
    else:  # another process in the middle of a write holds the lock for longer than we wait
        cli(capsys, monkeypatch, "generate", "-m", str(folder), "Hi", "-n", "2")  # the database exists
        monkeypatch.setattr(localgpt.logs, "LOCK_TIMEOUT_S", 0.2)
        holder = sqlite3.connect(database, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
    try:
        result = cli(capsys, monkeypatch, "generate", "-m", str(folder), "Hello", "-t", "0", "-n", "4")
    finally:
        if holder is not None:
            holder.close()
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    notice = result.stderr.splitlines()
    assert len(notice) == 1 and notice[0].startswith("localgpt: not logging this conversation"), result.stderr


def test_a_reply_stopped_midway_is_logged_as_far_as_it_got(folder, home):
    """Ctrl-C stops the stream (the generator is closed): what was said so far is logged, not lost."""
    from localgpt.logs import Log

    loaded = load_model(folder, dtype="float32", device="cpu")
    session = ChatSession(loaded, GenerationSettings.of(temperature=0.0, max_tokens=20))
    log = Log()
    session.on_reply = lambda chat, prompt, reply, final: log.record(chat.conversation_id, "tiny", None, prompt,
                                                                      reply, {}, final)
    stream = session.send("Hello")
    said = "".join(next(stream).text for _ in range(3))
    stream.close()
    (conversation,) = log.conversations(5)
    (reply,) = log.conversation(conversation["id"])["responses"]
    assert reply["response"] == said and reply["generation_tokens"] == 3
