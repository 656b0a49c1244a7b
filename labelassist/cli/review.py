"""Verbs of the review loop: push, pull, studio, learn, accept."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..labels import DEFAULT_DB
from . import (
    DbOpt,
    LsTokenOpt,
    LsRootOpt,
    LsUrlOpt,
    ModelOpt,
    VersionOpt,
    command,
    err,
    ls_client,
    open_db,
    progress_bar,
)


@command()
def push(
    db: DbOpt = DEFAULT_DB,
    ls_url: LsUrlOpt = None,
    ls_token: LsTokenOpt = None,
    project: Annotated[Optional[str], typer.Option(
        help="Project title (default: 'labelassist: <classes>'); found or created.")] = None,
    version: VersionOpt = None,
    image_mode: Annotated[str, typer.Option(
        help="local: Label Studio serves files from its LOCAL_FILES_DOCUMENT_ROOT (same "
             "disk); upload: send the image bytes; auto: local for a Label Studio on this "
             "machine with a known root, else upload.")] = "auto",
    ls_root: LsRootOpt = None,
    order: Annotated[str, typer.Option(
        help="Which images become tasks first: ingest, random (a fixed shuffle: reviews "
             "that are a fair sample, which accept's thresholds need), uncertain (lowest "
             "margin first: where the model is weakest) or confident.")] = "ingest",
    batch_size: Annotated[int, typer.Option(min=1, max=5000, help="Tasks per import request "
                                            "(Label Studio handles ~1,000 in 1.5 s).")] = 500,
) -> None:
    """Push predictions to Label Studio as pre-annotations: one task per image with the
    prediction preselected (model_version and score set, so reviewers can sort by score).

    Pushing again adds nothing twice; a new model_version adds its predictions to the
    existing tasks; an interrupted push resumes where it stopped.

    Example: labelassist push --ls-url http://127.0.0.1:8080 --ls-root /data/images
    """
    from ..labelstudio import push as run_push
    from ..labelstudio import resolve_image_source
    from ..db.queries import resolve_version

    database = open_db(db)
    client = ls_client(ls_url, ls_token)
    source = resolve_image_source(image_mode, ls_root, client.conn.url)
    with progress_bar("push", unit="tasks") as on_progress:
        summary = run_push(database, client, resolve_version(database, version), source,
                           title=project, order=order, batch_size=batch_size,
                           on_progress=on_progress,
                           on_wait=lambda line: err.print(line, markup=False))
    err.print(f"{summary.model_version} -> {summary.project_url}: {summary.tasks_created:,} "
              f"tasks created, {summary.predictions_added:,} predictions added to existing "
              f"tasks, {summary.recovered:,} recovered from an interrupted push", markup=False)
    if summary.skipped_no_file:
        err.print(f"  skipped {summary.skipped_no_file:,} predictions of images with no file "
                  "left (edited or deleted since; their new content has its own)", markup=False)
    if summary.skipped_changed:
        err.print(f"  skipped {summary.skipped_changed:,} images whose file changed since "
                  "ingest (reviewers would see other pixels): run labelassist ingest, "
                  "predict, then push again", markup=False)
    if summary.tasks_gone:
        err.print(f"  {summary.tasks_gone:,} tasks were deleted in Label Studio (or their ids "
                  "given to other tasks) since the last push: forgotten", markup=False)
    if summary.skipped_deleted:
        err.print(f"  {summary.skipped_deleted:,} images whose task was deleted in Label "
                  "Studio were not made tasks again", markup=False)


@command()
def pull(
    db: DbOpt = DEFAULT_DB,
    ls_url: LsUrlOpt = None,
    ls_token: LsTokenOpt = None,
    full: Annotated[bool, typer.Option("--full", help="Re-read every task, not only those "
                                       "changed since the last pull.")] = False,
) -> None:
    """Fetch reviewers' annotations that are new or changed since the last pull: the human
    label, whether the prediction was accepted unchanged, annotator, lead time. Updated,
    deleted and skipped annotations are tracked too.

    Example: labelassist pull --ls-url http://127.0.0.1:8080
    """
    from ..labelstudio import pull as run_pull

    database, client = open_db(db), ls_client(ls_url, ls_token)
    with progress_bar("pull", unit="tasks") as on_progress:
        summary = run_pull(database, client, full=full, on_progress=on_progress)
    err.print(f"{summary.tasks_seen:,} tasks read: {summary.new:,} new annotations, "
              f"{summary.updated:,} updated, {summary.deleted:,} deleted, {summary.unchanged:,} "
              f"unchanged ({summary.cancelled:,} skipped by reviewers)", markup=False)
    if summary.tasks_gone:
        err.print(f"  {summary.tasks_gone:,} reviewed tasks were deleted in Label Studio: "
                  "their annotations no longer count", markup=False)
    if summary.tasks_replaced:
        err.print(f"  {summary.tasks_replaced:,} task ids now name other tasks (Label Studio "
                  "gave a deleted task's id again): the old reviews no longer count",
                  markup=False)
    if summary.unknown_tasks:
        made = "task" if summary.unknown_tasks == 1 else "tasks"
        err.print(f"  {summary.unknown_tasks:,} {made} made in Label Studio by hand (not "
                  "pushed by labelassist) left alone: no image here to give their labels to",
                  markup=False)


@command()
def studio(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8080,
    root: Annotated[Path, typer.Option(help="Folder whose subfolders Label Studio may serve "
                                       "as local files (your image folders live below it); "
                                       "it is linked into the document root that Label "
                                       "Studio keeps in --data-dir, beside the --root of "
                                       "every earlier start. Default: the workspace's root, "
                                       "else here.")]
    = Path("."),
    data_dir: Annotated[Path, typer.Option(help="Label Studio's data (its own database).")] =
    Path.home() / ".local" / "share" / "labelassist" / "label-studio",
) -> None:
    """Start a local Label Studio wired for local files and an API token, print the URL,
    login and token, and keep it running until Ctrl-C. Needs labelassist[studio].
    In a workspace it records its URL, where its token is kept and its document root, so
    push and pull run there need no flags and no exported variables. One Label Studio
    serves many workspaces: each one's images keep showing whichever started it last.

    Example: labelassist studio --root ~/datasets   (then paste the export lines it prints)
    """
    import signal

    from ..labelstudio.studio import start_studio

    err.print("starting Label Studio (the first start takes about 40 s) ...", markup=False)
    s = start_studio(port, root.resolve(), data_dir)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it like Ctrl-C
    try:
        if s.note:
            err.print(f"note: {s.note}", markup=False)
        record_studio_in_workspace(s)  # before the lines are printed: a script may act on them
        Console(highlight=False, soft_wrap=True).print(
            f"Label Studio is up at {s.url}  (login {s.username} / {s.password})\n"
            f"export LABEL_STUDIO_URL={s.url}\nexport LABEL_STUDIO_API_KEY={s.token}\n"
            f"export LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={s.root}", markup=False)
        s.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        s.stop()


def record_studio_in_workspace(s) -> None:
    from ..labelstudio.studio import TOKEN_FILE
    from ..workspace import relative_to, update_workspace
    from . import workspace

    if workspace is None:
        return
    update_workspace(workspace, ls_url=s.url, root=relative_to(workspace.folder, s.folder),
                     ls_token_file=relative_to(workspace.folder, s.data_dir / TOKEN_FILE),
                     ls_root=relative_to(workspace.folder, s.root))
    err.print(f"recorded in {workspace.file}: push and pull run there need none of the "
              "lines below", markup=False)


@command()
def learn(
    db: DbOpt = DEFAULT_DB,
    version: Annotated[Optional[str], typer.Option(
        help="Zero-shot model_version to improve (default: the newest with predictions).")]
    = None,
    model: ModelOpt = None,
    resolve: Annotated[str, typer.Option(help="majority or latest (see report).")] =
    "majority",
    store: Annotated[bool, typer.Option(help="Store the probe's predictions when it beats "
                                        "zero-shot.")] = True,
) -> None:
    """Fit a linear probe on the stored embeddings of reviewed images, anchored to the
    zero-shot classifier so it is never worse with few reviews. Its accuracy is estimated
    by cross-validation next to zero-shot's on the same reviews; when it wins, its
    predictions for every unreviewed image are stored as a new model_version
    (probe@<hash>), ready to push. Runs in seconds: nothing is decoded or encoded.

    Example: labelassist learn && labelassist push --version probe@1a2b3c4d
    """
    from ..trust.learn import learn as run_learn
    from ..model.load import load_model
    from ..db.queries import resolve_version

    database = open_db(db)
    base = resolve_version(database, version)
    if base.kind != "zeroshot":
        from ..errors import ConfigError

        raise ConfigError(f"{base.name} is a {base.kind}; pass --version with a zero-shot one")
    loaded = load_model(model or base.model_id, device="cpu", dtype="fp32")
    s = run_learn(database, loaded, base, policy=resolve, store=store)
    out = Console(highlight=False, soft_wrap=True)
    chosen = "zero-shot kept: no probe beat it" if s.chosen_lambda is None \
        else f"lambda {s.chosen_lambda:g}"
    out.print(f"{s.base_version}: {s.reviews:,} reviews; cross-validated accuracy: zero-shot "
              f"{s.zero_shot_accuracy:.1%}, probe {s.probe_accuracy:.1%} ({chosen}); "
              f"temperature {s.temperature:.2f}, ECE {s.ece_before:.3f} -> {s.ece_after:.3f}",
              markup=False)
    if s.stored_version:
        out.print(f"stored {s.stored_predictions:,} predictions as {s.stored_version}: "
                  f"labelassist push --version {s.stored_version}", markup=False)
    elif not store:
        out.print("--no-store: nothing stored", markup=False)
    else:
        out.print("the probe does not beat zero-shot on held-out reviews: nothing stored",
                  markup=False)
    if s.label_issues:
        out.print(f"{len(s.label_issues)} human labels worth a second look (see report)",
                  markup=False)


@command()
def suggest(
    db: DbOpt = DEFAULT_DB,
    version: Annotated[Optional[str], typer.Option(
        help="Zero-shot model_version whose descriptions to improve (default: the newest "
        "with predictions).")] = None,
    vocabulary: Annotated[Optional[str], typer.Option(
        help="Candidate descriptions: a file with one a line, or a shipped one: imagenet "
        "(the 1,000 ImageNet class names) or toyworld. Default: toyworld for the toy "
        "model, else imagenet. The current descriptions are always candidates too.")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the proposed label file.")] =
    Path("proposed.toml"),
    model: ModelOpt = None,
    resolve: Annotated[str, typer.Option(help="majority or latest (see report).")] =
    "majority",
) -> None:
    """Propose better class descriptions from the reviews, and prove them first.

    For each class, the stored embeddings of its reviewed images fall into a few modes;
    for each mode, the candidate description that best picks it out against the other
    classes' images is proposed (the seed's lesson: a class described by its members
    beats a vague description). The whole procedure is cross-validated on the reviews,
    and a label file is written only when it gains on every fold. Nothing is re-encoded.

    Example: labelassist suggest --vocabulary words.txt  (then: predict --labels proposed.toml)
    """
    from ..model.load import load_model
    from ..db.queries import resolve_version
    from ..trust.suggest import store_suggestion, write_proposal
    from ..trust.suggest import suggest as run_suggest
    from ..trust.vocabulary import load_vocabulary

    database = open_db(db)
    base = resolve_version(database, version)
    if base.kind != "zeroshot":
        from ..errors import ConfigError

        raise ConfigError(f"{base.name} is a {base.kind}; pass --version with a zero-shot one")
    words = load_vocabulary(vocabulary, base.model_id)
    loaded = load_model(model or base.model_id, device="cpu", dtype="fp32")
    s = run_suggest(database, loaded, base, words, policy=resolve)
    out_console = Console(highlight=False, soft_wrap=True)
    if s.folds:
        out_console.print(f"{s.version}: {s.reviews:,} reviews, {s.vocabulary:,} candidate "
                          f"descriptions; held-out accuracy: current {s.current_accuracy:.1%}, "
                          f"proposed {s.proposed_accuracy:.1%} "
                          f"({sum(f['proposed'] > f['current'] for f in s.folds)} of "
                          f"{len(s.folds)} folds gain)", markup=False)
        for cls, r in s.recall.items():
            out_console.print(f"  recall {cls}: {r['current']:.1%} -> {r['proposed']:.1%} "
                              f"({r['reviews']} reviews)", markup=False)
    if s.proposed is None:
        store_suggestion(database, base, s, None)
        out_console.print(f"no proposal: {s.reason}", markup=False)
        return
    write_proposal(s, out, model or base.model_id)
    store_suggestion(database, base, s, out.absolute())
    for a in s.additions:
        out_console.print(f"  {a.cls} += {a.description!r}: picks out {a.covers} reviewed "
                          f"images (AUC {a.auc:.2f})", markup=False)
    for cls, description in s.retired:
        out_console.print(f"  {cls} -= {description!r}: the reviews fit better without it",
                          markup=False)
    out_console.print(f"wrote {out} ({'added to' if s.mode == 'add' else 'in place of'} "
                      f"the current descriptions); adopt it with: labelassist predict "
                      f"--labels {out}", markup=False)


@command()
def accept(
    db: DbOpt = DEFAULT_DB,
    target_precision: Annotated[float, typer.Option(help="Precision each class's threshold "
                                                    "must reach on the reviews.")] = 0.99,
    version: VersionOpt = None,
    min_support: Annotated[int, typer.Option(min=1, help="Reviews each class's threshold "
                                             "must rest on.")] = 30,
    resolve: Annotated[str, typer.Option(help="majority or latest (see report).")] =
    "majority",
    allow_biased_sample: Annotated[bool, typer.Option(
        "--allow-biased-sample", help="Accept even when the reviewed images are not a fair "
        "sample of the rest (reviewed in uncertainty order), where thresholds may not "
        "hold.")] = False,
) -> None:
    """Mark unreviewed predictions as auto-accepted where their class's audited threshold
    says they can be trusted. They are recorded with provenance (source 'auto' in the
    export) and Label Studio is never told: nothing is passed off as human work. Images
    that match none of the classes well (out of set) are never accepted.

    Example: labelassist accept --target-precision 0.99 && labelassist export out/ --include-auto
    """
    from ..trust.accept import accept_trusted

    s = accept_trusted(open_db(db), version, target_precision=target_precision,
                       min_support=min_support, policy=resolve,
                       allow_biased_sample=allow_biased_sample)
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"{s.model_version}: {sum(s.accepted.values()):,} predictions auto-accepted at "
              f"{target_precision:.1%} target precision", markup=False)
    for cls, threshold in s.thresholds.items():
        if threshold is None:
            out.print(f"  {cls}: none ({s.reasons[cls]})", markup=False)
        else:
            out.print(f"  {cls}: {s.accepted[cls]:,} at confidence >= {threshold:.3f}",
                      markup=False)
    if s.out_of_set:
        out.print(f"  {s.out_of_set:,} unreviewed images match none of the classes well (out "
                  "of set): never accepted; push sends them to reviewers first", markup=False)




@command()
def serve(
    db: DbOpt = DEFAULT_DB,
    ls_url: LsUrlOpt = None,
    ls_token: LsTokenOpt = None,
    project: Annotated[Optional[str], typer.Option(
        help="Title of the project to serve (default: the one labelassist pushed to last).")]
    = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 9090,
    url: Annotated[Optional[str], typer.Option(
        help="The address Label Studio should call (default: http://HOST:PORT).")] = None,
    learn_every: Annotated[int, typer.Option(
        min=0, help="Run learn after this many new reviews; when the probe wins, its "
        "predictions go to Label Studio as a new model_version (0: never).")] = 20,
    secret: Annotated[Optional[str], typer.Option(
        envvar="LABELASSIST_SERVE_SECRET", help="Shared secret that Label Studio must send "
        "(basic auth, user 'labelassist'); at least 16 characters. The project webhook gets "
        "a credential derived from it, good for /webhook only. Default: one made on first "
        "use and kept in ~/.local/share/labelassist/serve-secret (mode 0600).")] = None,
    model: ModelOpt = None,
    device: Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda or mps.")] =
    "auto",
    connect: Annotated[bool, typer.Option(help="Connect the project to this server through "
                                          "Label Studio's API (its ML backend and webhook).")]
    = True,
    fetch_dir: Annotated[Optional[Path], typer.Option(
        help="Where images fetched through Label Studio are kept (default: "
        "labelassist-fetched beside an SQLite database).")] = None,
) -> None:
    """Keep the model in the loop: a Label Studio ML backend for a project labelassist
    pushed. When a reviewer opens a task, Label Studio asks it for a prediction: pushed
    tasks are answered from the ledger at once; tasks imported straight into Label Studio
    have their image fetched through Label Studio, encoded and predicted. Reviews are
    recorded as they are made (no pull needed), and every --learn-every reviews learn
    runs: when the probe wins, the next task a reviewer opens shows its better guess.

    GET / on the server reports reviews recorded, the last learn (cross-validated
    accuracy of the probe against zero-shot) and the share that accept would now take.

    Example: labelassist serve --project "labelassist: cat / dog"
    """
    import signal

    from ..labelstudio import pull as run_pull
    from ..model.load import load_model
    from ..serve import (Backend, ServeOptions, fetch_dir_for, find_project, run_server,
                         serve_secret, status_file_for)

    secret = serve_secret(secret, log=lambda line: err.print(line, markup=False))
    database = open_db(db)
    client = ls_client(ls_url, ls_token)
    target = find_project(database, client, project)
    caught_up = run_pull(database, client)  # reviews made while no server was listening
    if caught_up.new or caught_up.updated or caught_up.deleted:
        err.print(f"caught up: {caught_up.new:,} new, {caught_up.updated:,} updated, "
                  f"{caught_up.deleted:,} deleted reviews since the last pull", markup=False)

    def loader(model_id: str, runtime: str = ""):
        # the zero-shot version's own model and runtime (its embeddings are keyed by
        # both), unless --model says otherwise
        return load_model(model or model_id, device="cpu" if runtime else device,
                          dtype=runtime or "auto")

    backend = Backend(database, client, target, load_model=loader,
                      fetch_dir=(fetch_dir or fetch_dir_for(db)).absolute(),
                      learn_every=learn_every, log=lambda line: err.print(line, markup=False),
                      status_file=status_file_for(db))
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run_server(backend, secret, ServeOptions(host, port, url, learn_every, connect),
                   log=lambda line: err.print(line, markup=False))
    except KeyboardInterrupt:
        err.print("stopped", markup=False)
