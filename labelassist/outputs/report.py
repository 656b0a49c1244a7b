"""Render audits: JSON (fields: docs/formats.md, "Report JSON") and one self-contained HTML file (inline SVG
charts, embedded thumbnails, no network) from templates/report.html.j2."""

from __future__ import annotations

import base64
import io
import json
import math
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from .. import __version__
from ..trust.audit import VersionAudit
from ..errors import ConfigError
from ..images import BadImage, decode, open_image, read_bytes

THUMBNAILS = 60
THUMB_SIZE = 112


def learning_sections(db) -> list[dict]:
    """What `labelassist learn` found, per stored probe: cross-validated accuracies, the
    learning curve and the human labels worth a second look (with their paths)."""
    from sqlalchemy import select

    from ..db.models import ModelVersion
    from ..db.queries import first_paths

    with db.read() as s:
        probes = s.scalars(select(ModelVersion).where(ModelVersion.kind == "probe")
                           .order_by(ModelVersion.id)).all()
        sections = []
        for probe in probes:
            info = dict(probe.label_set.get("probe", {}))
            issues = info.get("label_issues", [])
            paths = first_paths(s, [i["image_id"] for i in issues])
            info["label_issues"] = [{**i, "path": paths.get(i["image_id"])} for i in issues]
            sections.append({"model_version": probe.name, **info})
    return sections


# The report's sections beyond the audits, each a list of dicts: what `learn` found, the
# review session replayed (labelassist.trust.replay), what `suggest` found, and the images
# flagged as matching no class (labelassist.trust.outofset), and the CPU runtime that `predict
# --dtype auto` measured and chose (labelassist.predict).
# `preview` describes a version before any review (labelassist.outputs.preview).
SECTIONS = ("learning", "session", "suggestions", "out_of_set", "runtimes", "preview")


def report_json(audits: list[VersionAudit], sections: dict[str, list] | None = None) -> dict:
    """The first audit's fields at the top level (the contract), every version in
    `versions` for comparison, then each of SECTIONS (empty when not given). Before any
    review there is no audit: the previewed version and `reviewed: 0` stand at the top."""
    previews = (sections or {}).get("preview") or []
    primary = audits[0].to_json() if audits else {
        "model_version": previews[0]["model_version"] if previews else None, "reviewed": 0}
    return {**primary, "versions": [a.to_json() for a in audits],
            **{name: (sections or {}).get(name) or [] for name in SECTIONS},
            "generated_at": datetime.now(timezone.utc).isoformat(),
            "labelassist": __version__}


def write_json(audits: list[VersionAudit], path: str | Path,
               sections: dict[str, list] | None = None) -> None:
    text = json.dumps(_finite(report_json(audits, sections)), indent=2, ensure_ascii=False)
    if str(path) == "-":
        print(text)
    else:
        _write(path, text + "\n", "--json")


def _finite(value):
    """JSON has no NaN: undefined metrics (kappa of nothing) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def render_html(audits: list[VersionAudit], sections: dict[str, list] | None = None) -> str:
    sections = {name: _finite((sections or {}).get(name) or []) for name in SECTIONS}
    env = Environment(loader=FileSystemLoader(str(resources.files("labelassist._templates"))),
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True,
                      lstrip_blocks=True)
    env.filters["pct"] = lambda v: "–" if v is None or (isinstance(v, float) and
                                                       math.isnan(v)) else f"{v:.1%}"
    env.filters["num"] = lambda v, d=3: "–" if v is None or (isinstance(v, float) and
                                                             math.isnan(v)) else f"{v:.{d}f}"
    template = env.get_template("report.html.j2")
    thumbs = {d["path"]: thumbnail(d["path"]) for a in audits
              for d in a.disagreements[:THUMBNAILS] if d["path"]}
    thumbs.update({i["path"]: thumbnail(i["path"]) for section in sections["learning"]
                   for i in section.get("label_issues", [])[:THUMBNAILS] if i.get("path")})
    thumbs.update({e["path"]: thumbnail(e["path"]) for p in sections["preview"]
                   for e in p["out_of_set"]["examples"][:THUMBNAILS] if e.get("path")})
    return template.render(audits=[_finite(a.to_json()) for a in audits], thumbs=thumbs,
                           **sections, accuracy_of={a.model_version: a.accuracy for a in audits},
                           heat=heat_colour, generated=datetime.now(timezone.utc),
                           version=__version__, max_rows=THUMBNAILS)


def write_html(audits: list[VersionAudit], path: str | Path,
               sections: dict[str, list] | None = None) -> None:
    _write(path, render_html(audits, sections), "--html")


def _write(path: str | Path, text: str, flag: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {path} ({exc.strerror or exc}): check {flag}") from None


def heat_colour(value: int, row_total: int) -> str:
    share = value / row_total if row_total else 0
    return f"rgba(37, 99, 235, {0.08 + 0.85 * share:.3f})" if value else "#f8fafc"


def thumbnail(path: str) -> str | None:
    """A small JPEG as a data: URI, so the report opens offline and travels by email."""
    try:
        img = decode(open_image(read_bytes(path)), draft_size=THUMB_SIZE)
    except (BadImage, OSError):
        return None
    img.thumbnail((THUMB_SIZE, THUMB_SIZE))
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
