"""Stage constants and typed KEY=VALUE command-line overrides (in the spirit of nanoGPT's configurator).

A stage script defines its constants as UPPER_CASE module globals between `# ---` rulers, then calls
`parse_overrides(constants(globals()), argv)`. Only keys that already exist can be overridden, each value
is parsed and checked against the type of the default, and every override is printed. Unknown keys and
wrong types are refused with a message that lists what is allowed.

Two constants read the environment so that `make` and CI can steer every stage at once:
`PRESET` (minilm | bert) and `QUICK` (1 = tiny slice, one epoch).
"""

import ast
import os
from types import SimpleNamespace

PRESETS = ("minilm", "bert")


class ConfigError(ValueError):
    """A bad command-line override or environment setting; the message says how to fix it."""


def env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"environment variable {name}={value!r}: use 1 or 0")


def env_preset() -> str:
    preset = os.environ.get("PRESET", "minilm") or "minilm"
    if preset not in PRESETS:
        raise ConfigError(f"PRESET={preset!r} is not a preset; use one of: {', '.join(PRESETS)}")
    return preset


def constants(namespace: dict) -> dict:
    """The UPPER_CASE names of a module namespace: a stage script's tweakable constants.

    Dict-valued names (QUICK_VALUES, PRESET_VALUES) are tables of defaults, not settable constants."""
    return {k: v for k, v in namespace.items()
            if k.isupper() and not k.startswith("_") and not isinstance(v, dict)}


def _parse_value(key: str, text: str, default):
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (True/False)")
    if isinstance(default, str) or default is None:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"{key}={text!r}: not a valid {type(default).__name__} literal") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (int, float)):
        value = (value,)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        value = type(default)(value)
    if not isinstance(value, type(default)) or (isinstance(value, bool) and not isinstance(default, bool)):
        raise ConfigError(
            f"{key}={text!r}: expected {type(default).__name__} (default {default!r}), got {type(value).__name__}"
        )
    return value


def parse_overrides(defaults: dict, argv, quiet: bool = False) -> SimpleNamespace:
    """Apply `KEY=VALUE` arguments to a copy of `defaults`; return the constants as a namespace.

    `cfg.OVERRIDDEN` holds the set of keys the user set explicitly, so quick-run adjustments
    (`apply_quick`) never undo what the user asked for.
    """
    values = dict(defaults)
    overridden = set()
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not KEY=VALUE; settable keys: {', '.join(sorted(defaults))}")
        key, text = arg.split("=", 1)
        key = key.strip().lstrip("-").upper()
        if key not in defaults:
            raise ConfigError(f"unknown key {key!r}; settable keys: {', '.join(sorted(defaults))}")
        values[key] = _parse_value(key, text, defaults[key])
        overridden.add(key)
        if not quiet:
            print(f"override: {key} = {values[key]!r}")
    if "PRESET" in values and values["PRESET"] not in PRESETS:
        raise ConfigError(f"PRESET={values['PRESET']!r} is not a preset; use one of: {', '.join(PRESETS)}")
    cfg = SimpleNamespace(**values)
    cfg.OVERRIDDEN = overridden
    return cfg


def apply_quick(cfg: SimpleNamespace, **quick_values) -> None:
    """When cfg.QUICK is set, use the quick-run values for every key the user did not override."""
    if not getattr(cfg, "QUICK", False):
        return
    for key, value in quick_values.items():
        if key not in cfg.OVERRIDDEN:
            setattr(cfg, key, value)


def apply_preset(cfg: SimpleNamespace, preset_values: dict) -> None:
    """Per-preset defaults ({"bert": {"LR": 2e-5}}) for every key the user did not override."""
    for key, value in preset_values.get(cfg.PRESET, {}).items():
        if key not in cfg.OVERRIDDEN:
            setattr(cfg, key, value)


def as_dict(cfg: SimpleNamespace) -> dict:
    """The constants as JSON-ready values, for metadata.json."""
    out = {}
    for key, value in sorted(vars(cfg).items()):
        if key == "OVERRIDDEN":
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out
