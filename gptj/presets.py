"""Presets for the classic uses, stored as data: the built-in ones ship in gptj/data/presets.json,
and users add their own as JSON files in `<config dir>/gptj/presets/` (one preset per file,
named after the file)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from gptj.sampling import SamplingParams

KINDS = ("completion", "chat")
_SETTINGS = set(SamplingParams.names()) - {"stop"}


class PresetError(ValueError):
    pass


@dataclass
class Preset:
    name: str
    description: str
    template: str
    kind: str = "completion"
    example: str = ""
    settings: dict = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    intro: str = ""
    user_name: str = "You"
    bot_name: str = "Bot"
    source: str = "built-in"

    def render(self, text: str) -> str:
        return self.template.replace("{input}", text)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def user_preset_dir() -> Path:
    base = os.environ.get("GPTJ_CONFIG_DIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "gptj"
    )
    return Path(base) / "presets"


def parse_preset(name: str, data: object, source: str) -> Preset:
    """Validates one preset; errors name the file and the field."""

    def bad(field_name: str, why: str) -> PresetError:
        return PresetError(f"{source}: preset {name!r}: field {field_name!r} {why}")

    if not isinstance(data, dict):
        raise bad("(preset)", "must be a JSON object")
    for key in ("description", "template"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise bad(key, "must be a non-empty string")
    kind = data.get("kind", "completion")
    if kind not in KINDS:
        raise bad("kind", f"must be one of {', '.join(KINDS)}")
    if kind == "completion" and "{input}" not in data["template"]:
        raise bad("template", "must contain {input}")
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise bad("settings", "must be an object")
    unknown = set(settings) - _SETTINGS
    if unknown:
        raise bad("settings", f"has unknown setting(s) {', '.join(sorted(unknown))}")
    try:
        SamplingParams(**settings).validate()
    except (TypeError, ValueError) as exc:
        raise bad("settings", f"is invalid: {exc}") from None
    stop = data.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", "must be a list of non-empty strings")
    known = set(Preset.__dataclass_fields__) - {"name", "source"}
    extra = set(data) - known
    if extra:
        raise bad(sorted(extra)[0], "is not a preset field")
    return Preset(name=name, source=source, **{k: v for k, v in data.items() if k in known})


def load_presets(user_dir: Path | None = None) -> tuple[dict[str, Preset], list[str]]:
    """All presets (user ones override built-ins of the same name) and the errors of broken
    user files, which are skipped so the others still load."""
    builtin = json.loads((Path(__file__).parent / "data" / "presets.json").read_text(encoding="utf-8"))
    presets = {name: parse_preset(name, data, "built-in") for name, data in builtin.items()}
    errors: list[str] = []
    folder = user_dir or user_preset_dir()
    if folder.is_dir():
        for f in sorted(folder.glob("*.json")):
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
                presets[f.stem] = parse_preset(f.stem, data, str(f))
            except json.JSONDecodeError as exc:
                errors.append(f"{f}: not valid JSON ({exc})")
            except (PresetError, OSError, UnicodeDecodeError) as exc:
                errors.append(str(exc))
    return presets, errors


def get_preset(name: str) -> Preset:
    presets, _ = load_presets()
    if name not in presets:
        raise PresetError(f"preset: unknown preset {name!r}; available: {', '.join(sorted(presets))}")
    return presets[name]


def apply_preset(name: str, text: str, settings: dict) -> tuple[str, dict]:
    """The prompt and settings for a completion preset; explicit settings win over the preset's."""
    preset = get_preset(name)
    merged = {**preset.settings, **settings}
    merged["stop"] = list(dict.fromkeys(preset.stop + list(settings.get("stop") or [])))
    if preset.kind == "chat":
        from gptj.chat import PlayScript

        script = PlayScript(intro=preset.intro, user_name=preset.user_name, bot_name=preset.bot_name)
        return script.prompt([("user", text)]), {**merged, "stop": merged["stop"] + script.stops()}
    return preset.render(text), merged
