"""Params profiles: one shipped overlay of ``params.yaml`` per kind of model and machine.

``params.yaml`` is sized for the tiny model (the default, ``make run`` in about 5 minutes). A
profile (``profiles/<name>.yaml``) holds only the keys that differ for another model or machine:
``smollm2-135m`` runs the bundled SmolLM2-135M-Instruct on 2 CPU cores, ``gpu`` scales that up
for one CUDA GPU. ``posttrain run --profile NAME`` (or ``posttrain profile NAME``) writes the
profile's values into ``params.yaml`` in place, comments and every other key kept, exactly as
``dvc exp run --set-param`` edits it. So DVC sees ordinary param changes: ``dvc.lock`` records
what ran, ``dvc repro`` alone reproduces it, and only the stages whose keys changed re-run.

``tiny`` is the built-in way back: it sets every key that some shipped profile sets to its
default in :mod:`components.params` (which equal the shipped ``params.yaml``). A profile is
validated as a whole, applied to the current params, before anything is written; a bad key is
named by file and dotted key.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.artifacts import write_text_atomic
from components.config import ConfigError, flatten, read_params, to_dict
from components.params import Params, parse_params

PROFILES_DIR = "profiles"
DEFAULTS_PROFILE = "tiny"


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str  # the file's first comment line
    values: dict[str, Any]  # dotted key -> value


def _read_profile(path: Path) -> Profile:
    data = read_params(path)  # a YAML error names the file and line
    comments = [ln.lstrip("# ").rstrip() for ln in path.read_text().splitlines() if ln.startswith("#")]
    return Profile(path.stem, comments[0] if comments else "", flatten(data))


def shipped_profiles(root: Path | str = ".") -> dict[str, Profile]:
    """Every ``profiles/*.yaml`` under ``root``, plus the built-in ``tiny`` (the defaults), by name."""
    files = sorted(Path(root, PROFILES_DIR).glob("*.yaml"))
    profiles = {p.stem: _read_profile(p) for p in files}
    defaults = flatten(to_dict(Params()))
    touched = sorted({key for prof in profiles.values() for key in prof.values})
    profiles[DEFAULTS_PROFILE] = Profile(
        DEFAULTS_PROFILE,
        "the tiny model, the shipped params.yaml defaults (undoes the other profiles)",
        {key: defaults[key] for key in touched if key in defaults},
    )
    return profiles


def get_profile(name: str, root: Path | str = ".") -> Profile:
    profiles = shipped_profiles(root)
    if name not in profiles:
        raise ConfigError(f"--profile: unknown profile {name!r} (shipped: {', '.join(sorted(profiles))})")
    return profiles[name]


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = list(value) if isinstance(value, tuple) else value


def differences(current: Mapping[str, Any], profile: Profile) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (current value, profile value) for every key the profile would change."""
    flat = flatten(dict(current))
    out = {}
    for key, value in profile.values.items():
        want = list(value) if isinstance(value, tuple) else value
        have = flat.get(key)
        if have != want:
            out[key] = (have, want)
    return out


def matching_profiles(params_path: Path | str = "params.yaml", root: Path | str = ".") -> list[str]:
    """Names of the shipped profiles whose every value ``params_path`` already holds."""
    current = read_params(params_path)
    return [name for name, prof in shipped_profiles(root).items() if not differences(current, prof)]


def apply_profile(
    name: str, params_path: Path | str = "params.yaml", root: Path | str = "."
) -> dict[str, tuple[Any, Any]]:
    """Write profile ``name`` into ``params_path`` (round-trip: comments and order kept); the changes.

    The result is validated with :func:`components.params.parse_params` before the file is
    replaced (atomically), so a profile that would make params invalid changes nothing.
    """
    from ruamel.yaml import YAML  # DVC's own YAML library: keeps comments on a round trip

    profile = get_profile(name, root)
    path = Path(params_path)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    plain = read_params(path)
    tree = rt.load(path.read_text()) or {}
    changes = differences(plain, profile)
    if not changes:
        return {}
    for key, (_, value) in changes.items():
        _set_dotted(tree, key, value)
        _set_dotted(plain, key, value)
    try:
        parse_params(plain)
    except ConfigError as exc:
        raise ConfigError(*(f"{PROFILES_DIR}/{name}.yaml: {p}" for p in exc.problems)) from None
    buffer = io.StringIO()
    rt.dump(tree, buffer)
    text = _restore_section_comments(path.read_text(), buffer.getvalue())
    write_text_atomic(path, text)
    return changes


def _section_comments(text: str) -> dict[str, list[str]]:
    """The comment block right above each top-level key: ``{"sft": ["# sft: ..."], ...}``."""
    blocks: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            pending.append(line)
            continue
        match = re.match(r"([A-Za-z_][\w-]*):", line)
        if match:
            blocks[match.group(1)] = pending
        if line.strip() or match:
            pending = []
    return blocks


def _restore_section_comments(original: str, dumped: str) -> str:
    """Put back the comment headers of top-level sections that a round trip dropped.

    ruamel keeps a comment that follows a block sequence on the sequence's last item, so
    replacing that sequence (``modules_to_save: [...]`` -> ``[]``) would drop the header of
    the next section.
    """
    want = _section_comments(original)
    out: list[str] = []
    for line in dumped.splitlines():
        match = re.match(r"([A-Za-z_][\w-]*):", line)
        if match and want.get(match.group(1)):
            trailing = len(list(itertools.takewhile(lambda ln: ln.startswith("#"), reversed(out))))
            if out[len(out) - trailing :] != want[match.group(1)]:
                out[len(out) - trailing :] = want[match.group(1)]
        out.append(line)
    return "\n".join(out) + "\n"


def format_changes(
    name: str, changes: Mapping[str, tuple[Any, Any]], params_path: str = "params.yaml"
) -> str:
    if not changes:
        return f"{params_path} already holds profile {name}"
    lines = [f"{params_path}: profile {name} applied ({len(changes)} key(s) changed)"]
    lines += [f"  {key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()]
    return "\n".join(lines)
