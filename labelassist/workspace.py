"""A workspace: a `labelassist.toml` that records where a project's database, label file,
model and images are, found by walking up from the current folder (like git).

Commands run in its folder or below it take these as their defaults; a flag or an
environment variable still wins. Paths are relative to the file, so a workspace can move.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

FILE_NAME = "labelassist.toml"
KEYS = ("db", "labels", "model", "root", "ls_url", "ls_token_file", "ls_root")
PATH_KEYS = ("db", "labels", "model", "root", "ls_token_file", "ls_root")
SQLITE_URL_PREFIX = "sqlite:///"
HEADER = """\
# A labelassist workspace. Commands run in this folder, or below it, use these settings
# unless a flag or an environment variable says otherwise. Paths are relative to this file.
# Keys: db (file or URL), labels (label file), model (hub id or folder), root (the folder
# your image folders live below), ls_url, ls_token_file and ls_root (Label Studio's
# document root, where root is linked; all three written by labelassist studio).
"""


@dataclass(frozen=True)
class Workspace:
    file: Path
    settings: dict[str, str]  # as written in the file

    @property
    def folder(self) -> Path:
        return self.file.parent

    def path(self, key: str) -> Path | None:
        value = self.settings.get(key)
        return None if value is None else (self.folder / os.path.expanduser(value)).resolve()

    @property
    def db_url(self) -> str | None:
        value = self.settings.get("db")
        if value is None or "://" in value:
            return value
        return f"sqlite:///{self.path('db')}"

    @property
    def model(self) -> str | None:
        """A folder when one exists at that path (relative to the workspace), else a hub id."""
        value = self.settings.get("model")
        if value is None:
            return None
        local = self.path("model")
        return str(local) if local.exists() else value

    def cli_defaults(self) -> dict[str, object]:
        """Option name -> default, for every command's options that the file settles.
        The model is not one: it comes after the label file's own (resolve_model_id)."""
        defaults: dict[str, object] = {}
        if self.db_url:
            defaults["db"] = self.db_url
        if "labels" in self.settings:
            defaults["labels"] = str(self.path("labels"))
        if "root" in self.settings:
            defaults["root"] = str(self.path("root"))
        ls_root = self.path("ls_root") or self.path("root")  # root: as recorded before
        if ls_root is not None:
            defaults["ls_root"] = str(ls_root)
        if "ls_url" in self.settings:
            defaults["ls_url"] = self.settings["ls_url"]
        return defaults

    def token(self) -> str | None:
        """The Label Studio token from the file `labelassist studio` keeps it in (the
        workspace records where it is, never the token itself)."""
        path = self.path("ls_token_file")
        if path is None:
            return None
        try:
            return path.read_text().strip()
        except OSError:
            raise ConfigError(f"{self.file}: the Label Studio token file {path} cannot be "
                              "read: start `labelassist studio` again, or set "
                              "LABEL_STUDIO_API_KEY") from None


def find_workspace(start: Path) -> Workspace | None:
    """The nearest labelassist.toml in start or a folder above it."""
    for folder in (start, *start.parents):
        candidate = folder / FILE_NAME
        if candidate.is_file():
            return load_workspace(candidate)
    return None


def load_workspace(file: Path) -> Workspace:
    file = file.resolve()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the workspace file {file}: {exc}") from None
    if "classes" in data:
        raise ConfigError(f"{file} is a label file, not a workspace: name it labels.toml, "
                          "and run `labelassist init --labels labels.toml`")
    for key, value in data.items():
        if key not in KEYS:
            raise ConfigError(f"{file}: unknown setting {key!r} (known: {', '.join(KEYS)})")
        if not isinstance(value, str):
            raise ConfigError(f"{file}: {key!r} must be a string, not {value!r}")
    return Workspace(file, data)


def relative_to(folder: Path, path: Path) -> str:
    """As written in the file: relative when inside the workspace, else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(folder.resolve()).as_posix() or "."
    except ValueError:
        return str(path)


def relative_inside(folder: Path, key: str, value: str) -> str:
    """An absolute path inside the workspace (or an SQLite URL of a file inside it), as
    the file keeps it: relative, so that the workspace can move. Anything else as given."""
    if key == "db" and value.startswith(SQLITE_URL_PREFIX) and "?" not in value:
        path = Path(value[len(SQLITE_URL_PREFIX):])
    elif key in PATH_KEYS:
        path = Path(value)
    else:
        return value
    if not path.is_absolute():
        return value
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix() or "."
    except ValueError:
        return value


def save_workspace(folder: Path, settings: dict[str, str]) -> Workspace:
    """Write folder/labelassist.toml whole (through a temp file: never half written).
    Paths inside the folder are written relative to it, whoever rewrites the file."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / FILE_NAME
    written = {key: relative_inside(folder, key, settings[key])
               for key in KEYS if key in settings}
    lines = [f"{key} = {json.dumps(value, ensure_ascii=False)}"
             for key, value in written.items()]
    partial = file.with_name(f".{FILE_NAME}.{os.getpid()}")
    partial.write_text(HEADER + "\n".join(lines) + "\n", encoding="utf-8")
    partial.replace(file)
    return load_workspace(file)


def update_workspace(workspace: Workspace, **changes: str) -> Workspace:
    return save_workspace(workspace.folder, {**workspace.settings, **changes})


def data_root() -> Path:
    """labelassist's own data on this machine, kept for the user and shared by every
    workspace (serve's secret, images fetched through Label Studio for a ledger that is
    no file, the Label Studio that `labelassist studio` starts): ~/.local/share/labelassist."""
    return Path.home() / ".local" / "share" / "labelassist"


def cache_root() -> Path:
    """labelassist's cache, shared by every workspace on the machine (the toy model
    unpacked, converted image towers, the runtimes' speed memory): LABELASSIST_CACHE, else
    $XDG_CACHE_HOME/labelassist, else ~/.cache/labelassist."""
    return Path(os.environ.get("LABELASSIST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "labelassist"))
