"""Building a run's config: defaults <- YAML presets <- `key.sub=value` overrides.

  1. the dataclass defaults (core/config.py: the embedded default, MEML-GRPO on SmolLM2-135M),
  2. YAML presets holding only overrides (`src/meml/presets/NAME.yaml` or a path), joined
     with "+" and applied left to right,
  3. `key.sub=value` overrides from the command line.
OmegaConf does the merging and type checking; an unknown key is rejected with the closest
valid name; `validate` (core/validation.py) checks the values. A key that was renamed keeps
its old name as a deprecated alias (RENAMED): it still works, with a warning.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from meml.core.config import Config
from meml.core.errors import ConfigError
from meml.core.validation import validate

log = logging.getLogger("meml")

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"

# old key -> new key. `batch_size` meant three things in three sections.
RENAMED = {
    "rollout.batch_size": "rollout.sequences_per_generate",
    "eval.batch_size": "eval.questions_per_batch",
    "sft.batch_size": "sft.sequences_per_step",
}


def renamed(key: str, origin: str) -> str:
    """The current name of a key, with a warning when an old one was used."""
    if key in RENAMED:
        log.warning("%s: '%s' is a deprecated name; use '%s'", origin, key, RENAMED[key])
        return RENAMED[key]
    return key


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = PRESET_DIR / f"{preset}.yaml"
    if path.exists():
        return path
    close = difflib.get_close_matches(preset, list_presets(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown preset '{preset}'.{hint} Presets: {', '.join(list_presets())}")


def _read_preset(path: Path) -> Any:
    """A preset file's YAML; a syntax error names the file, line and column."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _apply(cfg: Any, key: str, value: Any, origin: str) -> None:
    try:
        if any(part.isdigit() for part in key.split(".")):
            OmegaConf.update(cfg, key, value, merge=True)  # experts.0.name=...: index into a list
        else:
            nested: Any = value
            for part in reversed(key.split(".")):
                nested = {part: nested}
            cfg.merge_with(nested)  # type-checked against the dataclasses; lists are replaced
    except OmegaConfBaseException as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{origin}: cannot set '{key}': {first}") from None


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        # experts and options are replaced or merged as a whole, not key by key
        if isinstance(v, dict) and key not in ("task.options",) and v:
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- preset YAML(s) <- `key=value` overrides; type-checked and validated.

    `preset` may join several with "+", applied left to right, e.g. "task_gsm8k+grpo".
    """
    cfg = OmegaConf.structured(Config)
    for name in preset.split("+") if preset else []:
        path = _preset_path(name)
        data = _read_preset(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a preset must be a mapping of overrides")
        for key, value in _flatten(data):
            _apply(cfg, renamed(key, str(path)), value, origin=str(path))
    for text in overrides:
        key, value = _parse_override(text)
        origin = f"override '{text}'"
        _apply(cfg, renamed(key, origin), value, origin=origin)
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj)
    return obj


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def from_dict(data: dict) -> Config:
    """Rebuild a Config saved with a run (type-checked like any other source); keys saved
    under an old name are read under the new one."""
    data = upgrade_keys(data)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj)
    return obj


def upgrade_keys(data: dict) -> dict:
    """A saved config's keys under their current names (RENAMED)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in RENAMED.items():
        (section, old_key), (_, new_key) = old.split("."), new.split(".")
        if isinstance(out.get(section), dict) and old_key in out[section]:
            out[section].setdefault(new_key, out[section].pop(old_key))
    return out
