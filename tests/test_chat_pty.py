"""The real REPL in a pseudo-terminal on the real SmolLM2 model: what a user types and sees."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

import smollm2

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder():
    return smollm2.hf_folder()


def ready(child) -> None:
    """Wait for the prompt, then as long as a person would: prompt-toolkit switches the terminal to raw mode just
    after drawing it, and that switch discards keys typed in between."""
    child.expect(">>>")
    time.sleep(0.3)


def test_two_turns_interrupt_set_save_load_and_ctrl_d(folder, tmp_path):
    env = {**os.environ, "LOCALGPT_HOME": str(tmp_path / "home"), "TERM": "xterm", "COLUMNS": "120",
           "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "localgpt", "chat", "-m", str(folder)], env=env, timeout=120,
                          encoding="utf-8", dimensions=(40, 120))
    try:
        ready(child)
        child.sendline("/set temperature 0")
        child.expect("Set temperature to 0")
        ready(child)
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect(r"tok/s")  # the dim stats line after the reply
        ready(child)
        child.sendline("Write a very long story about a dragon who learns to cook, in ten chapters.")
        child.expect("in ten chapters.")  # the echo of what was typed
        child.expect(r"\r\n[^>]*?\w+ \w+ \w+")  # then the reply, streaming
        child.sendintr()  # Ctrl-C mid-reply
        child.expect("stopped")
        ready(child)
        saved = tmp_path / "chat.json"
        child.sendline(f"/save {saved}")
        child.expect("Saved 4 messages")
        ready(child)
        conversation = json.loads(saved.read_text())
        assert conversation["messages"][1]["content"].startswith("The capital of France is Paris")
        assert conversation["messages"][3]["content"]  # the partial reply was kept
        assert conversation["settings"]["temperature"] == 0.0
        child.sendline("/reset")
        child.expect("New conversation")
        child.sendline(f"/load {saved}")
        child.expect("Loaded 4 messages")
        ready(child)
        child.sendintr()  # Ctrl-C on an empty prompt says how to leave
        child.expect("Ctrl-D or /bye")
        ready(child)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert (tmp_path / "home" / "history").read_text().count("What is the capital of France?") == 1
