"""The driver of predict --ray: connect, place encoder actors, stream claimed batches
through the cluster, and write what comes back.

Why Ray actors, driven from here, rather than a Ray Data dataset: the work
queue is the ledger. Claims are taken as the cluster asks for work (a bounded number of
batches in flight), so the driver holds ledger rows for those batches only, never pixels
and never the whole pending list, and it shares the queue with local predicts and
`labelassist worker` daemons. A Ray Data source is planned when the dataset starts,
which would mean listing every pending image up front.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ...labels import LabelSet
from ...db import Database
from ...errors import ClusterError, ConfigError, LabelAssistError
from ..feed import batch_from_decoded
from ...model.load import LoadedModel
from ..run import (
    PredictOptions,
    PredictSummary,
    Run,
    Writer,
    ensure_model_version,
    predict_version,
)
from . import import_ray
from .encoder import Encoder

Log = Callable[[str], None]
MAX_ATTEMPTS = 4        # a batch whose node, task or actor died is sent again, this often
START_SECONDS = 600.0   # for an encoder actor to be placed and load the model
WRITE_SECONDS = 2.0     # results wait at most this long to be written with others
CONNECT_SECONDS = 10.0  # to reach the head's port
PER_ACTOR = 2           # batches queued at each actor: one encoding, one decoded ahead


@dataclass(frozen=True)
class RayOptions:
    address: str = "auto"            # auto: the cluster in RAY_ADDRESS, or a local one
    actors: int | None = None        # None: one per GPU, or one per node without GPUs
    actor_cpus: float | None = None  # None: 1 beside a GPU; on a CPU node, all but one core


@dataclass(frozen=True)
class ClusterPlan:
    actors: int
    device: str            # where each actor runs the model: cuda or cpu
    resources: dict        # what each actor reserves (num_cpus, num_gpus)
    threads: int           # torch threads in each actor
    nodes: int
    decode_threads: int    # in the decoder beside each actor

    def describe(self) -> str:
        return (f"Ray: {self.actors} encoder actor{'s' * (self.actors != 1)} on {self.device}, "
                f"{self.nodes} node{'s' * (self.nodes != 1)}")


def predict_on_ray(db: Database, model: LoadedModel, label_set: LabelSet,
                   options: PredictOptions, ray_options: RayOptions, *, device: str = "auto",
                   dtype: str = "auto", on_progress=None, stop=None,
                   log: Log = lambda line: None) -> PredictSummary:
    """predict, with the encode phase on a Ray cluster. `model` (here, on the driver)
    embeds the prompts and names the model_version; each actor loads model.model_id."""
    check_dtype(dtype)
    ray = import_ray()
    started_here = connect(ray, ray_options.address, log)
    try:
        plan = plan_cluster(ray, ray_options, device)
        version = ensure_model_version(db, model, label_set)
        engine = RayEncode(ray, plan, model.model_id, dtype, options, log)
        return predict_version(db, model, version, options, on_progress=on_progress,
                               stop=stop, encode=engine)
    finally:
        if started_here:
            ray.shutdown()


def check_dtype(dtype: str) -> None:
    if dtype.startswith("ov-"):
        raise ConfigError(f"--dtype {dtype} is not available with --ray yet: use fp32, bf16, "
                          "int8 or auto")


def connect(ray, address: str, log: Log) -> bool:
    """Join the cluster at `address` (auto: RAY_ADDRESS, else start a local one). True
    when this call connected (and so should disconnect)."""
    if ray.is_initialized():
        return False
    check_address(address)
    try:
        context = ray.init(address=None if address == "auto" else address,
                           logging_level=logging.WARNING, log_to_driver=False,
                           configure_logging=False)
    except ConnectionError as exc:
        raise ClusterError(f"--ray {address}: no Ray cluster answers there ({exc}). Start one "
                           "with `ray start --head`, or use --ray auto") from None
    url = getattr(context, "dashboard_url", None)
    if url:
        log(f"Ray dashboard: {url if '://' in url else 'http://' + url}")
    return True


def check_address(address: str) -> None:
    """Before anything slow: Ray is installed, and the cluster's head answers. (Ray
    retries an address where nothing listens for minutes, silently.)"""
    import_ray()
    target = os.environ.get("RAY_ADDRESS") if address == "auto" else address
    if target and target != "auto":
        check_reachable(target, "RAY_ADDRESS" if address == "auto" else "--ray")


def check_reachable(address: str, setting: str) -> None:
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{setting} {address}: give HOST:PORT of the cluster's head (the "
                          "address `ray start --head` prints), or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise ClusterError(f"{setting} {address}: no Ray cluster answers there "
                           f"({exc.strerror or exc}). Start one with `ray start --head`, or "
                           "use --ray auto for one on this machine") from None


def plan_cluster(ray, options: RayOptions, device: str) -> ClusterPlan:
    """How many encoder actors, where, and what each reserves, from the live nodes."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = sum(r.get("GPU", 0) for r in nodes)
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device}: --ray runs on auto, cpu or cuda")
    if device == "cuda" and not gpus:
        raise ClusterError("--device cuda, but the Ray cluster has no GPU")
    if gpus and device != "cpu":
        cpus = options.actor_cpus or 1.0
        # The CPUs a GPU node has per GPU, but the encoder's, decode for that GPU.
        per_gpu = min(r.get("CPU", 0) / r["GPU"] for r in nodes if r.get("GPU"))
        return ClusterPlan(options.actors or int(gpus), "cuda",
                           {"num_gpus": 1, "num_cpus": cpus}, max(1, round(cpus)), len(nodes),
                           decode_threads=max(1, int(per_gpu - cpus)))
    cpu_nodes = [r["CPU"] for r in nodes if r.get("CPU", 0) > 0]
    if not cpu_nodes:
        raise ClusterError("the Ray cluster has no CPU to run on")
    # One actor per node takes the cores for torch but one (half of a one-core node),
    # which decodes for it.
    smallest = min(cpu_nodes)
    cpus = options.actor_cpus or max(smallest - 1, smallest / 2)
    if cpus > max(cpu_nodes):
        raise ConfigError(f"--ray-actor-cpus {cpus:g}: no node of the cluster has that many "
                          f"(the largest has {max(cpu_nodes):g})")
    return ClusterPlan(options.actors or len(cpu_nodes), "cpu", {"num_cpus": cpus},
                       max(1, round(cpus)), len(nodes), decode_threads=1)


class EncoderPool:
    """The encoder actors: started, checked, replaced when one dies. An actor gets work
    only once it has loaded the model, and at most PER_ACTOR batches at a time."""

    def __init__(self, ray, plan: ClusterPlan, model_id: str, dtype: str, model_key: str,
                 decoder_args: tuple):
        self.ray, self.plan, self.model_key = ray, plan, model_key
        # Decoders reserve no CPU: the driver bounds their work (PER_ACTOR batches), and
        # a reservation could starve them behind an actor waiting to be placed.
        self.args = (model_id, plan.device, dtype, plan.threads, decoder_args,
                     {"num_cpus": 0, "max_restarts": 0, "max_concurrency": PER_ACTOR})
        self.actor_class = ray.remote(Encoder).options(
            max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD", **plan.resources)
        self.load: dict = {}       # ready actor -> batches in flight
        self.decoder: dict = {}    # ready actor -> the decoder on its node
        self.starting: dict = {}   # describe() ref -> actor still loading the model
        self.waiting_since = time.monotonic()
        self.ready_after = 0.0     # when the first actor was ready
        for _ in range(plan.actors):
            self.start_one()

    def start_one(self) -> None:
        actor = self.actor_class.remote(*self.args)
        self.starting[actor.describe.remote()] = actor

    def pick(self):
        """The least busy ready actor with room, or None."""
        actor = min(self.load, key=self.load.get, default=None)
        return actor if actor is not None and self.load[actor] < PER_ACTOR else None

    def started(self, ref) -> None:
        """A describe() call returned: the actor is ready, or it failed to start."""
        actor = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            if getattr(exc, "actor_init_failed", False) or \
                    isinstance(exc, self.ray.exceptions.RayTaskError):
                raise ClusterError(f"an encoder actor could not load the model: "
                                   f"{_cause(exc)}") from None
            self.start_one()  # placed on a node that died before it started: place another
            return
        if info["model_key"] != self.model_key:
            raise ClusterError(f"the encoder on {info['host']} loaded {info['model_key']}, and "
                               f"this driver {self.model_key}: every node must see the same "
                               "model files")
        self.load[actor], self.decoder[actor] = 0, info["decoder"]
        self.ready_after = self.ready_after or time.monotonic()

    def lost(self, actor) -> None:
        """An actor died (its node went down): replace it; Ray places the new one where
        resources are free."""
        if self.load.pop(actor, None) is not None:
            for dead in (actor, self.decoder.pop(actor)):  # unreachable, maybe alive
                self.ray.kill(dead, no_restart=True)
            self.start_one()

    def check_progress(self) -> None:
        if self.load:
            self.waiting_since = time.monotonic()
        elif time.monotonic() - self.waiting_since > START_SECONDS:
            raise ClusterError(f"no encoder actor has been ready for {START_SECONDS:.0f} s: the "
                               f"cluster cannot place one ({self.plan.resources} each); see "
                               "`ray status`")


class RayEncode:
    """Run.encode_pending on a cluster: claimed batches -> decoder actors -> encoder actors
    -> the driver's writer, with a bounded number of batches in flight."""

    def __init__(self, ray, plan: ClusterPlan, model_id: str, dtype: str,
                 options: PredictOptions, log: Log):
        self.ray, self.plan, self.model_id, self.dtype = ray, plan, model_id, dtype
        self.options, self.log = options, log

    def __call__(self, run: Run) -> None:
        jobs = run.jobs()
        first = next(jobs, None)
        if first is None:
            return  # nothing to decode: place no actors
        started, cpu = time.monotonic(), time.process_time()
        # A batch is decoded on the node of the actor that embeds it: only file bytes
        # cross the network, never pixels.
        pool = EncoderPool(self.ray, self.plan, self.model_id, self.dtype,
                           run.version.model_key,
                           (run.model.preprocess, not self.options.exact,
                            self.options.max_pixels, self.plan.decode_threads))
        retry: list[tuple[list, int]] = [(first, 0)]
        inflight: dict = {}  # encode ref -> (jobs, actor, attempts)
        exhausted = False
        with Writer(run) as writer:
            results = _Results(writer, rows=max(256, 4 * run.batch_size))
            while not (exhausted and not inflight and not retry):
                while (actor := pool.pick()) is not None:
                    if retry:
                        chunk, attempts = retry.pop()
                    elif not exhausted and (chunk := next(jobs, None)) is not None:
                        attempts = 0
                    else:
                        exhausted = True
                        break
                    decoded = pool.decoder[actor].decode.remote(chunk)
                    inflight[actor.encode.remote(decoded)] = (chunk, actor, attempts)
                    pool.load[actor] += 1
                if inflight or pool.starting:
                    self.wait(pool, inflight, retry, results)
            results.flush()
        done = run.summary.encoded + sum(run.summary.failed.values())
        run.summary.feed = (f"{self.plan.describe()}; actors ready in "
                            f"{pool.ready_after - started:.0f} s; driver "
                            f"{1000 * (time.process_time() - cpu) / max(1, done):.1f} ms CPU "
                            "per image")

    def wait(self, pool: EncoderPool, inflight: dict, retry: list, results: "_Results") -> None:
        ready, _ = self.ray.wait([*inflight, *pool.starting], num_returns=1,
                                 timeout=WRITE_SECONDS)
        for ref in ready:
            if ref in pool.starting:
                pool.started(ref)
                continue
            chunk, actor, attempts = inflight.pop(ref)
            if actor in pool.load:
                pool.load[actor] -= 1
            try:
                results.add(*self.ray.get(ref))
            except self.ray.exceptions.RayError as exc:
                self.failed(pool, actor, chunk, attempts, exc, retry)
        pool.check_progress()
        if results.due():
            results.flush()

    def failed(self, pool: EncoderPool, actor, chunk: list, attempts: int, exc, retry: list):
        """A batch failed on the cluster. Nothing of it was written, so it is sent again
        (to a live actor); a dead actor is replaced."""
        if isinstance(exc, self.ray.exceptions.RayActorError):
            pool.lost(actor)
        if attempts + 1 >= MAX_ATTEMPTS:
            raise ClusterError(f"a batch of {len(chunk)} images failed {MAX_ATTEMPTS} times on "
                               f"the cluster: {_cause(exc)}") from None
        self.log(f"a batch of {len(chunk)} images failed on the cluster "
                 f"({type(exc).__name__}); sending it again")
        retry.append((chunk, attempts + 1))


class _Results:
    """Encoded batches gathered into larger writes: at least `rows`, or what came in the
    last WRITE_SECONDS (so progress and a crash lose little)."""

    def __init__(self, writer: Writer, rows: int):
        self.writer, self.rows = writer, rows
        self.parts: list[tuple] = []
        self.held = 0  # images in parts
        self.since = time.monotonic()

    def add(self, ids: list[int], vectors: np.ndarray, bad: list[tuple]) -> None:
        if not self.parts:
            self.since = time.monotonic()
        self.parts.append((ids, vectors, bad))
        self.held += len(ids) + len(bad)
        self.writer.run.summary.image_encoder_calls += bool(ids)
        if self.held >= self.rows:
            self.flush()

    def due(self) -> bool:
        return bool(self.parts) and time.monotonic() - self.since >= WRITE_SECONDS

    def flush(self) -> None:
        if not self.parts:
            return
        ids = [i for part in self.parts for i in part[0]]
        bad = [b for part in self.parts for b in part[2]]
        vectors = torch.from_numpy(np.concatenate([p[1] for p in self.parts if p[0]])) \
            if ids else None
        self.parts, self.held = [], 0
        self.writer.submit(batch_from_decoded(ids, None, bad), vectors, store_embeddings=True)


def _cause(exc: Exception) -> str:
    """What went wrong on the cluster in one line, without Ray's traceback: the message of
    the exception raised there (a labelassist error is shown as the CLI shows it)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, LabelAssistError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.split("Error: ", 1)[1] if last.startswith("labelassist.errors.") else last
