"""Verbs that turn ingested images into predictions: predict, runtimes, predictions,
worker, run."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..labels import DEFAULT_DB, LABEL_FILE_HELP, load_label_file
from ..errors import ConfigError
from . import (
    DbOpt,
    DeviceOpt,
    LabelsOpt,
    LsTokenOpt,
    LsRootOpt,
    LsUrlOpt,
    ModelOpt,
    command,
    err,
    ls_client,
    open_db,
    progress_bar,
    resolve_model_id,
)
from .ingesting import print_ingest_summary

BatchSizeOpt = Annotated[Optional[int], typer.Option(
    min=1, help="Images per forward pass (default: 256 on CUDA, 64 on MPS, 32 on a CPU).")]
FeedOpt = Annotated[str, typer.Option(
    help="How images are decoded: threads, processes (DataLoader workers, shared memory), "
    "or auto (processes on CUDA, threads on a CPU, where torch needs the cores).")]
DecodeWorkersOpt = Annotated[Optional[int], typer.Option(
    min=1, help="Decode threads or processes (default: all cores but one for processes, "
    "up to 4 threads).")]

DtypeOpt = Annotated[str, typer.Option(
    help="auto: on a GPU bf16 where supported; on a CPU the fastest runtime measured to "
    "agree with fp32 on this workspace's images (see `labelassist runtimes`). Or force one: "
    "fp32, bf16, int8 (torch, dynamic), ov-bf16 or ov-int8 (OpenVINO, CPU: pip install "
    "'labelassist[openvino]').")]
DtypeBriefOpt = Annotated[str, typer.Option(
    help="auto, fp32, bf16, int8, ov-bf16 or ov-int8 (see predict).")]

def predict_options(batch_size, feed, decode_workers, exact):
    from ..predict.feed import check_feed
    from ..predict.run import PredictOptions

    check_feed(feed)  # before the model loads
    return PredictOptions(batch_size=batch_size, feed=feed, decode_workers=decode_workers,
                          exact=exact)


PREDICT_HELP = """Classify every ingested image that has no prediction for this model_version.

A model_version is the model plus the prompt set: change the label file and you
get a new version; old predictions stay. Images whose embedding is already stored
are re-scored without being decoded again. Ctrl-C or a crash loses at most the
batch in flight: run the command again to continue.

On a Ray cluster (pip install 'labelassist[ray]'): --ray auto joins the cluster in
RAY_ADDRESS, or starts one on this machine; --ray HOST:PORT joins that one. Run it on
the head node. Every node must see the images at the same paths (a shared mount) and
the model under the same id or folder. Encoding runs in actors (one per GPU, or one per
CPU node), each with a decoder actor on its node, and this process writes the ledger,
as a local predict does.

""" + LABEL_FILE_HELP + """
Example: labelassist predict --labels examples/animals/labels.toml --batch-size 64
Example: labelassist predict --ray auto
"""


@command(help=PREDICT_HELP)
def predict(
    labels: LabelsOpt,
    db: DbOpt = DEFAULT_DB,
    model: ModelOpt = None,
    batch_size: BatchSizeOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    exact: Annotated[bool, typer.Option("--exact", help="The reference path: fp32 and full "
                                        "decoding of every JPEG (slower).")] = False,
    threads: Annotated[Optional[int], typer.Option(help="Torch threads (default: all cores).")]
    = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes on this machine; they "
                                         "split the cores. Workers on other machines can "
                                         "point at the same --db (PostgreSQL).")] = 1,
    feed: FeedOpt = "auto",
    decode_workers: DecodeWorkersOpt = None,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="ADDRESS", help="Run on a Ray cluster: auto (RAY_ADDRESS, else a "
        "local one) or HOST:PORT of its head.")] = None,
    ray_actors: Annotated[Optional[int], typer.Option(
        min=1, help="Encoder actors on the cluster (default: one per GPU, else one per "
        "node).")] = None,
    ray_actor_cpus: Annotated[Optional[float], typer.Option(
        min=0.1, help="CPUs each encoder actor reserves; its torch threads (default: 1 "
        "beside a GPU, else all of a node's CPUs but one).")] = None,
) -> None:
    options = predict_options(batch_size, feed, decode_workers, exact)
    if ray is not None:
        summary = run_predict_ray(db, labels, model, options, device, dtype, workers, ray,
                                  ray_actors, ray_actor_cpus)
    elif ray_actors or ray_actor_cpus:
        raise ConfigError("--ray-actors and --ray-actor-cpus go with --ray ADDRESS")
    elif workers > 1:
        summary = run_predict_processes(db, labels, model, options, device, dtype, workers)
    else:
        summary = run_predict(db, labels, model, options, device, dtype, threads)
    print_predict_summary(summary)


@command()
def runtimes(
    labels: LabelsOpt,
    db: DbOpt = DEFAULT_DB,
    model: ModelOpt = None,
    sample: Annotated[int, typer.Option(min=8, help="Images of this workspace to measure "
                                        "on.")] = 256,
) -> None:
    """Measure the CPU runtimes on this workspace's own images and store the choice that
    `predict --dtype auto` then uses. predict measures by itself only where it pays on the
    images it has to encode; what this command measures is also remembered for this
    machine (in the cache), so later predicts in any workspace can tell.

    Each runtime (torch bf16 and int8; OpenVINO bf16 and int8 with
    pip install 'labelassist[openvino]') encodes the same sample as torch fp32. The fastest
    whose top-1 class agrees on at least 99.5% of them, and whose top-1 probability moves by
    at most 0.02 on average, is chosen. About 80 s for ViT-B/32 on 2 cores.

    Example: labelassist runtimes --labels labels.toml --sample 256
    """
    from ..model.load import load_model
    from ..predict import describe_choice
    from ..predict.choice import measure_runtimes

    label_set = load_label_file(labels)
    database = open_db(db)
    reference = load_model(resolve_model_id(model, label_set), device="cpu", dtype="fp32")
    result = measure_runtimes(database, reference, label_set, sample=sample,
                              log=lambda line: err.print(line, markup=False))
    err.print(f"chosen: {describe_choice(result.to_json())} (measured in "
              f"{result.seconds:.0f} s; predict --dtype auto uses it)", markup=False)


def run_predict_processes(db, labels, model, options, device, dtype, workers):
    from ..predict.choice import load_for_predict, needs_choice
    from ..db.status import progress_of
    from ..predict.workers import predict_in_processes

    label_set = load_label_file(labels)
    database = open_db(db)  # upgrades the schema once, before the workers start
    model_id = resolve_model_id(model, label_set)
    if not options.exact and needs_choice(device, dtype):
        # chosen once, here (it loads the model); each worker then loads it by name
        dtype = load_for_predict(database, model_id, label_set, device=device, dtype=dtype,
                                 log=lambda line: err.print(line, markup=False))[1]
    err.print(f"starting {workers} worker processes ...", markup=False)
    with progress_bar("predict") as on_progress:

        def tick():
            counts = progress_of(database, model_id, label_set.to_json())
            if counts is not None:
                on_progress(*counts)

        return predict_in_processes(db, model_id, label_set, workers, device=device,
                                    dtype="fp32" if options.exact else dtype,
                                    options=options, on_tick=tick)


def run_predict_ray(db, labels, model, options, device, dtype, workers, address, actors,
                    actor_cpus):
    from ..predict.distributed.driver import RayOptions, check_address, check_dtype, predict_on_ray
    from ..model.load import load_model

    if options.feed != "auto" or options.decode_workers:
        raise ConfigError("--feed and --decode-workers are for a local predict: on --ray, "
                          "decoding runs on the cluster's nodes")
    if workers > 1:
        raise ConfigError("--workers and --ray: choose one (on --ray the cluster's actors "
                          "are the workers; see --ray-actors)")
    check_dtype(dtype)
    check_address(address)
    label_set = load_label_file(labels)
    database = open_db(db)
    # The driver embeds the prompts and names the model_version; the actors load the
    # model by the same id, on the device Ray gives them.
    reference = load_model(resolve_model_id(model, label_set), device="cpu", dtype="fp32")
    with progress_bar("predict") as on_progress:
        return predict_on_ray(database, reference, label_set, options,
                              RayOptions(address, actors, actor_cpus), device=device,
                              dtype="fp32" if options.exact else dtype,
                              on_progress=on_progress,
                              log=lambda line: err.print(line, markup=False))


def run_predict(db, labels, model, options, device, dtype, threads):
    from ..predict.run import predict as run
    from ..predict.choice import load_for_predict

    label_set = load_label_file(labels)
    database = open_db(db)
    model_id = resolve_model_id(model, label_set)
    if threads:
        import torch

        torch.set_num_threads(threads)
    loaded, _ = load_for_predict(database, model_id, label_set, device=device,
                                 dtype="fp32" if options.exact else dtype,
                                 log=lambda line: err.print(line, markup=False))
    with progress_bar("predict") as on_progress:
        return run(database, loaded, label_set, options, on_progress=on_progress)


def print_predict_summary(summary) -> None:
    err.print(f"{summary.model_version}: {summary.predicted:,} predicted ({summary.encoded:,} "
              f"encoded, {summary.rescored:,} re-scored from stored embeddings), "
              f"{sum(summary.failed.values()):,} failed, {summary.images_per_second:,.1f} "
              f"images/s" + (f" ({summary.feed})" if summary.feed else ""), markup=False)
    if summary.tower_seconds and summary.seconds:
        def share(seconds: float) -> str:
            return f"{seconds / summary.seconds:.0%}"

        err.print(f"  time: image tower {share(summary.tower_seconds)}, waiting for decoded "
                  f"images {share(summary.decode_wait_seconds)}, for writes "
                  f"{share(summary.write_wait_seconds)}", markup=False)
    for reason, count in summary.failed.most_common():
        err.print(f"  skipped {count:,} ({reason}), e.g. {summary.failed_examples[reason]}",
                  markup=False)
    if summary.measured:
        err.print(f"  measured the similarity of {summary.measured:,} earlier predictions (from "
                  "stored embeddings), so the out-of-set flag covers them", markup=False)


@command()
def predictions(
    db: DbOpt = DEFAULT_DB,
    version: Annotated[Optional[str], typer.Option(help="model_version (default: the newest "
                                                   "with predictions).")] = None,
    format: Annotated[str, typer.Option(help="jsonl or csv.")] = "jsonl",
) -> None:
    """Print one record per image to stdout: path, sha256, label, confidence, scores,
    model_version, similarity, and out_of_set (the image matches none of the classes well:
    push sends it first, accept never takes it; docs/trust.md).

    Example: labelassist predictions --format csv > predictions.csv
    """
    from ..outputs.export import spreadsheet_safe
    from ..db.queries import prediction_records, resolve_version
    from ..trust.outofset import flagged_images

    if format not in ("jsonl", "csv"):
        raise ConfigError(f"--format {format!r}: use jsonl or csv")
    database = open_db(db)
    chosen = resolve_version(database, version)
    records = prediction_records(database, chosen, flagged=flagged_images(database, chosen))
    if format == "jsonl":
        for record in records:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    fields = ["path", "sha256", "label", "confidence", "margin", "scores", "model_version",
              "similarity", "out_of_set"]
    writer = csv.DictWriter(sys.stdout, fieldnames=fields)
    writer.writeheader()
    for record in records:
        writer.writerow(spreadsheet_safe({
            **record, "scores": json.dumps(record["scores"], ensure_ascii=False),
            "out_of_set": "true" if record["out_of_set"] else "false"}))


@command()
def worker(
    labels: Annotated[Optional[list[Path]], typer.Option(
        "--labels", "-l", help="Label files to serve (repeatable). Prompt sets that others "
        "store for the same model are served too.")] = None,
    db: DbOpt = DEFAULT_DB,
    model: ModelOpt = None,
    batch_size: BatchSizeOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeBriefOpt = "auto",
    feed: FeedOpt = "auto",
    decode_workers: DecodeWorkersOpt = None,
    poll: Annotated[float, typer.Option(help="Seconds to wait when there is no work.")] = 5.0,
    push: Annotated[bool, typer.Option("--push", help="Push new predictions to Label Studio "
                                       "after each round (--ls-url/--ls-token or env).")] = False,
    ls_url: LsUrlOpt = None,
    ls_token: LsTokenOpt = None,
    ls_root: LsRootOpt = None,
) -> None:
    """Run until SIGTERM or Ctrl-C, predicting whatever is pending: images that anyone
    ingests, and any new prompt set for this model. On SIGTERM it finishes the batch in
    flight and exits cleanly. Start as many as you like, on as many machines, against one
    PostgreSQL --db.

    Example: labelassist worker --db postgresql+psycopg://host/labels -l labels.toml --push
    """
    from ..model.load import load_model
    from ..predict.workers import run_worker

    options = predict_options(batch_size, feed, decode_workers, exact=False)
    label_sets = [load_label_file(p) for p in labels or []]
    model_id = resolve_model_id(model, label_sets[0] if label_sets else None)
    database = open_db(db, create=True)  # others may ingest while it waits for work
    loaded = load_model(model_id, device=device, dtype=dtype)
    stop = stop_on_signals()
    after_round = push_each_round(database, ls_url, ls_token, ls_root) if push else None
    err.print(f"worker on {loaded.model_key}: waiting for work (Ctrl-C to stop)", markup=False)
    stats = run_worker(database, loaded, label_sets, stop, options=options, poll_seconds=poll,
                       after_round=after_round)
    err.print(f"worker stopped: {stats.predicted:,} predicted in {stats.rounds} rounds"
              + "".join(f"; {v}: {n:,}" for v, n in stats.per_version.items()), markup=False)


def stop_on_signals():
    """An event that the first SIGTERM or Ctrl-C sets (the worker finishes the batch in
    flight); a second one stops at once."""
    import signal
    import threading

    stop = threading.Event()

    def request_stop(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: stop now
        err.print("stopping after the batch in flight ...", markup=False)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def push_each_round(database, ls_url, ls_token, ls_root):
    """worker --push: after each round, push its new predictions to Label Studio."""
    from ..labelstudio import resolve_image_source
    from ..labelstudio.push import push_after_rounds

    client = ls_client(ls_url, ls_token)
    return push_after_rounds(
        database, client, resolve_image_source("auto", ls_root, client.conn.url),
        log=lambda line: err.print(line, markup=False))


@command(name="run")
def run_all(
    dirs: Annotated[list[str], typer.Argument(
        help="Folders of images, or object storage URLs (s3://bucket/prefix).")],
    labels: LabelsOpt,
    db: DbOpt = DEFAULT_DB,
    model: ModelOpt = None,
    batch_size: BatchSizeOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeBriefOpt = "auto",
    exact: Annotated[bool, typer.Option("--exact", help="fp32 and full JPEG decoding.")] =
    False,
    feed: FeedOpt = "auto",
    decode_workers: DecodeWorkersOpt = None,
) -> None:
    """Ingest DIRS, then predict every new image.

    Example: labelassist run photos/ --labels labels.toml
    """
    from ..ingest import ingest as run_ingest

    options = predict_options(batch_size, feed, decode_workers, exact)
    load_label_file(labels)  # a typo is reported before a long ingest, not after it
    database = open_db(db, create=True)
    with progress_bar("ingest", unit="files") as on_progress:
        print_ingest_summary(run_ingest(database, dirs, on_progress=on_progress))
    print_predict_summary(run_predict(db, labels, model, options, device, dtype, None))

