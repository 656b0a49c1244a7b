"""One workspace: a `labelassist.toml` found by walking up from the current folder, like
git, so that the commands after `init` (or after the demo) need no --db, --labels or
--model; and read-only commands never leave a stray empty database behind."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from labelassist.cli import app

runner = CliRunner()

BARE_ENV = {"LABELASSIST_DB": None, "LABELASSIST_MODEL": None, "LABEL_STUDIO_URL": None,
            "LABEL_STUDIO_API_KEY": None, "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": None}


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env={**BARE_ENV, **(env or {})})


def one_line_error(result, message):
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"error: {message}", result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                     SystemExit)


@pytest.mark.parametrize("args", [["status"], ["predictions"], ["report"], ["push"],
                                  ["pull"], ["learn"], ["accept"], ["export", "out"]])
def test_a_command_that_reads_the_ledger_never_creates_an_empty_one(tmp_path, monkeypatch,
                                                                    args):
    """Before: `status` in the wrong folder created labelassist.db and said '0 files'."""
    monkeypatch.chdir(tmp_path)

    result = invoke(*args)

    one_line_error(result, f"no labelassist database at {tmp_path / 'labelassist.db'}: run "
                   "`labelassist ingest FOLDER` (or `run`) to make one, pass --db, or work "
                   "inside a workspace (`labelassist init`)")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even -wal or -shm


def test_init_makes_a_workspace_that_later_commands_find_by_walking_up(
        tmp_path, monkeypatch, tiny_clip_dir, labels_file, photo_dir):
    ws = tmp_path / "project"

    made = invoke("init", ws, "--labels", labels_file, "--model", tiny_clip_dir)

    assert made.exit_code == 0, made.output
    text = (ws / "labelassist.toml").read_text()
    assert 'db = "labelassist.db"' in text and 'root = "."' in text
    assert f'labels = "{labels_file}"' in text and f'model = "{tiny_clip_dir}"' in text
    assert not (ws / "labelassist.db").exists()  # ingest makes the database, not init

    (ws / "deep" / "er").mkdir(parents=True)
    monkeypatch.chdir(ws / "deep" / "er")
    ran = invoke("run", photo_dir)
    assert ran.exit_code == 0, ran.output
    assert (ws / "labelassist.db").is_file() and not (ws / "deep" / "er" / "labelassist.db"
                                                     ).exists()
    status = invoke("status")
    assert status.exit_code == 0, status.output
    assert f"workspace: {ws / 'labelassist.toml'}" in status.output
    assert "files: 24   images: 24" in status.output
    assert "tiny-clip@" in status.output
    predictions = invoke("predictions")
    assert predictions.exit_code == 0 and len(predictions.output.splitlines()) == 24

    help_text = invoke("push", "--help").output  # --help shows where the defaults come from
    assert str(ws / "labelassist.db") in "".join(help_text.split())


def test_a_flag_beats_the_environment_which_beats_the_workspace(tmp_path, monkeypatch,
                                                                 photo_dir):
    ws = tmp_path / "ws"
    monkeypatch.chdir(tmp_path)
    assert invoke("init", ws, "--db", "ws/mine.db").exit_code == 0  # paths: from here
    assert 'db = "mine.db"' in (ws / "labelassist.toml").read_text()  # stored: from ws
    monkeypatch.chdir(ws)
    env_db, flag_db = tmp_path / "env.db", tmp_path / "flag.db"

    assert invoke("ingest", photo_dir).exit_code == 0
    assert invoke("ingest", photo_dir, env={"LABELASSIST_DB": f"sqlite:///{env_db}"}
                  ).exit_code == 0
    assert invoke("ingest", photo_dir, "--db", f"sqlite:///{flag_db}",
                  env={"LABELASSIST_DB": f"sqlite:///{env_db}"}).exit_code == 0

    assert (ws / "mine.db").is_file() and env_db.is_file() and flag_db.is_file()


def test_init_again_changes_only_what_it_is_given(tmp_path, labels_file):
    ws = tmp_path / "ws"
    assert invoke("init", ws, "--model", "openai/clip-vit-base-patch32").exit_code == 0
    again = invoke("init", ws, "--labels", labels_file)
    assert again.exit_code == 0, again.output
    text = (ws / "labelassist.toml").read_text()
    assert 'model = "openai/clip-vit-base-patch32"' in text  # a hub id stays a hub id
    assert f'labels = "{labels_file}"' in text


def test_paths_inside_the_workspace_are_kept_relative_so_it_can_move(tmp_path, monkeypatch,
                                                                    labels_file, photo_dir):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "labels.toml").write_text(labels_file.read_text())
    monkeypatch.chdir(ws)
    assert invoke("init", "--labels", "labels.toml").exit_code == 0
    assert 'labels = "labels.toml"' in (ws / "labelassist.toml").read_text()

    moved = tmp_path / "moved"
    ws.rename(moved)
    monkeypatch.chdir(moved)
    assert invoke("ingest", photo_dir).exit_code == 0
    assert (moved / "labelassist.db").is_file()


@pytest.mark.parametrize("text, message", [
    ('db = "x.db"\ncolour = "red"\n',
     "{file}: unknown setting 'colour' (known: db, labels, model, root, ls_url, "
     "ls_token_file, ls_root)"),
    ('db = 3\n', "{file}: 'db' must be a string, not 3"),
    ('db = "x.db\n', "{file} is not valid TOML: "),
    ('[classes]\ncat = ["cat"]\n', "{file} is a label file, not a workspace: name it "
     "labels.toml, and run `labelassist init --labels labels.toml`"),
])
def test_a_broken_workspace_file_is_one_line_naming_it(tmp_path, monkeypatch, text, message):
    (tmp_path / "labelassist.toml").write_text(text)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")

    result = invoke("status")

    assert result.exit_code == 1, result.output
    expected = "error: " + message.format(file=tmp_path / "labelassist.toml")
    assert result.output.strip().startswith(expected), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelassist.toml", "sub"]


def test_init_refuses_a_label_file_with_a_mistake(tmp_path):
    bad = tmp_path / "labels.toml"
    bad.write_text("[classes]\ncat = []\n")

    result = invoke("init", tmp_path / "ws", "--labels", bad)

    assert result.exit_code == 1 and "cat" in result.output, result.output
    assert not (tmp_path / "ws").exists()


def test_the_workspace_points_push_at_its_label_studio_and_image_root(tmp_path, monkeypatch,
                                                                      photo_dir):
    ws = tmp_path / "ws"
    assert invoke("init", ws, "--root", photo_dir, "--ls-url", "http://127.0.0.1:9").exit_code == 0
    monkeypatch.chdir(ws)
    assert invoke("ingest", photo_dir).exit_code == 0

    help_text = "".join(invoke("push", "--help").output.split())
    pulled = invoke("pull", env={"LABEL_STUDIO_API_KEY": "x" * 40})

    assert f"[envvar:LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT;default:{photo_dir}]" in help_text
    assert pulled.exit_code == 1
    assert "http://127.0.0.1:9" in pulled.output  # the recorded URL, refused at once
    assert "Traceback" not in pulled.output


def test_the_workspace_model_beats_the_one_a_label_file_names(tmp_path, monkeypatch,
                                                              tiny_clip_dir, photo_dir):
    """One order for every setting (issue 32): a label file that pins a hub model (the
    examples do) no longer beats the workspace, which offline made the Quick start fail."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "labels.toml").write_text(f'model = "{tmp_path / "its-own-model"}"\n'
                                    '[classes]\ncat = ["cat"]\ndog = ["dog"]\n')
    monkeypatch.chdir(ws)
    assert invoke("init", "--labels", "labels.toml", "--model", tiny_clip_dir).exit_code == 0

    result = invoke("run", photo_dir)

    assert result.exit_code == 0, result.output
    assert "tiny-clip@" in result.output and "its-own-model" not in result.output


def test_init_run_again_inside_the_workspace_keeps_its_paths_relative(tmp_path, monkeypatch,
                                                                      photo_dir):
    """Before: the second init took the workspace's own defaults (db as an absolute
    sqlite:/// URL, root as an absolute path) as if given, and the moved workspace said
    'no labelassist database'."""
    ws = tmp_path / "ws"
    monkeypatch.chdir(tmp_path)
    assert invoke("init", ws).exit_code == 0
    monkeypatch.chdir(ws)
    again = invoke("init", "--ls-url", "http://127.0.0.1:9")
    assert again.exit_code == 0, again.output
    assert invoke("ingest", photo_dir).exit_code == 0

    text = (ws / "labelassist.toml").read_text()
    assert 'db = "labelassist.db"' in text and 'root = "."' in text, text
    assert str(tmp_path) not in text
    moved = tmp_path / "moved"
    ws.rename(moved)
    monkeypatch.chdir(moved)
    status = invoke("status")
    assert status.exit_code == 0, status.output
    assert "files: 24" in status.output

    assert invoke("init", tmp_path / "other").exit_code == 0  # from inside another one
    assert str(moved) not in (tmp_path / "other" / "labelassist.toml").read_text()


def test_a_workspace_file_rewritten_with_absolute_paths_inside_it_stores_them_relative(
        tmp_path):
    """Whatever command rewrites labelassist.toml (init, studio), a path inside the
    workspace is written relative to it, a database URL included."""
    from labelassist.workspace import save_workspace

    ws = save_workspace(tmp_path, {"db": f"sqlite:///{tmp_path / 'data' / 'l.db'}",
                                   "root": str(tmp_path), "ls_root": str(tmp_path / "media"),
                                   "labels": "/elsewhere/labels.toml"})

    assert ws.settings == {"db": "data/l.db", "root": ".", "ls_root": "media",
                           "labels": "/elsewhere/labels.toml"}
