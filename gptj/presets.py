"""Presets for the classic uses, stored as data: the built-in ones ship in gptj/data/presets.json,
and users add their own as JSON files in `<config dir>/gptj/presets/` (one preset per file,
named after the file)."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from gptj.runtime.sampling import SamplingParams

KINDS = ("completion", "chat")
_SETTINGS = set(SamplingParams.names()) - {"stop"}
# A preset file is read whole and parsed before any check: its size is checked first.
MAX_PRESET_BYTES = 256 * 1024
# The longest value of each text field, in characters; names must fit the play script's "Name:" lines.
FIELD_LIMITS = {"description": 2_000, "template": 65_536, "example": 65_536, "intro": 65_536, "user_name": 40, "bot_name": 40}


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
    for key, limit in FIELD_LIMITS.items():
        value = data.get(key, "")
        if not isinstance(value, str):
            raise bad(key, "must be a string")
        if len(value) > limit:
            raise bad(key, f"is {len(value)} characters, over the limit of {limit}")
    for key in ("user_name", "bot_name"):
        if key in data and (not data[key].strip() or any(c in data[key] for c in "\n:")):
            raise bad(key, "must be a name: not empty, without ':' or a line break")
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
    if len(stop) > 16 or any(len(s) > 256 for s in stop):  # what SamplingParams accepts
        raise bad("stop", "must have at most 16 stop sequences of at most 256 characters")
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
            try:  # one bad file (whatever is wrong with it) must not take the others down
                presets[f.stem] = parse_preset(f.stem, json.loads(read_preset_file(f)), str(f))
            except json.JSONDecodeError as exc:
                errors.append(f"{f}: not valid JSON ({exc})")
            except RecursionError:
                errors.append(f"{f}: not valid JSON (nested too deep)")
            except PresetError as exc:
                errors.append(str(exc))
            except (OSError, ValueError) as exc:
                errors.append(f"{f}: {exc}")
    return presets, errors


def read_preset_file(f: Path) -> str:
    """The text of a user preset file: a regular file (a pipe would block), small enough to parse
    at once, in UTF-8."""
    info = f.stat()
    if not stat.S_ISREG(info.st_mode):
        raise PresetError(f"{f}: not a regular file")
    if info.st_size > MAX_PRESET_BYTES:
        raise PresetError(f"{f}: {info.st_size} bytes, over the limit of {MAX_PRESET_BYTES} bytes for a preset file")
    with f.open("rb") as fh:
        raw = fh.read(MAX_PRESET_BYTES + 1)  # the file may have grown since stat()
    if len(raw) > MAX_PRESET_BYTES:
        raise PresetError(f"{f}: over the limit of {MAX_PRESET_BYTES} bytes for a preset file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PresetError(f"{f}: not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x})") from None


def get_preset(name: str) -> Preset:
    presets, errors = load_presets()
    if name not in presets:
        broken = [e for e in errors if f"{os.sep}{name}.json:" in e]  # its file is there but was skipped
        if broken:
            raise PresetError(f"preset: {broken[0]}")
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
        # a chat prompt is not healed (see gptj.chat.ChatSession.prepare)
        return script.prompt([("user", text)]), {**merged, "stop": merged["stop"] + script.stops(), "token_healing": False}
    return preset.render(text), merged
