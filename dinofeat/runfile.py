"""A run's options from a TOML file (`dinofeat precompute --config run.toml`): what a SLURM script or a repository keeps
instead of a long command line. TOML because Python reads it without a new dependency (tomllib) and pyproject.toml
made it the ecosystem's config format.

The spelling rule: a key is the command-line option's name without its dashes (`--shard-mb` -> `shard-mb`),
underscores accepted for dashes (`shard_mb`), plus `source` and `cache` for the two arguments. Values have the
option's type; an unknown key or a wrong type is refused in one line naming the key, before any work. Which
value wins (the command line over the file) is the caller's: it passes these as defaults."""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinofeat.errors import ConfigError


@dataclass(frozen=True)
class FileOption:
    """One option a file may set: the key as the command line spells it, the parameter it fills, its value type."""

    key: str  # "shard-mb"
    name: str  # "shard_mb"
    kind: type  # bool, int, float or str


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


# what a file may not hold: actions for one run (a rerun of the same file must resume, never start over, prune or
# repair again: `overwrite = true` would delete a crashed run's finished work) and what differs per process
COMMAND_LINE_ONLY = {
    "overwrite": "an action for one run (a rerun of the same file would delete the finished work)",
    "dry-run": "an action for one run",
    "repair": "an action for one run",
    "prune": "an action for one run",
    "rank": "different for each process of a split",
    "world-size": "part of a manual split, given with --rank",
}


def read_options(path: str | Path, known: Mapping[str, FileOption]) -> dict[str, Any]:
    """The options a TOML file sets, as {parameter name: value}. `known` maps each key (dashed) to its option."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    return options_from(doc, known, str(path))


def options_from(doc: Mapping[str, Any], known: Mapping[str, FileOption], where: str) -> dict[str, Any]:
    """{parameter name: value} for a parsed file `doc`: keys spelled as the command line spells them, values checked
    against each option's type; `where` names the file in errors."""
    out: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for raw, value in doc.items():
        key = raw.replace("_", "-")
        if key in COMMAND_LINE_ONLY and key in known:
            raise ConfigError(f"{where}: {raw!r} is {COMMAND_LINE_ONLY[key]}: give --{key} on the command line")
        option = known.get(key)
        if option is None:
            near = difflib.get_close_matches(key, list(known), n=2, cutoff=0.7)
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            raise ConfigError(f"{where}: unknown option {raw!r}; {hint}(known: {', '.join(sorted(known))})")
        if key in seen:
            raise ConfigError(f"{where}: {raw!r} and {seen[key]!r} set the same option; keep one")
        seen[key] = raw
        out[option.name] = _checked(raw, value, option.kind, where)
    return out


def _checked(key: str, value: Any, kind: type, where: str) -> Any:
    """`value` when it has type `kind` (an integer is a number too; a bool is no number), else ConfigError."""
    fits = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not fits:
        got = f"{value!r} ({type(value).__name__})" if not isinstance(value, dict) else "a table"
        raise ConfigError(f"{where}: {key} must be {_KINDS[kind]}, got {got}")
    return value
