"""Generation settings: one schema for every front end, with no torch import.

Each setting is declared once, as a field of SamplingOptions (what sampling.py reads), BeamOptions (beam.py) or
GenerationSettings (the whole request: those two, max_tokens and stop), with its default, its rule, its help and
the generation_config.json key that may set it. From that declaration come the CLI flags (cli.py builds them), /set,
/show and the saved settings of the chat, the log's record of a reply and, next, HTTP requests. Adding a sampling
knob is one field in SamplingOptions (and its use in sampling.py).

Values are checked here, with messages that name the setting ("top_p must be in (0, 1], not 2"); the CLI says the
flag instead (`SettingError.for_flags`). The CLI checks flags through this module before it imports torch, so a bad
flag answers in about the time of `--help`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from localgpt.errors import UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE_CHOICES = ("8", "4", "nf4", "fp4")
EARLY_STOPPING = {"true": True, "false": False, "never": "never"}  # transformers' three beam stopping rules


class SettingError(UsageError):
    """A value a setting does not take. The message names the setting as the library knows it (top_p)."""

    def for_flags(self) -> UsageError:
        """The same message in the CLI's words: every setting named by its flag (--top-p)."""
        names = re.compile(rf"\b({'|'.join(sorted(SETTINGS, key=len, reverse=True))})\b")
        pieces = str(self).split("'")  # odd pieces are quoted values the user typed: left as they are
        return UsageError("'".join(piece if i % 2 else names.sub(lambda m: SETTINGS[m.group(1)].flag, piece)
                                   for i, piece in enumerate(pieces)))


@dataclass(frozen=True)
class Rule:
    """A check on a value, and how to say it: '>= 0', 'in (0, 1]'."""

    text: str
    ok: Callable[[object], bool]


AT_LEAST_0 = Rule(">= 0", lambda v: v >= 0)
AT_LEAST_1 = Rule(">= 1", lambda v: v >= 1)
POSITIVE = Rule("> 0", lambda v: v > 0)
UNIT = Rule("in [0, 1]", lambda v: 0 <= v <= 1)
NUCLEUS = Rule("in (0, 1]", lambda v: 0 < v <= 1)
PENALTY_RANGE = Rule("in [-2, 2]", lambda v: -2 <= v <= 2)  # OpenAI's range for presence and frequency penalties
STOPPING_RULES = Rule("true, false or never", lambda v: isinstance(v, bool) or v == "never")


def setting(default, help: str, kind: str, *, rule: Rule | None = None, short: str | None = None,
            model_key: str | None = None, metavar: str | None = None, chat: bool = True):
    """A dataclass field that is a user-facing setting. kind: float | int | optional-int | bool | early-stopping |
    texts. model_key: the generation_config.json key whose value beats `default`. chat=False: not a chat setting
    (several returned sequences mean nothing in a conversation)."""
    return field(default=default, metadata={"setting": dict(help=help, kind=kind, rule=rule, short=short,
                                                            model_key=model_key, metavar=metavar, chat=chat)})


@dataclass(frozen=True)
class SamplingOptions:
    """What the logits processors and the sampler read (sampling.py), in transformers' order of application."""

    temperature: float = setting(0.7, "0 = greedy.", "float", rule=AT_LEAST_0, short="-t", model_key="temperature")
    top_k: int = setting(0, "Keep the k most likely tokens (0 = off).", "int", rule=AT_LEAST_0, model_key="top_k")
    top_p: float = setting(0.9, "Nucleus sampling mass (1 = off).", "float", rule=NUCLEUS, model_key="top_p")
    min_p: float = setting(0.0, "Drop tokens below min_p x the top probability (0 = off).", "float", rule=UNIT,
                           model_key="min_p")
    typical_p: float = setting(1.0, "Locally typical sampling: keep this mass of the most typical tokens (1 = off).",
                               "float", rule=NUCLEUS, model_key="typical_p")
    repetition_penalty: float = setting(1.0, "Above 1 discourages repeats (1 = off).", "float", rule=POSITIVE,
                                        model_key="repetition_penalty")
    no_repeat_ngram_size: int = setting(0, "Never repeat an n-gram of this size (0 = off).", "int", rule=AT_LEAST_0,
                                        model_key="no_repeat_ngram_size")
    presence_penalty: float = setting(0.0, "Subtract this from every token the answer already holds (0 = off).",
                                      "float", rule=PENALTY_RANGE)
    frequency_penalty: float = setting(0.0, "Subtract this times how often the answer holds a token (0 = off).",
                                       "float", rule=PENALTY_RANGE)
    seed: int | None = setting(None, "Random seed, for repeatable sampling.", "optional-int")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> SamplingOptions:
        check_fields(self)
        return self


@dataclass(frozen=True)
class BeamOptions:
    """Beam search as transformers defines it (beam.py). num_beams 1 means no beam search."""

    num_beams: int = setting(1, "Beam search with N beams, transformers' semantics (1 = off).", "int",
                             rule=AT_LEAST_1)
    length_penalty: float = setting(1.0, "Beam score = log-prob / length^F.", "float", model_key="length_penalty")
    early_stopping: bool | str = setting(False, "When beam search ends: true | false | never.", "early-stopping",
                                         rule=STOPPING_RULES, model_key="early_stopping", metavar="true|false|never")
    num_return_sequences: int = setting(1, "Print the best K beams (K <= beams).", "int", rule=AT_LEAST_1,
                                        chat=False)
    do_sample: bool = setting(False, "Beam sampling instead of deterministic beams.", "bool")

    def validate(self) -> BeamOptions:
        check_fields(self)
        if self.num_return_sequences > self.num_beams:
            raise SettingError(f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams "
                               f"({self.num_beams})")
        return self


@dataclass(frozen=True)
class GenerationSettings:
    """Everything one request asks for. `of(**flat)` and `replace(**flat)` take the settings by their flat names;
    `sampling` and `beam` are what the engine reads."""

    sampling: SamplingOptions = SamplingOptions()
    beam: BeamOptions = BeamOptions()
    max_tokens: int = setting(1024, "Most tokens to generate.", "int", rule=AT_LEAST_1, short="-n")
    stop: tuple[str, ...] = setting((), "Stop when this text appears (repeatable).", "texts", metavar="<text>")

    @classmethod
    def of(cls, **values) -> GenerationSettings:
        return cls().replace(**values)

    def replace(self, **values) -> GenerationSettings:
        """A copy with these settings changed (flat names, values coerced and checked)."""
        groups: dict[str, dict] = {"sampling": {}, "beam": {}, "": {}}
        for name, value in values.items():
            declared = SETTINGS.get(name)
            if declared is None:
                raise SettingError(f"unknown setting '{name}' — settings: {', '.join(SETTINGS)}")
            groups[declared.group][name] = declared.coerce(value)
        return dataclasses.replace(self, sampling=dataclasses.replace(self.sampling, **groups["sampling"]),
                                   beam=dataclasses.replace(self.beam, **groups["beam"]), **groups[""]).validate()

    def get(self, name: str):
        declared = SETTINGS[name]
        return getattr(getattr(self, declared.group) if declared.group else self, name)

    def flat(self) -> dict:
        """Every setting by its flat name: what the chat saves and the log records (JSON types)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in ((name, self.get(name)) for name in SETTINGS)}

    def beams(self) -> BeamOptions | None:
        """The beam options when beam search is on, else None."""
        return self.beam if self.beam.num_beams > 1 else None

    def validate(self) -> GenerationSettings:
        check_fields(self)
        self.sampling.validate()
        self.beam.validate()
        if self.beam.num_beams > 1 and (self.sampling.presence_penalty or self.sampling.frequency_penalty):
            raise SettingError("presence_penalty and frequency_penalty work with one beam only — drop them or "
                               "num_beams")
        return self


@dataclass(frozen=True)
class Setting:
    """One declared setting, found by its flat name (SETTINGS)."""

    name: str
    group: str  # "sampling", "beam", or "" for GenerationSettings' own
    default: object
    help: str
    kind: str
    rule: Rule | None
    short: str | None
    model_key: str | None
    metavar: str | None
    chat: bool

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, text: str):
        """A value as typed (/set, a flag): '0.5', 'none' for no seed, 'on'/'off', 'never'."""
        value = text.strip()
        lower = value.lower()
        try:
            if self.kind == "float":
                return float(value)
            if self.kind == "int":
                return int(value)
            if self.kind == "optional-int":
                return None if lower in ("none", "off") else int(value)
            if self.kind == "bool" and lower in ("on", "off", "true", "false", "1", "0"):
                return lower in ("on", "true", "1")
            if self.kind == "early-stopping" and lower in EARLY_STOPPING:
                return EARLY_STOPPING[lower]
            if self.kind == "texts":  # /set stop none clears; else one stop text, with \n and \t spelled out
                return () if lower == "none" else (value.replace("\\n", "\n").replace("\\t", "\t"),)
        except ValueError:
            pass
        raise SettingError(f"'{text}' is not a valid value for {self.name} ({self.describe()})")

    def coerce(self, value):
        """A value from Python, JSON or text, as this setting holds it; raises SettingError."""
        if self.kind == "texts":
            value = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
            if value is None or not all(isinstance(text, str) for text in value):
                raise SettingError(f"{self.name} must be a text or a list of texts")
        elif isinstance(value, str):
            value = self.parse(value)
        elif not self.accepts(value):
            raise SettingError(f"{value!r} is not a valid value for {self.name} ({self.describe()})")
        if self.kind == "float":
            value = float(value)
        self.check(value)
        return value

    def accepts(self, value) -> bool:
        """Whether a non-text value has this setting's type (JSON's true is not the integer 1)."""
        whole = isinstance(value, int) and not isinstance(value, bool)
        return {"float": whole or isinstance(value, float), "int": whole, "optional-int": whole or value is None,
                "bool": isinstance(value, bool),
                "early-stopping": isinstance(value, bool) or value == "never"}[self.kind]

    def check(self, value) -> None:
        if self.rule is not None and value is not None and not self.rule.ok(value):
            raise SettingError(f"{self.name} must be {self.rule.text}, not {value!r}"
                               if isinstance(value, str) else f"{self.name} must be {self.rule.text}, not {value:g}"
                               if isinstance(value, float) else f"{self.name} must be {self.rule.text}, not {value}")

    def describe(self) -> str:
        """What the setting takes, in a few words (for /set and error messages)."""
        if self.rule is not None and self.kind in ("float", "int"):
            return f"{'a number' if self.kind == 'float' else 'an integer'} {self.rule.text}"
        if self.rule is not None:
            return self.rule.text
        return {"bool": "on or off", "early-stopping": "true, false or never", "texts": "text, or none to clear",
                "optional-int": "an integer, or none", "float": "a number"}.get(self.kind, self.kind)

    def text(self, value) -> str:
        """A value as /set takes it and /show prints it."""
        if self.kind == "bool":
            return "on" if value else "off"
        if self.kind == "early-stopping":
            return str(value).lower()
        if self.kind == "texts":
            return ", ".join(repr(text) for text in value) if value else "none"
        return "none" if value is None else str(value)


def check_fields(options) -> None:
    """Each declared field of a settings dataclass against its rule."""
    for declared in dataclasses.fields(options):
        if "setting" in declared.metadata:
            SETTINGS[declared.name].check(getattr(options, declared.name))


def _declared() -> dict[str, Setting]:
    found = {}
    for group, cls in (("sampling", SamplingOptions), ("beam", BeamOptions), ("", GenerationSettings)):
        for declared in dataclasses.fields(cls):
            if "setting" in declared.metadata:
                found[declared.name] = Setting(declared.name, group, declared.default,
                                               **declared.metadata["setting"])
    return found


SETTINGS: dict[str, Setting] = _declared()


def resolve(given: dict, model_defaults: dict | None = None) -> GenerationSettings:
    """The settings of one request: what the user gave (flags, /set, a request's fields) wins; then the model's
    generation_config.json; then the declared defaults. A model that asks for greedy decoding (do_sample false)
    gets temperature 0; a model value a setting does not take is passed over."""
    model_defaults = model_defaults or {}
    values = {}
    for name, declared in SETTINGS.items():
        if declared.model_key and model_defaults.get(declared.model_key) is not None:
            try:
                values[name] = declared.coerce(model_defaults[declared.model_key])
            except SettingError:
                continue
    if model_defaults.get("do_sample") is False:
        values["temperature"] = 0.0  # the model's authors asked for greedy decoding
    return GenerationSettings.of(**{**values, **given})


def check_quantize_choice(value: str) -> str:
    """--quantize's value, lower-cased, or a UsageError that lists the choices."""
    value = str(value).lower()
    if value not in QUANTIZE_CHOICES:
        raise UsageError(f"quantization must be one of {', '.join(QUANTIZE_CHOICES)}, not {value!r}")
    return value
