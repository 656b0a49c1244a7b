"""Settings (option > env > default) and the label file."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from .errors import ConfigError

DEFAULT_DB = "sqlite:///labelassist.db"
DEFAULT_MODEL = "openai/clip-vit-base-patch32"
TOY_MODEL = "toyworld"  # the short name of the toy CLIP shipped with labelassist (cli.model_source)
DEFAULT_TEMPLATES = ("a photo of a {}.",)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

LABEL_FILE_HELP = """\
The label file is TOML. Each class maps to one or more descriptions; each
description is put into each template. A class described by its members beats a
vague description: "lion / tiger / wolf / fox" finds wild animals far better
than "wild animal".

\b
    model = "openai/clip-vit-base-patch32"   # optional: hub id or local directory
    templates = ["a photo of a {}."]          # optional; ["{}"] uses descriptions as they are
    [classes]
    cat  = ["cat"]
    dog  = ["dog"]
    wild = ["lion", "tiger", "wolf", "fox"]
"""


@dataclass(frozen=True)
class LabelSet:
    """Classes, their descriptions and the templates that turn them into prompts."""

    classes: dict[str, tuple[str, ...]]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    model: str | None = None
    source: str = field(default="<memory>", compare=False)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def descriptions(self) -> list[tuple[str, str]]:
        """(class, description) pairs in file order: the columns of the classifier."""
        return [(name, d) for name, descs in self.classes.items() for d in descs]

    def prompts_for(self, description: str) -> list[str]:
        return [t.replace("{}", description) for t in self.templates]

    def fingerprint(self, model_id: str, revision: str) -> str:
        """sha256 over everything that changes the predictions (docs/design.md, "model_version")."""
        payload = json.dumps(
            {"model": model_id, "revision": revision,
             "classes": {k: list(v) for k, v in self.classes.items()},
             "templates": list(self.templates)},
            sort_keys=True, ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_json(self) -> dict:
        return {"classes": {k: list(v) for k, v in self.classes.items()},
                "templates": list(self.templates)}

    @classmethod
    def from_json(cls, data: dict, source: str = "<database>") -> "LabelSet":
        return cls(classes={k: tuple(v) for k, v in data["classes"].items()},
                   templates=tuple(data["templates"]), source=source)


def load_label_file(path: str | Path) -> LabelSet:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"label file {path} does not exist (pass --labels FILE)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read label file {path}: {exc}") from None
    return parse_label_text(text, source=str(path))


def parse_label_text(text: str, source: str = "<labels>") -> LabelSet:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib reports a duplicate class as "Cannot overwrite a value (at line N ...)".
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None

    def fail(message: str, key: str | None = None) -> ConfigError:
        where = f"{source}, line {_line_of(text, key)}" if key and _line_of(text, key) else source
        return ConfigError(f"{where}: {message}")

    unknown = set(data) - {"model", "templates", "classes"}
    if unknown:
        key = sorted(unknown)[0]
        raise fail(f"unknown key '{key}' (expected model, templates and [classes])", key)
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise fail("'model' must be a hub id or a directory", "model")
    templates = tuple(_parse_templates(data.get("templates", list(DEFAULT_TEMPLATES)), fail))
    classes = _parse_classes(data.get("classes"), fail)
    return LabelSet(classes=classes, templates=templates, model=model, source=source)


def _parse_templates(raw, fail) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise fail("'templates' must be a non-empty list of strings with {}", "templates")
    for template in raw:
        if not isinstance(template, str) or "{}" not in template:
            raise fail(f"template {template!r} has no {{}} where the description goes", "templates")
    if len(set(raw)) != len(raw):
        raise fail("'templates' lists the same template twice", "templates")
    return raw


def _parse_classes(raw, fail) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict) or not raw:
        raise fail("no classes: add a [classes] table, e.g. cat = [\"cat\"]", "classes")
    classes: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    folded: dict[str, str] = {}
    for name, descs in raw.items():
        if not name.strip():
            raise fail("a class name is empty", name)
        if name.casefold() in folded:
            raise fail(f"class '{name}' duplicates class '{folded[name.casefold()]}'", name)
        folded[name.casefold()] = name
        if isinstance(descs, str):
            descs = [descs]
        if not isinstance(descs, list) or not descs:
            raise fail(f"class '{name}' has no description: give a list such as [\"{name}\"]", name)
        cleaned = []
        for d in descs:
            if not isinstance(d, str) or not d.strip():
                raise fail(f"class '{name}' has an empty or non-text description", name)
            d = d.strip()
            if d in owner and owner[d] != name:
                raise fail(f"description '{d}' is used by both '{owner[d]}' and '{name}'", name)
            if d not in owner:
                cleaned.append(d)
            owner[d] = name
        classes[name] = tuple(cleaned)
    if len(classes) == 1:
        (name,) = classes
        raise fail(f"only one class ('{name}'): a softmax over one class is always 1.0, "
                   f"so every image would be '{name}' with full confidence. Add the "
                   "classes to tell apart, or an \"other\" class for everything else "
                   "(e.g. other = [\"something else\"])", name)
    return classes


def _line_of(text: str, key: str | None) -> int | None:
    """The first line that assigns `key`, for error messages (tomllib keeps no positions)."""
    if not key:
        return None
    pattern = re.compile(r'^\s*(?:"%s"|\'%s\'|%s)\s*=' % ((re.escape(key),) * 3))
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line) or line.strip() == f"[{key}]":
            return number
    return None
