"""Draw decode tok/s by format from `localgpt bench --json` reports (matplotlib: the `bench` extra).

    localgpt bench --compare transformers --dtype float32 --json > f32.json   (one report per format)
    python benchmarks/plot_bench.py f32.json bf16.json q8.json nf4.json -o docs/bench_decode.png

Each report's localgpt result is one group of bars, beside the other implementations in the same report. With
--llama-cpp, llama.cpp figures measured elsewhere are drawn as marked reference lines, labelled as such.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLORS = {"localgpt": "#2a6f97", "transformers": "#c9a227", "llama.cpp": "#7a7a7a"}


def load_groups(paths: list[Path]) -> list[tuple[str, dict[str, float]]]:
    groups = []
    for path in paths:
        report = json.loads(path.read_text())
        ours = report["results"][0]
        label = ours["dtype"] + (" +compile" if ours.get("compile_s") else "")
        groups.append((label, {r["implementation"]: r["decode_tps"] for r in report["results"]}))
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/bench_decode.png"))
    parser.add_argument("--title", default="SmolLM2-135M-Instruct decode, 2 CPU cores, greedy")
    parser.add_argument("--llama-cpp", default=None,
                        help="reference figures measured elsewhere, e.g. F32=86,BF16=105,Q8_0=147,Q4_0=184")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    groups = load_groups(args.reports)
    implementations = [name for name in COLORS if any(name in figures for _, figures in groups)]
    width = 0.8 / len(implementations)
    figure, axes = plt.subplots(figsize=(1.6 * len(groups) + 3, 4.5))
    for index, name in enumerate(implementations):
        xs = [g + (index - (len(implementations) - 1) / 2) * width for g in range(len(groups))]
        values = [figures.get(name, 0.0) for _, figures in groups]
        bars = axes.bar(xs, values, width, label=name, color=COLORS[name])
        axes.bar_label(bars, labels=[f"{v:.0f}" if v else "" for v in values], fontsize=8)
    if args.llama_cpp:
        for item in args.llama_cpp.split(","):
            label, value = item.split("=")
            axes.axhline(float(value), color=COLORS["llama.cpp"], linestyle=":", linewidth=1)
            axes.text(len(groups) - 0.5, float(value), f" llama.cpp {label} (reported, not measured here)",
                      fontsize=7, va="bottom", ha="right", color=COLORS["llama.cpp"])
    axes.set_xticks(range(len(groups)), [label for label, _ in groups])
    axes.set_ylabel("decode tokens / s")
    axes.set_title(args.title)
    axes.legend(loc="upper left")
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=120)
    print(args.output)


if __name__ == "__main__":
    main()
