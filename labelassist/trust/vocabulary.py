"""The words suggest may propose as class descriptions: a file of one description a
line, or a shipped vocabulary (ImageNet's class names for photos, the toy world's colours
and shapes for the toy model)."""

from __future__ import annotations

import ast
from pathlib import Path

from ..errors import ConfigError


def load_vocabulary(spec: str | None, model_id: str) -> list[str]:
    """A file (one description a line), or a shipped vocabulary: 'imagenet' (the 1,000
    ImageNet class names, for photos) or 'toyworld'. Default: toyworld for the toy model,
    else imagenet."""
    if spec is None:
        spec = "toyworld" if Path(model_id.rstrip("/")).name.startswith("toyworld") \
            else "imagenet"
    if spec == "toyworld":
        from ..toy.pictures import COLOURS, SHAPES

        return [*COLOURS, *SHAPES]
    if spec == "imagenet":
        return imagenet_class_names()
    path = Path(spec)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"--vocabulary {spec}: no such file (or use imagenet or "
                          "toyworld)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--vocabulary {spec}: cannot read it ({exc})") from None
    words = [w.strip() for w in lines if w.strip() and not w.lstrip().startswith("#")]
    if not words:
        raise ConfigError(f"--vocabulary {spec} has no descriptions (one a line)")
    return words


def imagenet_class_names() -> list[str]:
    """The ImageNet class names that open_clip's wheel ships, read without importing it."""
    from importlib.util import find_spec

    spec = find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the imagenet vocabulary comes with open_clip_torch: "
                          "pip install --no-deps open_clip_torch, or pass --vocabulary FILE")
    source = Path(spec.submodule_search_locations[0]) / "zero_shot_metadata.py"
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "IMAGENET_CLASSNAMES"
                                                for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise ConfigError(f"no IMAGENET_CLASSNAMES in {source}: pass --vocabulary FILE")
