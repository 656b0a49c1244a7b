"""The formats other tools rely on are documented in docs/formats.md (from "Prediction
records" on): every field that labelassist writes must be listed there, in backticks."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from labelassist.cli import app

FORMATS = Path(__file__).parent.parent / "docs" / "formats.md"


def documented() -> set[str]:
    text = FORMATS.read_text()
    section = text[text.index("## Prediction records"):]
    return set(re.findall(r"`([A-Za-z_0-9]+)`", section))


def keys(value, into: set[str]) -> set[str]:
    """Field names, recursively, except the keys of per-class maps (class names)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "per_class" and isinstance(inner, dict):
                for per in inner.values():
                    keys(per, into)
                into.add(key)
                continue
            if key == "scores" or key == "learning":
                into.add(key)  # class names inside; learn's own record is its own story
                continue
            into.add(key)
            keys(inner, into)
    elif isinstance(value, list):
        for item in value:
            keys(item, into)
    return into


def test_every_written_field_is_documented(reviewed_db, db_url, tmp_path):
    runner = CliRunner()
    report = runner.invoke(app, ["report", "--db", db_url, "--json", str(tmp_path / "r.json"),
                                 "--min-support", "2", "--target-precision", "0.9"])
    assert report.exit_code == 0, report.output
    written = keys(json.loads((tmp_path / "r.json").read_text()), set())

    records = runner.invoke(app, ["predictions", "--db", db_url])
    assert records.exit_code == 0
    for line in records.stdout.splitlines()[:3]:
        written |= keys(json.loads(line), set())

    assert runner.invoke(app, ["export", str(tmp_path / "out"), "--db", db_url]).exit_code == 0
    for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[:3]:
        written |= keys(json.loads(line), set())

    assert len(written) > 40
    assert sorted(written - documented()) == []
