"""Time to first token across the turns of one chat on SmolLM2-135M-Instruct: with the KV cache kept between
turns, turn 8 should cost about what turn 1 does (only the new tokens are prefilled).

    python benchmarks/bench_chat.py [--model DIR] [--turns 8] [--max-tokens 40]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

QUESTIONS = ["What is the capital of France?", "And of Italy?", "Name a famous dish from there.",
             "How is it made?", "What wine goes with it?", "Tell me about that region.",
             "What is the weather like there?", "Summarize our conversation."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        import smollm2

        args.model = smollm2.hf_folder()
    from localgpt.chat import ChatSession
    from localgpt.settings import GenerationSettings
    from localgpt.weights import load_model

    loaded = load_model(Path(args.model), dtype="auto", device="auto")
    for reuse in (True, False):
        session = ChatSession(loaded, GenerationSettings.of(temperature=0.0, max_tokens=args.max_tokens))
        firsts = []
        for turn in range(args.turns):
            if not reuse:
                session.cache.trim(0)
                session.cached_ids = []
            records = list(session.send(QUESTIONS[turn % len(QUESTIONS)]))
            firsts.append(records[-1].time_to_first_token * 1000)
        context = len(session.cached_ids)
        label = "cache kept across turns" if reuse else "whole conversation prefilled each turn"
        print(f"{label:<40} TTFT ms by turn: {' '.join(f'{t:.0f}' for t in firsts)}  "
              f"(turn {args.turns}/turn 1 = {firsts[-1] / firsts[0]:.2f}x, context {context} tokens)")


if __name__ == "__main__":
    main()
