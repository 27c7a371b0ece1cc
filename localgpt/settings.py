"""Generation settings: the values a user sets, their defaults and their checks, with no torch import.

The CLI validates flags through this module before it imports torch, so a bad flag answers in about the time
of `--help`; sampling.py, generate.py, the chat REPL and the benchmarks read the same schema.
"""

from __future__ import annotations

from dataclasses import dataclass

from localgpt.errors import UsageError

DEFAULT_TEMPERATURE = 0.7  # when neither the flag nor the model's generation_config.json says
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_TOKENS = 512
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE_CHOICES = ("8", "4", "nf4", "fp4")


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = DEFAULT_TOP_P  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    no_repeat_ngram_size: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> SamplingOptions:
        checks = [
            (self.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), not {self.temperature}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], not {self.top_p}"),
            (self.top_k >= 0, f"--top-k must be >= 0 (0 = off), not {self.top_k}"),
            (0 <= self.min_p <= 1, f"--min-p must be in [0, 1], not {self.min_p}"),
            (self.repetition_penalty > 0, f"--repetition-penalty must be > 0, not {self.repetition_penalty}"),
            (self.no_repeat_ngram_size >= 0, f"--no-repeat-ngram-size must be >= 0, not {self.no_repeat_ngram_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        return self


@dataclass(frozen=True)
class BeamOptions:
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never"
    num_return_sequences: int = 1
    do_sample: bool = False

    def validate(self) -> BeamOptions:
        if self.num_beams < 1:
            raise UsageError(f"--num-beams must be >= 1, not {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise UsageError(f"--num-return-sequences must be between 1 and --num-beams ({self.num_beams}), "
                             f"not {self.num_return_sequences}")
        if self.early_stopping not in (True, False, "never"):
            raise UsageError(f"--early-stopping must be true, false or never, not {self.early_stopping!r}")
        return self


def check_quantize_choice(value: str) -> str:
    """--quantize's value, lower-cased, or a UsageError that lists the choices."""
    value = str(value).lower()
    if value not in QUANTIZE_CHOICES:
        raise UsageError(f"quantization must be one of {', '.join(QUANTIZE_CHOICES)}, not {value!r}")
    return value
