"""Property tests (Hypothesis) where the inputs are open-ended: label files, workspace
files, Label Studio labeling configs, serve's request bodies, export file names, and the
trust threshold against a brute-force reading of its definition.

Each parser either returns what it was given, or refuses with the project's own error; it
never fails another way. Examples stay few (fast), with no deadline (a shared CPU).
"""

from __future__ import annotations

import asyncio
import json
import math
import string
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from labelassist.errors import ConfigError, LabelStudioError
from labelassist.labels import parse_label_text
from labelassist.labelstudio.project import config_with_choices, label_config
from labelassist.outputs.export import (NAME_BYTES, RESERVED, class_folders, parse_split,
                                        safe_name, split_of)
from labelassist.trust import audit as A
from labelassist.workspace import KEYS, load_workspace, save_workspace

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text as people type it, control characters and surrogates aside (TOML and XML carry none)
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)
NAME = TEXT.filter(lambda s: s.strip() != "")
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12)


# ---- the label file ------------------------------------------------------------------------

@FAST
@given(st.text(max_size=200))
def test_any_label_text_parses_or_is_refused_with_a_config_error(text):
    try:
        labels = parse_label_text(text)
    except ConfigError:
        return
    assert len(labels.class_names) >= 2 and all(labels.classes.values())


def toml(value) -> str:
    """A TOML string or list of strings (JSON's syntax, less its surrogate-pair escapes)."""
    return json.dumps(value, ensure_ascii=False)


@st.composite
def label_tables(draw):
    """Two to five classes, distinct whatever their case, each with its own descriptions."""
    names = draw(st.lists(NAME, min_size=2, max_size=5,
                          unique_by=lambda s: s.casefold()))
    used: set[str] = set()
    classes = {}
    for name in names:
        descs = draw(st.lists(NAME.filter(lambda d: d.strip() not in used), min_size=1,
                              max_size=3))
        used |= {d.strip() for d in descs}
        classes[name] = descs
    return classes


@FAST
@given(label_tables())
def test_a_label_file_gives_back_its_classes_in_order(classes):
    text = "[classes]\n" + "".join(f"{toml(name)} = {toml(descs)}\n"
                                   for name, descs in classes.items())
    labels = parse_label_text(text)
    assert labels.class_names == list(classes)
    for name, descs in classes.items():
        assert labels.classes[name] == tuple(dict.fromkeys(d.strip() for d in descs))


@FAST
@given(label_tables(), st.data())
def test_a_class_twice_whatever_its_case_is_refused(classes, data):
    name = data.draw(st.sampled_from(list(classes)))
    twin = name.swapcase() if name.swapcase().casefold() == name.casefold() else name
    text = "[classes]\n" + "".join(f"{toml(n)} = {toml(d)}\n" for n, d in classes.items())
    text += f"[classes.{toml(twin)}]\n" if twin == name else \
        f"{toml(twin)} = [\"something else entirely\"]\n"
    with pytest.raises(ConfigError):
        parse_label_text(text)


# ---- the workspace file --------------------------------------------------------------------

@FAST
@given(st.text(max_size=200))
def test_any_workspace_text_loads_or_is_refused_with_a_config_error(tmp_path, text):
    file = tmp_path / "labelassist.toml"
    file.write_text(text, encoding="utf-8")
    try:
        workspace = load_workspace(file)
    except ConfigError:
        return
    assert set(workspace.settings) <= set(KEYS)
    assert all(isinstance(v, str) for v in workspace.settings.values())


@FAST
@given(st.dictionaries(st.sampled_from(KEYS), TEXT.filter(lambda s: s.strip()), max_size=4))
def test_a_saved_workspace_loads_back_the_same_settings(tmp_path, settings_):
    """Values that are not absolute paths inside the folder are kept as written."""
    assume(not any(v.startswith(("/", "sqlite:///")) for v in settings_.values()))
    workspace = save_workspace(tmp_path / "ws", settings_)
    assert workspace.settings == settings_
    assert load_workspace(tmp_path / "ws" / "labelassist.toml").settings == settings_


@FAST
@given(st.lists(st.text(string.ascii_letters + string.digits + " _-", min_size=1,
                        max_size=8), min_size=1, max_size=3, unique=True))
def test_absolute_paths_inside_the_workspace_are_kept_relative(tmp_path, parts):
    folder = tmp_path / "ws"
    inside = folder.joinpath(*parts)
    workspace = save_workspace(folder, {"labels": str(inside), "db": f"sqlite:///{inside}"})
    relative = "/".join(parts)
    assert workspace.settings == {"labels": relative, "db": relative}
    assert workspace.path("labels") == inside.resolve()


# ---- the Label Studio labeling config ------------------------------------------------------

XML_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc"),
                                 blacklist_characters="\ufffe\uffff"), min_size=1, max_size=12)


def _choices_of(config: str) -> list[str]:
    import xml.etree.ElementTree as ET

    (control,) = [c for c in ET.fromstring(config).iter("Choices") if c.get("name") == "label"]
    return [c.get("value") for c in control.iter("Choice")]


CLASS_LISTS = st.lists(XML_TEXT.filter(lambda s: s.strip() == s), min_size=1, max_size=5,
                       unique=True)


@FAST
@given(CLASS_LISTS, CLASS_LISTS)
def test_the_config_we_write_holds_the_classes_and_gains_only_the_missing_ones(first, more):
    config = label_config(first)
    assert _choices_of(config) == first
    assert config_with_choices(config, first) is None  # nothing missing: left alone
    grown = config_with_choices(config, more)
    added = [c for c in more if c not in first]
    assert (grown is None) == (not added)
    if grown is not None:
        assert _choices_of(grown) == first + added
        assert config_with_choices(grown, first + more) is None


@FAST
@given(st.text(max_size=300) | st.builds(
    lambda name, choice: f'<View><Choices name="{name}" toName="image"><Choice '
                         f'value="{choice}"/></Choices></View>',
    st.sampled_from(["label", "other"]), st.text(string.ascii_letters, max_size=5)))
def test_any_config_gains_its_classes_or_is_refused_with_a_label_studio_error(config):
    try:
        grown = config_with_choices(config, ["cat", "dog"])
    except LabelStudioError:
        return
    assert grown is None or {"cat", "dog"} <= set(_choices_of(grown))


# ---- serve: predict and webhook bodies -----------------------------------------------------

def _body(raw: bytes, limit: int):
    from starlette.requests import Request

    from labelassist.serve.app import read_json

    sent = []

    async def receive():
        if sent:
            return {"type": "http.disconnect"}
        sent.append(True)
        return {"type": "http.request", "body": raw, "more_body": False}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    return asyncio.run(read_json(request, limit))


@FAST
@given(st.binary(max_size=200) | JSON_VALUE.map(lambda v: json.dumps(v).encode()))
def test_any_body_is_a_json_object_or_a_400_or_413(raw):
    from labelassist.serve.app import BadRequest

    try:
        data = _body(raw, limit=120)
    except BadRequest as exc:
        assert exc.status == (413 if len(raw) > 120 else 400)
        return
    assert isinstance(data, dict) and len(raw) <= 120
    assert data == (json.loads(raw) if raw else {})


TASK = st.fixed_dictionaries({"id": st.integers(1, 2**31 - 1)},
                             optional={"data": st.dictionaries(TEXT, TEXT, max_size=2),
                                       "project": st.just(7)})


@FAST
@given(st.dictionaries(TEXT, JSON_VALUE, max_size=3) | st.fixed_dictionaries(
    {"tasks": st.lists(TASK | JSON_VALUE, max_size=4)},
    optional={"project": st.sampled_from(["7", "7.1700000000", "8.1", "", 7, None])}))
def test_a_predict_body_is_taken_whole_or_refused_whole(data):
    from labelassist.serve.app import BadRequest, valid_tasks

    def fine(task):
        return isinstance(task, dict) and type(task.get("id")) is int \
            and isinstance(task.get("data", {}), dict) and task.get("project") in (None, 7)

    named = str(data.get("project") or "").split(".")[0]
    expected_ok = named in ("", "7") and isinstance(data.get("tasks"), list) \
        and all(fine(t) for t in data["tasks"])
    try:
        tasks = valid_tasks(data, 7)
    except BadRequest as exc:
        assert exc.status == 400 and not expected_ok
        return
    assert expected_ok and tasks is data["tasks"]


@FAST
@given(st.dictionaries(st.sampled_from(["annotations", "tasks", "action", "project"]),
                       JSON_VALUE | st.lists(st.integers(), max_size=3)
                       | st.integers(0, 6000).map(lambda n: list(range(n))), max_size=3))
def test_a_webhook_event_names_at_most_5000_ids_in_lists(data):
    from labelassist.serve.app import MAX_EVENT_IDS, BadRequest, bounded_event

    lists = [data.get("annotations"), data.get("tasks")]
    expected_ok = all(v is None or isinstance(v, list) for v in lists) and \
        sum(len(v or []) for v in lists) <= MAX_EVENT_IDS
    try:
        assert bounded_event(data) is data and expected_ok
    except BadRequest as exc:
        assert exc.status == 400 and not expected_ok


# ---- export file names ---------------------------------------------------------------------

UNSAFE = set('/\\:*?"<>|') | {chr(c) for c in range(32)} | {"\x7f"}


@FAST
@given(st.text(max_size=300), st.sampled_from(["", "-0123456789", "-0123456789-2"]))
@example("nul.tar.gz", "")  # Windows: a reserved name before the *first* dot is the device
@example("CON.jpg", "-0123456789")
def test_a_safe_name_stays_in_its_folder_and_under_the_limit(name, tag):
    safe = safe_name(name, "image", tag)
    assert safe and safe not in (".", "..") and not (set(safe) & UNSAFE)
    assert len(safe.encode()) <= NAME_BYTES
    assert safe.split(".")[0].lower() not in RESERVED
    assert not safe.startswith(".")
    stem, dot, ext = unicodedata.normalize("NFC", name).rpartition(".")
    clean_ext = dot + ext
    if stem.strip().strip(".") and 1 < len(clean_ext.encode()) <= 16 \
            and not (set(clean_ext) & UNSAFE) and clean_ext == clean_ext.strip():
        assert safe.endswith(tag + clean_ext)  # the extension survives any cut


@FAST
@given(st.lists(st.text(max_size=30), min_size=1, max_size=8, unique=True))
def test_class_folders_are_distinct_even_case_blind(labels):
    folders = class_folders(labels)
    assert set(folders) == set(labels)
    assert len({f.lower() for f in folders.values()}) == len(labels)
    assert all(f == safe_name(f) or f.startswith(safe_name(label, "unnamed"))
               for label, f in folders.items())


@FAST
@given(st.lists(st.floats(0, 1), min_size=1, max_size=3), st.text(max_size=64),
       st.integers(0, 10))
def test_a_split_is_one_of_its_names_and_the_same_every_time(fractions, sha, seed):
    total = sum(fractions)
    assume(total > 0)
    fractions = tuple(f / total for f in fractions)
    text = ",".join(repr(f) for f in fractions)
    try:
        parsed = parse_split(text)
    except ConfigError:
        assert abs(sum(fractions) - 1) > 1e-6
        return
    names = {1: ("train",), 2: ("train", "test"), 3: ("train", "validation", "test")}
    split = split_of(sha, parsed, seed)
    assert split in names[len(parsed)] and split == split_of(sha, parsed, seed)
    assert parsed[names[len(parsed)].index(split)] > 0 or math.isclose(sum(parsed), 1)


# ---- the trust threshold, against its definition -------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]),
                          st.booleans()), max_size=25),
       st.sampled_from([0.5, 0.8, 0.9, 1.0]), st.integers(1, 6))
@example([(0.5, True)] * 6, 0.5, 1)
def test_the_threshold_is_the_lowest_that_holds_on_everything_at_or_above_it(reviews, target,
                                                                           min_support):
    """Brute force: for each confidence t seen, precision and count of all reviews >= t."""
    conf = np.array([c for c, _ in reviews], dtype=float)
    ok = np.array([k for _, k in reviews], dtype=bool)
    everything = np.concatenate([conf, [0.55, 0.75, 0.99]])
    result = A.class_threshold(conf, ok, everything, target, min_support)
    holds = [t for t in sorted(set(conf.tolist()))
             if (conf >= t).sum() >= min_support and ok[conf >= t].mean() >= target]
    if not holds:
        assert result["threshold"] is None and result["reviews"] == 0
        return
    t = holds[0]
    assert result["threshold"] == t
    assert result["reviews"] == (conf >= t).sum()
    assert result["precision"] == pytest.approx(ok[conf >= t].mean())
    assert result["coverage"] == pytest.approx((everything >= t).mean())
    lo, hi = result["interval"]
    p, eps = result["precision"], 1e-12  # Wilson's bound at p = 1 is 1 - 1e-16 in floats
    assert 0 <= lo <= p + eps and p <= hi + eps and hi <= 1
