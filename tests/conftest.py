import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from labelassist.db import open_database  # noqa: E402
from labelassist.toy.tiny import save_random_clip, tiny_clip_config  # noqa: E402

from .imagegen import write_shape_images  # noqa: E402


def pytest_collection_modifyitems(items):
    """The longest test first (retraining the toy model whole, about 3 minutes alone, on
    a kind of CPU other than the shipped weights' or with LABELASSIST_FULL_RETRAIN=1): with
    pytest-xdist (scripts/test.sh) it then runs beside the others instead of alone at the
    end. The rest keep their order, which mixes tests that compute with tests that wait
    on servers. Putting every slow test first made both workers compute at once: the
    retraining (two threads, pinned) was still running after 14 minutes."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP with the real CLIP tokenizer, saved like any user model."""
    return save_random_clip(tmp_path_factory.mktemp("models") / "tiny-clip", tiny_clip_config())


@pytest.fixture(scope="session")
def tiny_model(tiny_clip_dir):
    from labelassist.model.load import load_model

    return load_model(str(tiny_clip_dir), device="cpu", dtype="fp32")


@pytest.fixture
def db_url(tmp_path):
    return f"sqlite:///{tmp_path / 'labelassist.db'}"


@pytest.fixture
def db(db_url):
    database = open_database(db_url)
    yield database
    database.dispose()


@pytest.fixture
def photo_dir(tmp_path):
    """24 small real image files (PNG and JPEG) of coloured shapes."""
    root = tmp_path / "photos"
    write_shape_images(root, 24)
    return root


@pytest.fixture
def labels_file(tmp_path):
    path = tmp_path / "labels.toml"
    path.write_text('templates = ["a photo of a {}."]\n[classes]\nwarm = ["red", "orange"]\n'
                    'cool = ["blue"]\nplain = ["grey"]\n')
    return path


@pytest.fixture(scope="session")
def toy_model_dir():
    """The toy-world CLIP: its shipped weights, unpacked once into a cache (seconds)."""
    from pathlib import Path

    from labelassist.toy.world import cached_model

    cache = Path(os.environ.get("LABELASSIST_TEST_CACHE", Path.home() / ".cache" / "labelassist"))
    return cached_model(cache, log=lambda message: None)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """One real Label Studio server for the whole test session, on a free port."""
    from labelassist.labelstudio.studio import free_port, start_studio

    root = tmp_path_factory.mktemp("ls-root")
    studio = start_studio(free_port(), root, tmp_path_factory.mktemp("ls-data"))
    yield studio
    studio.stop()


@pytest.fixture
def ls_env(label_studio, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(label_studio.root))
    return label_studio


@pytest.fixture
def ls_photos(label_studio, request):
    """Images in this test's own folder under the server's local-files root."""
    import re

    name = re.sub(r"[^A-Za-z0-9_]+", "_", request.node.name)[:60]
    root = label_studio.root / name
    write_shape_images(root, 12)
    return root


EVIL = "<img src=x onerror=alert(1)>.jpg"


def add_annotation(db, image_id, label, *, n, annotator="ann@example.org", cancelled=False,
                   when=None, accepted=None, version_id=None, lead_time=None):
    """A review stored exactly as `labelassist pull` stores one."""
    from sqlalchemy import select

    from labelassist.db.models import Annotation, LSProject, utcnow

    with db.write() as s:
        project = s.scalars(select(LSProject)).first()
        if project is None:
            project = LSProject(url="http://ls", ls_project_id=1, title="t", classes=[],
                                image_mode="local")
            s.add(project)
            s.flush()
        s.add(Annotation(project_id=project.id, ls_annotation_id=n, image_id=image_id,
                         label=label, cancelled=cancelled, annotator=annotator,
                         model_version_id=version_id, accepted_prediction=accepted,
                         lead_time=lead_time, ls_updated_at=when or utcnow()))


@pytest.fixture
def reviewed_db(db, tiny_model, tmp_path):
    """30 images with real predictions from the tiny model; 24 reviewed (60% agree with the
    model), one reviewed twice, one skipped, five never reviewed."""
    import random

    from sqlalchemy import select

    from labelassist.labels import parse_label_text
    from labelassist.db.models import Prediction
    from labelassist.ingest import ingest
    from labelassist.predict.run import predict

    from .imagegen import shape_image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(30):
        shape_image(i).save(photos / (EVIL if i == 0 else f"p{i:02d}.jpg"))
    ingest(db, [photos])
    predict(db, tiny_model, parse_label_text('[classes]\ncat = ["cat"]\ndog = ["dog"]\n'
                                             '"<b>wild</b>" = ["lion"]\n'))
    rng = random.Random(3)
    with db.read() as s:
        preds = s.scalars(select(Prediction).order_by(Prediction.image_id)).all()
    for n, p in enumerate(preds[:24]):
        human = p.label if rng.random() < 0.6 else rng.choice(["cat", "dog", "<b>wild</b>"])
        add_annotation(db, p.image_id, human, n=n, accepted=human == p.label,
                       version_id=p.model_version_id, lead_time=2.0 + n)
    add_annotation(db, preds[0].image_id, "dog", n=99, annotator="<script>x</script>")
    add_annotation(db, preds[25].image_id, None, n=100, cancelled=True)
    return db


PG_ADMIN = os.environ.get("LABELASSIST_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test (the real server on 127.0.0.1:5432)."""
    import uuid

    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    name = f"la_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        message = f"PostgreSQL is not reachable at {PG_ADMIN}: {exc.orig}"
        if os.environ.get("CI"):  # CI must test PostgreSQL, never report it as skipped
            pytest.fail(f"{message}. CI=true: start PostgreSQL, or set LABELASSIST_TEST_PG")
        pytest.skip(message)
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def terminate_connections(database_name: str, application_name: str) -> int:
    """Cut the connections of one client (libpq's application_name: set PGAPPNAME in its
    environment) to one database, as a restart or a network cut would."""
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        killed = conn.execute(sa.text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = :d AND application_name = :a AND pid <> pg_backend_pid()"),
            {"d": database_name, "a": application_name}).scalar()
    admin.dispose()
    return killed


@pytest.fixture
def toy_workspace(tmp_path, toy_model_dir, db_url):
    """120 toy pictures ingested, and a warm/cool label file for the toy model."""
    from typer.testing import CliRunner

    from labelassist.cli import app
    from labelassist.toy import world as toyworld

    toyworld.write_images(tmp_path / "pics", 120, seed=5)
    labels = tmp_path / "labels.toml"
    labels.write_text(f'model = "{toy_model_dir}"\n[classes]\n'
                      'warm = ["red", "orange", "yellow"]\ncool = ["green", "blue", "purple"]\n')
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "pics"), "--db", db_url])
    assert result.exit_code == 0, result.output
    return labels
