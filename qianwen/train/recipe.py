"""Recipes: TOML files of sections, one dataclass per section, and `key=value` overrides from the command line.

A recipe may hold the sections of every stage ([model], [pretrain], [sft], ...); each command reads the ones
it knows and checks their keys, so a misspelt key is an error naming the valid ones, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Sections a whole-run recipe may hold; a command reads its own and leaves the others to their stages.
SECTIONS = ("run", "model", "tokenizer", "data", "pretrain", "sft", "rm", "ppo", "eval")


def load_recipe(path: str | os.PathLike | None) -> dict:
    """The recipe file as nested dicts ({} with no file)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe {path} does not exist; pass a TOML file (see qianwen/recipes/ for examples).")
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"recipe {path} is not valid TOML ({exc}); fix the file.") from None
    unknown = sorted(set(recipe) - set(SECTIONS))
    if unknown:
        raise ValueError(f"recipe {path} has unknown section(s) {unknown}; valid sections are {list(SECTIONS)}.")
    return recipe


def parse_value(text: str) -> object:
    """A command-line value as TOML would read it (numbers, booleans, lists, quoted strings), else the text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(recipe: dict, overrides: list[str], default_section: str) -> dict:
    """`section.key=value` (or `key=value` for `default_section`) merged over the recipe."""
    merged = {name: dict(values) if isinstance(values, dict) else values for name, values in recipe.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value; write e.g. lr=3e-4 or model.hidden_size=256.")
        section, dot, name = key.strip().rpartition(".")
        section = section if dot else default_section
        if section not in SECTIONS:
            raise ValueError(
                f"override {item!r} names unknown section {section!r}; valid sections are {list(SECTIONS)}."
            )
        merged.setdefault(section, {})[name] = parse_value(value.strip())
    return merged


def build(cls: type, values: dict, section: str):
    """An instance of dataclass `cls` from a recipe section, with every key and type checked."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"[{section}] has unknown key(s) {unknown}; valid keys are {sorted(fields)}.")
    hints = typing.get_type_hints(cls)
    return cls(**{key: _check_type(value, hints[key], f"{section}.{key}") for key, value in values.items()})


def _check_type(value: object, hint: object, where: str) -> object:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) else (hint,)
    allowed = tuple(typing.get_origin(a) or a for a in allowed)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
        return value
    names = " or ".join("none" if a is type(None) else a.__name__ for a in allowed)
    raise ValueError(f"{where} must be {names}, got {value!r}; fix the recipe or the override.")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
