"""Every prompt and reply, logged to SQLite in LOCALGPT_HOME/logs.db the way simonw's `llm` logs: `localgpt logs`
lists and shows them, `localgpt chat --continue` (or `--cid ID`) resumes a conversation.

Each reply is one row of `responses`, written in its own transaction, so a crash loses at most the reply being
written. Logging never costs the user a reply: a database that is locked by another process, corrupt or
unwritable gives one `localgpt: not logging …` notice and the command goes on. `--no-log` or LOCALGPT_NO_LOG=1
turns it off.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from localgpt.errors import LocalGPTError

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    system TEXT,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    datetime TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    system TEXT,
    response TEXT NOT NULL,
    settings TEXT NOT NULL,
    prompt_tokens INTEGER,
    generation_tokens INTEGER,
    finish_reason TEXT,
    time_to_first_token_s REAL,
    generation_tokens_per_s REAL
);
CREATE INDEX IF NOT EXISTS responses_by_conversation ON responses (conversation_id, id);
"""
LOCK_TIMEOUT_S = 2.0  # another localgpt writing a row holds the lock for milliseconds; longer is a stuck process


def logging_disabled() -> bool:
    return os.environ.get("LOCALGPT_NO_LOG", "") not in ("", "0")


def default_path() -> Path:
    from localgpt.paths import home

    return home() / "logs.db"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_conversation_id() -> str:
    """Sortable by time and readable: 20261201-221503-a3f9."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


class Log:
    """The log database. Writing methods never raise: a failure is one notice, then logging stays off."""

    def __init__(self, path: Path | None = None, notify: Callable[[str], None] | None = None):
        self.path = path or default_path()
        self.notify = notify or (lambda message: print(f"localgpt: {message}", file=sys.stderr))
        self.broken = False

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_S)
        connection.executescript(SCHEMA)
        return connection

    def _failed(self, exc: Exception) -> None:
        if not self.broken:
            self.broken = True
            self.notify(f"not logging this conversation: cannot use {self.path} ({exc}) — the reply is unaffected")

    def record(self, conversation_id: str, model: str, system: str | None, prompt: str, response: str,
               settings: dict, final=None) -> None:
        """One reply (and its conversation, the first time), in one transaction."""
        if self.broken:
            return
        timings = (final.prompt_tokens, final.generation_tokens, final.finish_reason,
                   round(final.time_to_first_token, 4), round(final.generation_tps, 2)) if final else (None,) * 5
        try:
            connection = self._connect()
            try:
                with connection:  # one transaction: committed whole, or rolled back
                    connection.execute("INSERT OR IGNORE INTO conversations (id, model, system, created) "
                                       "VALUES (?, ?, ?, ?)", (conversation_id, model, system, _now()))
                    connection.execute(
                        "INSERT INTO responses (conversation_id, datetime, model, prompt, system, response, "
                        "settings, prompt_tokens, generation_tokens, finish_reason, time_to_first_token_s, "
                        "generation_tokens_per_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (conversation_id, _now(), model, prompt, system, response, json.dumps(settings), *timings))
            finally:
                connection.close()
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)

    # Reading: for `localgpt logs` and `chat --continue`, where a broken database is the command's own error.

    def _read(self, query: str, parameters: tuple = ()) -> list[sqlite3.Row]:
        if not self.path.exists():
            return []
        try:
            connection = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=LOCK_TIMEOUT_S)
            connection.row_factory = sqlite3.Row
            rows = connection.execute(query, parameters).fetchall()
            connection.close()
            return rows
        except sqlite3.Error as exc:
            raise LocalGPTError(f"cannot read the log {self.path} ({exc})") from None

    def conversations(self, limit: int) -> list[dict]:
        """The latest conversations first: id, model, created, turns and the first prompt."""
        rows = self._read(
            "SELECT c.id, c.model, c.system, c.created, COUNT(r.id) AS turns, "
            "(SELECT prompt FROM responses WHERE conversation_id = c.id ORDER BY id LIMIT 1) AS first_prompt, "
            "MAX(r.id) AS last_response FROM conversations c JOIN responses r ON r.conversation_id = c.id "
            "GROUP BY c.id ORDER BY last_response DESC LIMIT ?", (limit,))
        return [{key: row[key] for key in ("id", "model", "system", "created", "turns", "first_prompt")}
                for row in rows]

    def latest_conversation_id(self) -> str | None:
        rows = self._read("SELECT conversation_id FROM responses ORDER BY id DESC LIMIT 1")
        return rows[0]["conversation_id"] if rows else None

    def conversation(self, conversation_id: str) -> dict:
        """A conversation with its replies in order, or a LocalGPTError naming the id."""
        found = self._read("SELECT id, model, system, created FROM conversations WHERE id = ?", (conversation_id,))
        if not found:
            raise LocalGPTError(f"no logged conversation '{conversation_id}' — 'localgpt logs' lists them")
        responses = self._read("SELECT * FROM responses WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        replies = []
        for row in responses:
            reply = {key: row[key] for key in row.keys() if key not in ("conversation_id", "settings")}
            try:
                reply["settings"] = json.loads(row["settings"])
            except (TypeError, ValueError):
                reply["settings"] = {}
            replies.append(reply)
        return {**{key: found[0][key] for key in ("id", "model", "system", "created")}, "responses": replies}


def messages_of(conversation: dict) -> list[dict[str, str]]:
    """A logged conversation as chat messages: each prompt and the reply to it."""
    messages = []
    for reply in conversation["responses"]:
        messages += [{"role": "user", "content": reply["prompt"]}, {"role": "assistant", "content": reply["response"]}]
    return messages
