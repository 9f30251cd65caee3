"""Stage constants and typed KEY=VALUE command-line overrides (in the spirit of nanoGPT's configurator).

A stage script defines its constants as UPPER_CASE module globals between `# ---` rulers, then calls
`parse_overrides(constants(globals()), argv)`. Only keys that already exist can be overridden, each value
is parsed and checked against the type of the default, and every override is printed. Unknown keys and
wrong types are refused with a message that lists what is allowed.

Two constants read the environment so that `make` and CI can steer every stage at once:
`PRESET` (minilm | bert) and `QUICK` (1 = tiny slice, one epoch).

Values are then checked against rules (`check_constants`), before a stage loads anything: the shared `RULES`
for the keys several stages have (EPOCHS, LR, BATCH_SIZE, MAX_LENGTH, SEED, ...) plus a stage's own table.
A value that cannot give a useful run (EPOCHS=0, LR=0, BATCH_SIZE=0, TRAIN_LIMIT=-5) is refused in one line
naming the key and the range it must lie in.
"""

import ast
import os
from types import SimpleNamespace
from typing import Callable, NamedTuple

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


RULER = "# ---"


def block_names(path) -> list:
    """The names a stage script assigns between its first two `# ---` ruler lines: its constants block."""
    source = open(path, encoding="utf-8").read()
    rulers = [i for i, line in enumerate(source.splitlines(), 1) if line.startswith(RULER)][:2]
    if len(rulers) < 2:
        return []
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and rulers[0] < node.lineno < rulers[1]:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def constants(namespace: dict) -> dict:
    """A stage script's tweakable constants: the UPPER_CASE names assigned in its own constants block (between
    the first two `# ---` rulers of the file named by `namespace["__file__"]`), so names it imports (SEQ_LEN,
    a module imported as F) never become settable keys. Without a file: every UPPER_CASE name of the namespace.

    Dict-valued names (DEFAULTS_FOR) are tables of defaults, not settable constants."""
    path = namespace.get("__file__")
    names = block_names(path) if path and os.path.isfile(path) else list(namespace)
    return {k: namespace[k] for k in names
            if k in namespace and k.isupper() and not k.startswith("_") and not isinstance(namespace[k], dict)}


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

    `cfg.OVERRIDDEN` holds the set of keys the user set explicitly, so the defaults by situation
    (`apply_defaults`) never undo what the user asked for.
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


def apply_defaults(cfg: SimpleNamespace, table: dict) -> None:
    """A stage's defaults by situation, `DEFAULTS_FOR` = {"bert": {...}, "quick": {...}, "quick frontier": {...}}:
    each entry whose words all hold (a preset name: cfg.PRESET is it; "quick" / "frontier": cfg.QUICK / cfg.FRONTIER
    is true) sets its values, in the table's order (later entries win), for every key the user did not override on
    the command line."""
    for situation, values in table.items():
        holds = all(cfg.PRESET == word if word in PRESETS else bool(getattr(cfg, word.upper()))
                    for word in situation.split())
        for key, value in values.items() if holds else ():
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


# -----------------------------------------------------------------------------
# Rules: what a constant must be for the run to be worth doing


class Rule(NamedTuple):
    """`ok(value)` is True for an acceptable value; `text` says what is acceptable (used in the error)."""

    ok: Callable
    text: str


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def at_least(minimum, what: str = "") -> Rule:
    """An integer (or, for a float minimum, a number) >= minimum."""
    kind = int if isinstance(minimum, int) else (int, float)
    name = "an integer" if kind is int else "a number"
    return Rule(lambda v: _number(v) and isinstance(v, kind) and v >= minimum,
                f"{name} >= {minimum}" + (f" ({what})" if what else ""))


def in_range(low, high, low_open: bool = False, high_open: bool = False, what: str = "") -> Rule:
    """A number between low and high; `*_open` excludes that end ((0, 1) vs [0, 1])."""
    def ok(v):
        return (_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high))

    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return Rule(ok, f"a number in {interval}" + (f" ({what})" if what else ""))


def int_range(low: int, high: int, what: str = "") -> Rule:
    return Rule(lambda v: _number(v) and isinstance(v, int) and low <= v <= high,
                f"an integer from {low} to {high}" + (f" ({what})" if what else ""))


def one_of(*allowed) -> Rule:
    return Rule(lambda v: v in allowed, "one of " + ", ".join(repr(a) for a in allowed))


def each(rule: Rule, empty_ok: bool = False, distinct: bool = False) -> Rule:
    """A tuple whose every element passes `rule` (non-empty unless `empty_ok`; no repeats if `distinct`)."""
    def ok(v):
        return (isinstance(v, (tuple, list)) and (empty_ok or len(v) > 0) and all(rule.ok(x) for x in v)
                and (not distinct or len(set(v)) == len(v)))

    text = f"a {'' if empty_ok else 'non-empty '}tuple of {'distinct ' if distinct else ''}values, each {rule.text}"
    return Rule(ok, text)


LEARNING_RATE = in_range(0, 1, low_open=True, high_open=True, what="a learning rate, e.g. 1e-4")

# Keys several stages share, with the same meaning everywhere. A stage adds its own keys (check_constants).
RULES = {
    "SEED": int_range(0, 2**32 - 1, "a random seed"),
    "SEEDS": each(int_range(0, 2**32 - 1, "a random seed"), empty_ok=True, distinct=True),
    "EPOCHS": at_least(1, "training epochs"),
    "LR": LEARNING_RATE,
    "BATCH_SIZE": at_least(1, "sentences per training batch"),
    "EVAL_BATCH_SIZE": at_least(1, "sentences per evaluation batch"),
    "WEIGHT_DECAY": in_range(0, 1, high_open=True, what="AdamW weight decay, e.g. 0.01"),
    "WARMUP_RATIO": in_range(0, 1, high_open=True, what="fraction of the steps spent warming up, e.g. 0.06"),
    "EVALS_PER_EPOCH": at_least(1, "held-out checks per epoch"),
    "MAX_LENGTH": int_range(8, 512, "tokens per sentence; BERT's position limit is 512, SST-2 fits in 128"),
    "TRAIN_LIMIT": at_least(0, "training sentences; 0 = all"),
    "TEMPERATURE": in_range(0, 100, low_open=True, what="softmax temperature of the soft targets, e.g. 2.0"),
    "ALPHA": in_range(0, 1, what="weight of the soft-target loss"),
}


def check_constants(cfg: SimpleNamespace, rules: dict = None) -> None:
    """Refuse (ConfigError, one line naming the key and its range) the first constant of `cfg` that breaks its
    rule: the shared RULES for every key the stage has, then the stage's own `rules` ({KEY: Rule})."""
    table = {key: rule for key, rule in RULES.items() if hasattr(cfg, key)}
    table.update(rules or {})
    for key, rule in table.items():
        require(cfg, key, rule)


def require(cfg: SimpleNamespace, key: str, rule: Rule) -> None:
    """One rule for one constant: ConfigError `KEY=value: must be <rule text>` when it fails."""
    value = getattr(cfg, key)
    try:
        ok = rule.ok(value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{key}={value!r}: must be {rule.text}")
