"""Memory stays flat as the ledger grows (issue: Reliability, defect 10).

Each test runs the real command on a small and on a much bigger ledger and compares the
peak of Python's own allocations (tracemalloc: counted, not timed, so a loaded machine
does not change it). Both sizes are past every chunk size, so streaming code grows by
almost nothing; code that holds a row per image grows by megabytes.
benchmarks/memory.py measures the whole process's RSS at 10k and 100k.
"""

from __future__ import annotations

import gc
import json
import tracemalloc

import pytest

from labelassist.trust.audit import TrustOptions
from labelassist.trust.accept import accept_trusted
from labelassist.db import open_database
from labelassist.outputs.export import export
from labelassist.ingest import ingest
from labelassist.labelstudio.client import Connection, LabelStudioClient
from labelassist.labelstudio.pull import pull

from .bigledger import TaskServer, add_images, add_predictions_and_reviews
from .hostile_server import JSON, HostileServer

pytestmark = pytest.mark.slow

WARM, SMALL, BIG = 1_000, 20_000, 60_000
# Bytes of growth allowed per image more: 26. A Python object per image (a tuple, a dict
# entry, a float in a list) costs 32 to 100. (The audit's sorted confidences, 8 bytes a
# prediction in numpy, with their copies, come close: export keeps the larger sizes.)
PER_IMAGE = 26


def collect(done: int, total: int) -> None:
    """Progress callback: collect cyclic garbage at each chunk, so that the peak measures
    what the code holds, not when the interpreter last ran a full collection."""
    gc.collect()


def peak_allocated(fn) -> int:
    """The peak of Python's allocations while fn runs, with the cyclic collector off: it
    runs only where `collect` runs it, so the peak does not depend on when the
    interpreter would have collected (a response kept alive by a cycle showed in one
    run of four), and garbage that only the collector frees counts against the code."""
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        gc.enable()


def make_ledgers(tmp_path_factory, sizes):
    urls = {}
    for size in sizes:
        url = f"sqlite:///{tmp_path_factory.mktemp(f'big{size}') / 'ledger.db'}"
        open_database(url).dispose()
        add_images(url, size)
        add_predictions_and_reviews(url, reviews=500)
        urls[size] = url
    return urls


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory):
    return make_ledgers(tmp_path_factory, (WARM, SMALL, BIG))



def growth(ledgers, run) -> int:
    """Bytes of growth per image from the second ledger to the third, after a run on the
    first has paid the one-time costs (imports, caches) that would count against it."""
    peaks = {}
    for size, url in ledgers.items():
        gc.collect()
        db = open_database(url)
        try:
            peaks[size] = peak_allocated(lambda: run(db, size))
        finally:
            db.dispose()
    _, small, big = ledgers
    return (peaks[big] - peaks[small]) / (big - small)


def test_export_streams(ledgers, tmp_path):
    def run(db, size):
        summary = export(db, tmp_path / f"out{size}", "jsonl", include_auto=True,
                         on_progress=collect, trust=TrustOptions(
                             target_precision=0.9, min_support=30, rule="class"))
        assert summary.per_source["auto"] > (size - 500) // 2  # most really are exported

    grown = growth(ledgers, run)
    print(f"grew {grown:.1f} bytes an image")
    assert grown < PER_IMAGE


def test_accept_streams(ledgers):
    def run(db, size):
        accepted = accept_trusted(db, trust=TrustOptions(target_precision=0.9,
                                                        rule="class")).accepted
        assert sum(accepted.values()) > (size - 500) // 2

    grown = growth(ledgers, run)
    print(f"grew {grown:.1f} bytes an image")
    assert grown < PER_IMAGE


def test_pull_streams(ledgers):
    servers = {size: TaskServer(url).__enter__() for size, url in ledgers.items()}

    def run(db, size):  # the servers hold their tasks outside what is measured
        client = LabelStudioClient(Connection(servers[size].url, "t"), retries=1)
        summary = pull(db, client, full=True, page_size=1000, on_progress=collect)
        assert summary.tasks_seen == size
        assert summary.new + summary.updated + summary.unchanged == 500

    try:
        grown = growth(ledgers, run)
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)
    print(f"grew {grown:.1f} bytes an image")
    assert grown < PER_IMAGE


def test_pull_asks_the_ledger_a_few_questions_a_page_not_one_a_task(tmp_path):
    """Counted, not timed: pull read each task's stored reviews with a query of its own
    (90% of its time; 20k tasks took 8 s). A page of tasks needs a handful."""
    from sqlalchemy import event

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    open_database(url).dispose()
    add_images(url, 3_000)
    add_predictions_and_reviews(url, reviews=300)
    statements = []
    with TaskServer(url) as server:
        db = open_database(url)
        event.listen(db.engine, "before_cursor_execute",
                     lambda *args: statements.append(args[2]))
        client = LabelStudioClient(Connection(server.url, "t"), retries=0)
        summary = pull(db, client, full=True, page_size=1000)
        db.dispose()
    assert summary.tasks_seen == 3_000
    assert summary.new + summary.updated + summary.unchanged == 300
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    print(f"{len(selects)} queries for 3 pages")
    assert len(selects) < 40


def test_a_label_studio_answer_is_freed_when_it_is_read():
    """httpx's response and its stream refer to each other, so a response that keeps its
    body keeps it until the cyclic collector runs, which in a process with torch's
    millions of objects can be many pages later: pull's memory then grew with the project
    (36 bytes a task in one CI run, under 26 in others). With the collector off, five
    pages read one after another must leave none of their bodies behind."""
    page = {"total": 5000, "tasks": [{"id": i, "data": {"image": f"/data/{i:06d}.png"},
                                      "annotations": [], "predictions": []}
                                     for i in range(5000)]}
    body = len(json.dumps(page))
    with HostileServer({"/api/tasks": lambda query: (200, JSON, page)}) as server:
        client = LabelStudioClient(Connection(server.url, "t"), retries=0)
        client.get_json("/api/tasks", "listing tasks")  # imports, pools: paid once
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            for _ in range(5):
                client.get_json("/api/tasks", "listing tasks")
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
            gc.enable()
            client.close()
    print(f"five pages of {body} bytes left {held} bytes")
    assert held < body / 2


def test_ingest_streams(tmp_path):
    from .imagegen import shape_image

    image = shape_image(1)
    peaks = {}
    for size in (300, 2_500, 8_500):  # the first pays the one-time costs; both past
        # PROCESSES_FROM (2,000), so both decode in worker processes
        root = tmp_path / f"photos{size}"
        for i in range(size):
            folder = root / f"{i // 1000:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            image.putpixel((0, 0), (i % 256, i // 256 % 256, 0))
            image.save(folder / f"{i:06d}.png")
        db = open_database(f"sqlite:///{tmp_path / f'{size}.db'}")
        peaks[size] = peak_allocated(lambda: ingest(db, [root], on_progress=collect))
        db.dispose()
    grown = (peaks[8_500] - peaks[2_500]) / 6_000
    print(f"grew {grown:.1f} bytes an image")
    assert grown < PER_IMAGE
