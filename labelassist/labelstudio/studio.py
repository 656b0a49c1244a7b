"""Start a local Label Studio wired for local files and an API token (`labelassist studio`,
and the test session's server). Facts measured on Label Studio 1.23: docs/design.md,
"Label Studio facts"."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..errors import ConfigError, LabelStudioError

# Label Studio reads these bare names into its settings: never pass ours through.
LEAKY_ENV = ("PORT", "HOST", "USERNAME", "PASSWORD", "DEBUG")
TOKEN_FILE = "labelassist-token"  # in the data folder, mode 0600
# Beside the token: the Label Studio it belongs to (written at each start), so that a
# labelassist.toml that names the token file can send it nowhere else.
TOKEN_URL_FILE = "labelassist-url"
# In the data folder: Label Studio's LOCAL_FILES_DOCUMENT_ROOT, the same at every start,
# holding a link to each --root it was started with. Tasks name their images relative to
# it, so they resolve whichever workspace started Label Studio last.
DOCUMENT_ROOT = "files"


@dataclass
class Studio:
    url: str
    token: str
    username: str
    password: str
    root: Path  # Label Studio's LOCAL_FILES_DOCUMENT_ROOT: <data_dir>/files
    data_dir: Path
    process: subprocess.Popen
    folder: Path | None = None  # the --root it was started with, linked into root
    note: str | None = None  # what the caller should tell the user

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_or_make_secret(path: Path, make, *, min_length: int = 16, log=None) -> str:
    """A secret kept in a 0600 file, made on first use. It is never truncated in place: a
    new one is written whole to a temporary file in the same folder, fsynced, and linked
    into place, which fails if a file is there. A kill or a full disk thus leaves no empty
    secret behind, and of two first starts racing, both read the one whose link won. A
    file that is empty or shorter than min_length (a torn write of an older version) is
    made again, and `log` is told."""
    for _ in range(5):
        try:
            with open(path, "rb") as fh:
                secret = fh.read().decode(errors="replace").strip()
                if len(secret) >= min_length:
                    return secret
                if log is not None:
                    log(f"{path} held no usable secret (empty or under {min_length} "
                        "characters, from an interrupted write): made a new one")
                _remove_if_still(path, fh)
        except FileNotFoundError:
            pass
        try:
            _link_new_secret(path, make())
        except FileExistsError:
            pass  # another start made it first: read theirs
        except OSError as exc:
            raise ConfigError(f"cannot write a new secret to {path}: {exc.strerror or exc}"
                              "; free some space or make the folder writable") from None
    raise ConfigError(f"{path} keeps coming back without a usable secret: remove it, and "
                      "check that its folder is writable and its disk has room")


def _link_new_secret(path: Path, secret: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:  # mkstemp's file is 0600
            fh.write(secret + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.link(temp, path)
    finally:
        os.unlink(temp)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the link itself survives a power cut
    finally:
        os.close(folder)


def _remove_if_still(path: Path, fh) -> None:
    """Remove a torn secret file, unless another start has replaced it meanwhile: under an
    advisory lock on the torn file, so that two starts repairing it never remove each
    other's new secret."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the link below still refuses to overwrite
        path.unlink(missing_ok=True)
        return
    fcntl.flock(fh, fcntl.LOCK_EX)
    try:
        if os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
            path.unlink()
    except FileNotFoundError:
        pass
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)


def make_private_dir(folder: Path) -> None:
    """Label Studio's data folder: its database holds every user's token (and the serve
    secret), so only this user may read it, whatever the umask or an earlier run made."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)


def start_studio(port: int, root: Path, data_dir: Path, *, username: str = "admin@localhost",
                 password: str | None = None, log_file: Path | None = None,
                 timeout: float = 180) -> Studio:
    """Start `label-studio` on 127.0.0.1:port and wait until /health/ answers UP. Its
    document root is <data_dir>/files, where `root` gets a link of its own (link_root)."""
    root, data_dir = root.absolute(), data_dir.resolve()
    check_root(root, data_dir)
    exe = shutil.which("label-studio")
    if exe is None:
        raise LabelStudioError("label-studio is not installed: pip install 'labelassist[studio]'")
    if not port_is_free(port):
        # Label Studio would silently move to the next port; we refuse instead.
        raise LabelStudioError(f"port {port} is busy: pass another --port")
    make_private_dir(data_dir)
    note = earlier_root_note(data_dir)
    document_root = data_dir / DOCUMENT_ROOT
    link_root(document_root, root)
    url = f"http://127.0.0.1:{port}"
    token = read_or_make_secret(data_dir / TOKEN_FILE, lambda: secrets.token_hex(20))
    write_private(data_dir / TOKEN_URL_FILE, url + "\n")
    password = password or read_or_make_secret(data_dir / "labelassist-password",
                                                lambda: secrets.token_urlsafe(12))
    env = {k: v for k, v in os.environ.items() if k not in LEAKY_ENV}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "DJANGO_DB": "sqlite",
        "LABEL_STUDIO_USERNAME": username, "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
        # It listens on 127.0.0.1 only, and its ML backend (labelassist serve) and webhook
        # live on this machine too: let it call local addresses.
        "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
    })
    log = open(log_file or data_dir / "label-studio.log", "ab")
    process = subprocess.Popen(
        [exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    studio = Studio(url, token, username, password, document_root, data_dir, process,
                    folder=root.resolve(), note=note)
    wait_until_healthy(studio, timeout)
    return studio


def check_root(root: Path, data_dir: Path) -> None:
    """A folder that Label Studio may serve: any user of it who can add a storage can read
    every file below it, so never the whole disk, nor its own data (token, database)."""
    if not root.is_dir():  # it would serve nothing, and every pushed image would be broken
        raise ConfigError(f"--root {root} is not a folder: give the folder that your image "
                          "folders live below")
    resolved = root.resolve()
    if resolved == Path(resolved.anchor):
        raise ConfigError(f"--root {resolved} would let Label Studio serve every file on this "
                          "disk: give the folder that your image folders live below")
    if resolved == data_dir or resolved in data_dir.parents:
        raise ConfigError(f"--root {resolved} holds Label Studio's own data ({data_dir}: its "
                          "database and token): give the folder that your image folders "
                          "live below, or pass --data-dir outside it")


def link_name(folder: Path) -> str:
    """A name for a folder that no other folder gets: its own name and a short hash of its
    absolute path (two workspaces' photos/ stay apart)."""
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', folder.name) or 'root'}-{digest}"


def link_root(document_root: Path, root: Path) -> Path:
    """document_root/<link_name(root)> -> root, made once and kept: tasks pushed from
    root name their images through it for good."""
    target = root.resolve()
    document_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    link = document_root / link_name(target)
    if not (link.is_symlink() and os.readlink(link) == str(target)):
        temp = document_root / f".{link.name}.{os.getpid()}"
        temp.unlink(missing_ok=True)
        temp.symlink_to(target, target_is_directory=True)
        try:
            temp.replace(link)
        except OSError as exc:
            temp.unlink()
            raise ConfigError(f"cannot link {target} into Label Studio's files as {link}: "
                              f"{exc.strerror or exc}") from None
    return link


def earlier_root_note(data_dir: Path) -> str | None:
    """Said once, when a data folder that Label Studio used before gets its fixed document
    root: tasks pushed then name their images relative to the --root of that day."""
    if not (data_dir / "label_studio.sqlite3").exists() or (data_dir / DOCUMENT_ROOT).exists():
        return None
    return (f"tasks that an earlier labelassist pushed to this Label Studio name their "
            f"images relative to the --root it was started with then, and show no image now "
            f"that every --root is linked under {data_dir / DOCUMENT_ROOT}: push those "
            "images again with a new --project, or with --image-mode upload")


def write_private(path: Path, text: str) -> None:
    """Write a 0600 file whole (through a temporary file: never half written)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    temp.replace(path)


def token_owner(token_file: Path) -> str | None:
    """The URL of the Label Studio a token file kept by start_studio belongs to."""
    try:
        return (token_file.parent / TOKEN_URL_FILE).read_text().strip() or None
    except OSError:
        return None


def wait_until_healthy(studio: Studio, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if studio.process.poll() is not None:
            raise LabelStudioError(f"label-studio exited with code {studio.process.returncode}; "
                                   f"see {studio.data_dir / 'label-studio.log'}")
        try:
            if httpx.get(f"{studio.url}/health/", timeout=2).json().get("status") == "UP":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    studio.stop()
    raise LabelStudioError(f"label-studio did not answer on {studio.url} within {timeout:.0f}s")
