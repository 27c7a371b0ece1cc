"""Downloads against a local stand-in for the hub, model references, the default model, list/show/rm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_hub import FakeHub

from helpers import assert_clean_error, run_cli, tiny_model
from localgpt import hub as hub_module
from localgpt.errors import ModelError

CHUNK = hub_module.DOWNLOAD_CHUNK_BYTES


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("repo")
    # A vocabulary big enough that model.safetensors spans many download chunks (untied: two 2 MB matrices).
    import helpers

    original = dict(helpers.TINY)
    helpers.TINY["vocab_size"] = 8192
    try:
        tiny_model(folder, "llama", tokenizer=True)
    finally:
        helpers.TINY.clear()
        helpers.TINY.update(original)
    return folder


@pytest.fixture
def fake_hub(model_folder, tmp_path, monkeypatch):
    with FakeHub() as server:
        server.add_repo("org/tiny", model_folder)
        server.add_repo("org/pickles", files={"config.json": b"{}", "pytorch_model.bin": b"\x80\x02"})
        server.add_repo("org/both", model_folder, files={"pytorch_model.bin": b"\x80\x02" * 1000})
        server.private.add("org/private")
        env = {"HF_ENDPOINT": server.endpoint, "HF_HOME": str(tmp_path / "hf"), "LOCALGPT_HOME": str(tmp_path / "lg")}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        server.env = env
        yield server


def run(*args, env=None, timeout=120):
    return run_cli(*args, env=env, timeout=timeout, stdin=None, offline=False)


def snapshot_file(result, name: str) -> Path:
    return Path(result.stdout.strip()) / name


def test_full_download_gets_only_what_we_run(fake_hub, model_folder):
    result = run("download", "org/both", env=fake_hub.env)
    assert result.returncode == 0, result.stderr
    snapshot = Path(result.stdout.strip())
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in model_folder.iterdir())
    assert snapshot_file(result, "model.safetensors").read_bytes() == (model_folder / "model.safetensors").read_bytes()
    assert not any("pytorch_model.bin" in r and r.startswith("GET") for r in fake_hub.requests)
    assert "downloading org/both" in result.stderr


def test_interrupted_download_resumes_without_downloading_a_byte_twice(fake_hub, model_folder):
    size = (model_folder / "model.safetensors").stat().st_size
    assert size > 8 * CHUNK
    cut = 4 * CHUNK
    fake_hub.stall_after["model.safetensors"] = cut
    process = subprocess.Popen([sys.executable, "-m", "localgpt", "download", "org/tiny"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **fake_hub.env})
    deadline = time.time() + 60
    while fake_hub.bytes_served.get("model.safetensors", 0) < cut and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # let the client write what it received
    process.send_signal(signal.SIGINT)  # the user gives up: Ctrl-C
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Error: interrupted" in stderr and "Traceback" not in stderr
    fake_hub.release.set()
    fake_hub.stall_after.clear()

    result = run("download", "org/tiny", env=fake_hub.env)  # run it again
    assert result.returncode == 0, result.stderr
    assert f"bytes={cut}-" in " ".join(fake_hub.requests)
    assert fake_hub.bytes_served["model.safetensors"] == size  # every byte exactly once
    assert snapshot_file(result, "model.safetensors").read_bytes() == (model_folder / "model.safetensors").read_bytes()


def test_dropped_connection_is_resumed_within_one_run(fake_hub, model_folder):
    size = (model_folder / "model.safetensors").stat().st_size
    fake_hub.cut_after["model.safetensors"] = 3 * CHUNK
    fake_hub.cuts_left = 1
    result = run("download", "org/tiny", env=fake_hub.env)
    assert result.returncode == 0, result.stderr
    assert fake_hub.bytes_served["model.safetensors"] == size
    assert snapshot_file(result, "model.safetensors").read_bytes() == (model_folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize("repo, message", [
    ("org/nmae", "no model 'org/nmae' on the hub — check the name"),
    ("org/private", "access to 'org/private' was refused — set HF_TOKEN"),
    ("org/pickles", "has only pickled weights"),
    ("not a repo", "no model folder at not a repo"),
])
def test_hub_errors_are_one_clear_line(fake_hub, repo, message):
    result = run("download" if "/" in repo else "show", repo, env=fake_hub.env)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and message in result.stderr and "Traceback" not in result.stderr


def test_repo_id_downloads_on_first_use_then_works_offline(fake_hub):
    first = run("generate", "-m", "org/tiny", "Hello", "-n", "3", "-t", "0", env=fake_hub.env)
    assert first.returncode == 0, first.stderr
    assert "downloading org/tiny" in first.stderr
    offline = {**fake_hub.env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    again = run("generate", "-m", "org/tiny", "Hello", "-n", "3", "-t", "0", env=offline)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and "downloading" not in again.stderr
    listed = json.loads(run("list", "--json", env=offline).stdout)
    assert [m["name"] for m in listed] == ["org/tiny"] and listed[0]["where"] == "hf-cache"


def test_not_enough_disk_space_is_refused_before_downloading(fake_hub, monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    point_this_process_at(fake_hub, monkeypatch, tmp_path / "hf-cache")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ModelError, match="needs .* free"):
        hub_module.download("org/tiny", notify=lambda message: None)
    assert not any(r.startswith("GET /org/tiny/resolve") for r in fake_hub.requests)


def point_this_process_at(fake_hub, monkeypatch, cache: Path) -> None:
    from huggingface_hub import constants

    # huggingface_hub reads its environment once, at import: point this process at the stand-in too.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        fake_hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")


def test_full_disk_during_download_keeps_the_bytes_so_far(fake_hub, monkeypatch, tmp_path, model_folder):
    import errno

    point_this_process_at(fake_hub, monkeypatch, tmp_path / "hf-cache")
    room = 3 * CHUNK

    class FullDisk:
        """A file on a disk that fills up after `room` bytes."""

        def __init__(self, path, mode):
            self.file = open(path, mode)  # noqa: SIM115 - closed in __exit__

        def write(self, chunk):
            if self.file.tell() + len(chunk) > room:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(chunk)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(hub_module, "open", FullDisk, raising=False)
    with pytest.raises(ModelError, match="No space left on device — free some space and run the same command again"):
        hub_module.download("org/tiny", notify=lambda message: None)
    partials = list((tmp_path / "hf-cache").rglob("*.localgpt-partial"))
    assert [p.stat().st_size for p in partials] == [room]  # kept for the next run, under a name that says partial
    assert not list((tmp_path / "hf-cache").rglob("snapshots/*/model.safetensors"))

    monkeypatch.delattr(hub_module, "open")  # space freed: the same call resumes
    snapshot = hub_module.download("org/tiny", notify=lambda message: None)
    assert (snapshot / "model.safetensors").read_bytes() == (model_folder / "model.safetensors").read_bytes()
    assert f"bytes={room}-" in " ".join(fake_hub.requests)  # asked only for what it did not have


def test_unwritable_cache_is_a_clear_error(fake_hub, tmp_path):
    (tmp_path / "file").write_text("")  # a cache path under a file: unwritable for every user, root included
    result = run("download", "org/tiny", env={**fake_hub.env, "HF_HUB_CACHE": str(tmp_path / "file" / "hub")})
    assert result.returncode == 1 and result.stderr.startswith("Error: cannot write "), result.stderr
    assert "set HF_HOME to a folder you can write" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_hub_is_a_clear_error(fake_hub):
    result = run("download", "org/tiny", env={**fake_hub.env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("Error: cannot reach the Hugging Face hub (") and "HF_ENDPOINT" in result.stderr


def test_file_names_from_the_hub_cannot_leave_the_cache(fake_hub, model_folder, tmp_path):
    fake_hub.add_repo("org/sly", model_folder, files={"../../../escape.json": b"{}", "/etc/evil.json": b"{}",
                                                      "sub/../../up.json": b"{}"})
    result = run("download", "org/sly", env=fake_hub.env)
    assert result.returncode == 0, result.stderr
    snapshot = Path(result.stdout.strip())
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in model_folder.iterdir())
    assert not list(tmp_path.rglob("escape.json")) and not list(tmp_path.rglob("up.json"))
    assert not any("escape" in r or "evil" in r or "up.json" in r for r in fake_hub.requests if r.startswith("GET"))


def test_list_show_rm(fake_hub):
    assert run("download", "org/tiny", env=fake_hub.env).returncode == 0
    show = run("show", "org/tiny", env=fake_hub.env)
    assert show.returncode == 0 and "architecture      llama" in show.stdout and "model.safetensors" in show.stdout
    assert "runs here         yes" in show.stdout and "memory            about " in show.stdout
    table = run("list", env=fake_hub.env)
    assert "org/tiny" in table.stdout and "llama" in table.stdout
    refused = run("rm", "org/tiny", env=fake_hub.env)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    removed = run("rm", "org/tiny", "--yes", env=fake_hub.env)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(run("list", "--json", env=fake_hub.env).stdout) == []
    assert run("rm", "/etc", "--yes", env=fake_hub.env).returncode == 1


def test_download_usage_and_offline_errors(capsys):
    """A name that is no repo id is a usage error (2); offline, a repo that is not cached says so, instead of
    telling the user to set the HF_HUB_OFFLINE=1 they already set."""
    from helpers import assert_clean_error
    from test_cli import run_in_process

    assert_clean_error(run_in_process(capsys, "download", "notarepo"), 2, "'notarepo' is not a hub repo id")
    offline = run_in_process(capsys, "download", "some/repo")  # the suite runs with HF_HUB_OFFLINE=1
    assert_clean_error(offline, 1, "'some/repo' is not in the Hugging Face cache, and HF_HUB_OFFLINE=1 keeps")


def test_list_never_cuts_names_or_paths(tmp_path):
    """At 80 columns, or piped: one model a line, its whole name (what -m takes) and its whole path."""
    long_name = "SmolLM2-135M-Instruct-with-a-name-much-longer-than-any-column-q4"
    tiny_model(tmp_path / "home" / "models" / long_name, "llama", tokenizer=True)
    result = run("list", env={"LOCALGPT_HOME": str(tmp_path / "home"), "COLUMNS": "80"})
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 2 and lines[0].split()[0] == "NAME", result.stdout
    assert lines[1].split()[0] == long_name and lines[1].endswith(str(tmp_path / "home" / "models" / long_name))
    assert "\x1b" not in result.stdout and "…" not in result.stdout


def test_show_without_a_model_shows_the_default(tmp_path, monkeypatch, capsys):
    from helpers import assert_clean_error
    from localgpt.hub import DEFAULT_LOCAL_NAME
    from test_cli import run_in_process

    monkeypatch.setenv("LOCALGPT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOCALGPT_MODEL", raising=False)
    assert_clean_error(run_in_process(capsys, "show"), 1, "the default model (HuggingFaceTB/SmolLM2-135M-Instruct) "
                                                          "is not on this machine yet")
    tiny_model(tmp_path / "home" / "models" / DEFAULT_LOCAL_NAME, "llama", tokenizer=True)
    shown = run_in_process(capsys, "show")
    assert shown.returncode == 0 and shown.stdout.splitlines()[0].split() == ["model", DEFAULT_LOCAL_NAME]


def test_download_says_what_it_needs_and_refuses_what_will_not_fit(fake_hub):
    """Before the weights are fetched: the bytes and the memory the model needs; more than is available (here
    LOCALGPT_MEMORY_AVAILABLE stands in for a small machine) is refused with both figures, and --force goes on."""
    small = {"LOCALGPT_MEMORY_AVAILABLE": str(100 * 2**20)}
    refused = run("download", "org/tiny", env=small)
    assert_clean_error(refused, 1, "needs about")
    assert "of memory available — 'localgpt download org/tiny --force' fetches it anyway" in refused.stderr
    assert not list((Path(fake_hub.env["HF_HOME"]) / "hub").rglob("*.safetensors"))  # no weights fetched
    forced = run("download", "org/tiny", "--force", env=small)
    assert forced.returncode == 0 and snapshot_file(forced, "model.safetensors").exists()
    said = forced.stderr.splitlines()[0]
    assert "downloading org/tiny" in said and "in memory it needs about" in said and "in float32 (" in said
    assert "KV cache for 256 tokens" in said


def test_show_flags_an_architecture_localgpt_cannot_run(tmp_path):
    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    import torch
    from safetensors.torch import save_file

    save_file({"backbone.embeddings.weight": torch.zeros(4, 8)}, folder / "model.safetensors")
    shown = run("show", str(folder))
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if line.startswith("runs here"))
    assert "no — model_type 'mamba' is not supported" in line
    assert next(line for line in shown.stdout.splitlines() if line.startswith("memory")).endswith("—")
