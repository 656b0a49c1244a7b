"""Progress where people read it: in a log or a pipe (CI, nohup, a scheduler) a long
command prints a plain line every few seconds instead of minutes of silence, and
`--quiet` turns progress off for scripts while summaries and errors still print."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from labelassist.cli import LogLines, app, err, format_seconds

runner = CliRunner()
LINE = re.compile(r"^predict: (\d+)/24 images \(\d+%\), [\d.,]+ images/s(, about \d+ s left)?$")


def run_lines(args, env):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_a_log_gets_plain_progress_lines_and_quiet_gets_none(tmp_path, photo_dir, labels_file,
                                                             tiny_clip_dir):
    args = ["run", photo_dir, "--labels", labels_file, "--model", tiny_clip_dir,
            "--batch-size", 4, "--db", f"sqlite:///{tmp_path / 'a.db'}"]

    lines = run_lines(args, {"LABELASSIST_PROGRESS_EVERY": "0"})

    progress = [line for line in lines if line.startswith("predict: ")]
    assert len(progress) >= 4, lines  # one per batch after the first, with every=0
    assert all(LINE.match(line) for line in progress), progress
    assert [int(LINE.match(line)[1]) for line in progress] == sorted(
        int(LINE.match(line)[1]) for line in progress)
    assert not any("\x1b[" in line for line in lines)  # no terminal escapes in a log
    assert any("24 predicted" in line for line in lines)

    args[-1] = f"sqlite:///{tmp_path / 'b.db'}"
    quiet = run_lines(["--quiet", *args], {"LABELASSIST_PROGRESS_EVERY": "0"})
    assert not [line for line in quiet if line.startswith(("predict: ", "ingest: "))], quiet
    assert any("24 predicted" in line for line in quiet)  # the summary stays


def test_lines_are_spaced_by_the_interval_and_say_what_is_left(capsys):
    every_hour = LogLines("push", "tasks", every=3600)
    for done in range(0, 1000, 100):
        every_hour(done, 1000)
    assert capsys.readouterr().err == ""  # the first call starts the clock; then 1 h apart

    each_call = LogLines("export", "files", every=0)
    each_call(0, 0)
    each_call(10, 0)   # total unknown yet
    each_call(50, 100)
    lines = capsys.readouterr().err.splitlines()
    assert err.is_terminal is False
    assert re.fullmatch(r"export: 10 files, [\d.,]+ files/s", lines[0]), lines
    assert re.fullmatch(r"export: 50/100 files \(50%\), [\d.,]+ files/s, about .+ left",
                        lines[1]), lines
    assert [format_seconds(s) for s in (0.4, 89, 90, 3725, 5400, 90061)] == [
        "0 s", "89 s", "1 min 30 s", "62 min 05 s", "1 h 30 min", "25 h 01 min"]


def test_predict_workers_progress_counts_the_version_being_predicted(tmp_path, photo_dir,
                                                                    labels_file, tiny_clip_dir):
    """What `predict --workers N` draws each second: (predicted, all usable images) of the
    version for this model and prompt set, once a worker has registered it."""
    from labelassist.labels import load_label_file
    from labelassist.db import open_database
    from labelassist.db.status import progress_of

    db_url = f"sqlite:///{tmp_path / 'p.db'}"
    label_set = load_label_file(labels_file).to_json()
    assert runner.invoke(app, ["ingest", str(photo_dir), "--db", db_url]).exit_code == 0
    db = open_database(db_url)
    assert progress_of(db, str(tiny_clip_dir), label_set) is None  # nothing registered yet

    run_lines(["predict", "--labels", labels_file, "--model", tiny_clip_dir, "--db", db_url],
              {})

    assert progress_of(db, str(tiny_clip_dir), label_set) == (24, 24)
    other = {**label_set, "templates": ["{}"]}
    assert progress_of(db, str(tiny_clip_dir), other) is None


def test_a_bar_that_fills_in_one_update_shows_its_rate_not_zero():
    """A small ingest reports its progress once, at the end: rich's speed, estimated from
    the gaps between updates, has none, and the finished bar read "0.0 files/s"."""
    from rich.progress import Progress

    from labelassist.cli import RateColumn

    now = [0.0]
    progress = Progress(RateColumn(), get_time=lambda: now[0], disable=True)
    task_id = progress.add_task("ingest", total=None, unit="files")
    now[0] = 2.0
    progress.update(task_id, completed=300, total=300)
    assert str(RateColumn().render(progress.tasks[0])) == "150.0 files/s"
