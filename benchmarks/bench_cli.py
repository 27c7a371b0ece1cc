"""How fast the quick commands answer: whole processes (`python -m localgpt …`), best and median of N runs, beside
`python -c pass` and `python -c "import torch"` as the floor and the cost those commands must not pay.

    python benchmarks/bench_cli.py [--runs 10]

Runs against a scratch LOCALGPT_HOME holding one small model folder, so `list` and `show` have something to read.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "localgpt --help": [sys.executable, "-m", "localgpt", "--help"],
    "localgpt --version": [sys.executable, "-m", "localgpt", "--version"],
    "localgpt generate -t -1 (usage error)": [sys.executable, "-m", "localgpt", "generate", "hi", "-t", "-1"],
    "localgpt list": [sys.executable, "-m", "localgpt", "list"],
    "localgpt show tiny": [sys.executable, "-m", "localgpt", "show", "tiny"],
    "localgpt rm nothing --yes": [sys.executable, "-m", "localgpt", "rm", "nothing", "--yes"],
    "localgpt logs": [sys.executable, "-m", "localgpt", "logs"],
}


def make_home(root: Path) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import tiny_model

    tiny_model(root / "models" / "tiny", "llama", tokenizer=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}; {args.runs} runs each")
    with tempfile.TemporaryDirectory() as scratch:
        make_home(Path(scratch))
        env = {**os.environ, "LOCALGPT_HOME": scratch, "HF_HUB_OFFLINE": "1"}
        print(f"{'command':<42} {'best ms':>8} {'median ms':>10}")
        for name, command in COMMANDS.items():
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                subprocess.run(command, env=env, capture_output=True, stdin=subprocess.DEVNULL)
                times.append((time.perf_counter() - start) * 1000)
            print(f"{name:<42} {min(times):>8.0f} {statistics.median(times):>10.0f}")


if __name__ == "__main__":
    main()
