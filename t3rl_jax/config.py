"""Run configuration: named presets in `configs/NAME.py`, dotted overrides, validation, freezing.

    cfg = load_config("stage2", ["train.lr=2e-6", "dry_run=True"])
    cfg, rest = config_from_argv(["--config=stage2", "--config.train.lr=2e-6"])

A preset is a module with `get_config() -> ml_collections.ConfigDict` (a path to such a .py file
works too). Every preset has exactly the keys in `SCHEMA`; other code relies on those names. An
unknown key, a wrong type or an out-of-range value stops with a `ConfigError` naming the key. The
result is an immutable `FrozenConfigDict`.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import numbers
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from t3rl_jax.config_checks import SCHEMA, ConfigError, validate

__all__ = [
    "SCHEMA",
    "ConfigError",
    "available_presets",
    "config_from_argv",
    "export_dir",
    "load_config",
    "parse_config_args",
    "preset_config",
    "validate",
]

PRESETS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
# Fields whose value may be None; ml_collections cannot tell their type from a None value.
NULLABLE = {"model.vocab_size": int}
# Item types of sequence fields whose default may be empty (nothing to read the type from).
ITEM_TYPES = {"rollout.slot_classes": tuple}
EXPORT_SUBDIR = "hf_export"
_PRESET_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def export_dir(workdir: str) -> str:
    """Where a run in `workdir` writes its Hugging Face export; a later stage's `init_from`."""
    return f"{workdir.rstrip('/')}/{EXPORT_SUBDIR}"


def available_presets() -> list[str]:
    """Names of the modules in configs/ that define get_config()."""
    names = []
    for path in sorted(PRESETS_DIR.glob("*.py")):
        if path.stem != "__init__" and "def get_config(" in path.read_text():
            names.append(path.stem)
    return names


def preset_config(name: str) -> ml_collections.ConfigDict:
    """The unvalidated ConfigDict of preset `name` (or of a .py file path)."""
    if name.endswith(".py"):
        path = pathlib.Path(name)
        if not path.is_file():
            raise ConfigError(f"config file {name!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"_t3rl_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if not _PRESET_NAME.match(name) or name not in available_presets():
            raise ConfigError(f"unknown config preset {name!r}; available: {', '.join(available_presets())}")
        module = importlib.import_module(f"configs.{name}")
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {name!r} has no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"config {name!r}: get_config() returned {type(cfg).__name__}, not a ConfigDict")
    return cfg


def _resolve(cfg: ml_collections.ConfigDict, key: str):
    """(section holding the leaf, leaf name) for dotted `key`, or ConfigError naming it."""
    parts = key.split(".")
    section = cfg
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the top level"
        if not isinstance(section, ml_collections.ConfigDict) or part not in section:
            known = sorted(section.keys()) if isinstance(section, ml_collections.ConfigDict) else []
            hint = difflib.get_close_matches(part, known, n=1)
            suggestion = f"; did you mean {'.'.join(parts[:depth] + hint)!r}?" if hint else ""
            raise ConfigError(f"unknown config key {key!r} (keys at {where}: {', '.join(known)}){suggestion}")
        if depth < len(parts) - 1:
            section = section[part]
    if isinstance(section[parts[-1]], ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a section; override one of its fields instead")
    return section, parts[-1]


def _expected_type(key: str, current: Any) -> type:
    if current is None:
        return NULLABLE.get(key, type(None))
    return type(current)


def _parse_text(key: str, text: str, expected: type, current: Any) -> Any:
    """Turn command-line text into a value of the field's type."""
    text = text.strip()
    if text in ("None", "none", "null") and key in NULLABLE:
        return None
    try:
        if expected is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if expected is int:
            return int(text)
        if expected is float:
            return float(text)
        if expected in (tuple, list):
            if text[:1] in "[(":
                items = ast.literal_eval(text)
            else:
                items = [item.strip() for item in text.split(",") if item.strip()]
            return _coerce(key, items, expected, current)
    except (ValueError, SyntaxError):
        raise ConfigError(f"config key {key!r}: expected {expected.__name__}, got {text!r}") from None
    if expected is str:
        return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text
    raise ConfigError(f"config key {key!r}: cannot override a field of type {expected.__name__} from text")


def _coerce(key: str, value: Any, expected: type, current: Any) -> Any:
    """Check a Python value against the field's type (int is accepted where float is expected)."""
    if value is None:
        if key in NULLABLE:
            return None
        raise ConfigError(f"config key {key!r}: None is not allowed (expected {expected.__name__})")
    wrong_type = ConfigError(
        f"config key {key!r}: expected {expected.__name__}, got {value!r} ({type(value).__name__})"
    )
    if isinstance(value, bool) or expected is bool:
        if not (isinstance(value, bool) and expected is bool):
            raise wrong_type
        return value
    if expected is int and isinstance(value, numbers.Integral):
        return int(value)
    if expected is float and isinstance(value, numbers.Real):
        return float(value)
    if expected in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"config key {key!r}: expected a sequence, got {value!r}")
        item_type = ITEM_TYPES.get(key) or (type(current[0]) if current else str)
        if item_type is tuple:  # nested pairs typed as lists, e.g. [[112, 16384], [16, 49152]]
            value = [tuple(item) if isinstance(item, list) else item for item in value]
        bad = [item for item in value if not isinstance(item, item_type)]
        if bad:
            raise ConfigError(f"config key {key!r}: items must be {item_type.__name__}, got {bad[0]!r}")
        return expected(value)
    if type(value) is not expected:
        raise wrong_type
    return value


def apply_override(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Set dotted `key` in place; `value` is command-line text (str) or a typed Python value."""
    section, leaf = _resolve(cfg, key)
    current = section[leaf]
    expected = _expected_type(key, current)
    if isinstance(value, str):
        value = _parse_text(key, value, expected, current)
    else:
        value = _coerce(key, value, expected, current)
    section[leaf] = value


def _as_pairs(overrides: Mapping[str, Any] | Iterable[str] | Iterable[tuple[str, Any]]):
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    pairs = []
    for item in overrides:
        if isinstance(item, str):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            pairs.append((key.strip(), value))
        else:
            pairs.append(tuple(item))
    return pairs


def load_config(
    name: str, overrides: Mapping[str, Any] | Iterable[str] | Iterable[tuple[str, Any]] = ()
) -> ml_collections.FrozenConfigDict:
    """Preset `name` with `overrides` applied in order, validated and frozen.

    Overrides are 'a.b=text' strings, (key, value) pairs or a {key: value} mapping.
    """
    cfg = preset_config(name)
    cfg.lock()
    for key, value in _as_pairs(overrides):
        apply_override(cfg, key, value)
    validate(cfg, known_presets=available_presets())
    return ml_collections.FrozenConfigDict(cfg)


def parse_config_args(argv: Sequence[str], *, default: str | None = None):
    """Split argv into (preset name, ['key=value', ...], remaining args).

    Accepts --config=NAME / --config NAME and --config.KEY=VALUE / --config.KEY VALUE.
    """
    name, overrides, rest = default, [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" or arg.startswith("--config=") or arg.startswith("--config."):
            flag, sep, value = arg.partition("=")
            if not sep:
                if i + 1 >= len(args):
                    raise ConfigError(f"flag {flag} needs a value")
                value = args[i + 1]
                i += 1
            if flag == "--config":
                name = value
            else:
                overrides.append(f"{flag[len('--config.'):]}={value}")
        else:
            rest.append(arg)
        i += 1
    if name is None:
        raise ConfigError(f"no --config=NAME given; available: {', '.join(available_presets())}")
    return name, overrides, rest


def config_from_argv(argv: Sequence[str], *, default: str | None = None):
    """(frozen config, remaining args) from command-line arguments."""
    name, overrides, rest = parse_config_args(argv, default=default)
    return load_config(name, overrides), rest
