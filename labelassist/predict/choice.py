"""`--dtype auto` on a CPU: the fastest runtime whose agreement with torch fp32 has been
measured on this workspace's own images.

Each candidate (torch bf16 and int8; OpenVINO bf16 and int8 with the `openvino` extra)
encodes the same sample of decoded images as the exact fp32 tower. One that changes the
top-1 class of more than 0.5% of them, or moves the top-1 probability by more than 0.02 on
average (a calibration drift that would shift the audit's thresholds), is disqualified.
The choice, with every candidate's figures, is stored in the ledger, keyed by the model,
the prompt set, the kind of CPU and the software versions: measured once, used by every
later predict, shown by `status` and the report.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sqlalchemy import func, select

from ..labels import LabelSet
from ..db import Database
from ..db.models import Image, RuntimeChoice, utcnow
from ..errors import ConfigError, ModelLoadError
from .feed import load_pixels
from ..images import DEFAULT_MAX_PIXELS
from ..model.load import LoadedModel, cpu_has_fast_bf16, cpu_identity, quantise_int8
from .run import image_paths, version_name
from ..model.zeroshot import build_text_classifier
from . import describe_choice, payoff
from ..model import openvino as ov_runtime

SAMPLE = 256            # images measured
CALIBRATION = 64        # of them, int8 is calibrated on (the speed is the same on more)
MIN_AGREEMENT = 0.995   # top-1 agreement with fp32, at least
MAX_DRIFT = 0.02        # mean |change| of the top-1 probability, at most
BATCH = 32

Log = Callable[[str], None]


@dataclass
class Trial:
    runtime: str
    images_per_second: float
    agreement: float
    drift: float
    disqualified: str | None = None  # why, when it is
    seconds: float = 0.0             # to build it and encode the sample


@dataclass
class Measurement:
    runtime: str                   # the choice
    sample: int
    seconds: float
    trials: list[Trial] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"runtime": self.runtime, "sample": self.sample, "seconds": self.seconds,
                "min_agreement": MIN_AGREEMENT, "max_drift": MAX_DRIFT,
                "trials": [dataclasses.asdict(t) for t in self.trials]}


def software() -> str:
    import transformers

    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    if ov_runtime.available():
        parts.append(f"openvino {ov_runtime.version()}")
    return ", ".join(parts)


def stored_choice(db: Database, reference: LoadedModel, label_set: LabelSet) -> dict | None:
    """The newest measurement for this model, prompt set, CPU kind and software."""
    with db.read() as session:
        row = session.scalars(select(RuntimeChoice).where(
            RuntimeChoice.model_key == reference.model_key,
            RuntimeChoice.label_fingerprint == _fingerprint(reference, label_set),
            RuntimeChoice.cpu == cpu_identity(), RuntimeChoice.software == software())
            .order_by(RuntimeChoice.id.desc()).limit(1)).first()
        return None if row is None else row.measurement


def version_name_for(reference: LoadedModel, label_set: LabelSet, runtime: str) -> str:
    """The model_version that predict stores with this runtime: torch's dtypes share the
    fp32 version (their embeddings agree to rounding); OpenVINO's are versions of their
    own, so their embeddings are never mixed with torch's."""
    suffix = runtime if runtime.startswith("ov-") else ""
    return version_name(dataclasses.replace(reference, runtime=suffix), label_set)


def _fingerprint(model: LoadedModel, label_set: LabelSet) -> str:
    return label_set.fingerprint(model.model_id, model.revision)


def measure_runtimes(db: Database, reference: LoadedModel, label_set: LabelSet, *,
                     sample: int = SAMPLE, log: Log = lambda message: None,
                     only: list[str] | None = None) -> Measurement:
    """Measure every candidate on `sample` of the workspace's images and store the choice.
    `reference` is the torch fp32 model on the CPU; it is left as it was. `only`: try
    just these runtimes, in this order, and stop at the first that qualifies (they are
    the ones that ran fastest on this machine before)."""
    started = time.perf_counter()
    ids, hashes, pixels = workspace_sample(db, reference, sample)
    if not ids:
        raise ConfigError("no decodable images to measure the runtimes on: ingest some first")
    log(f"measuring the CPU runtimes on {len(ids):,} of this workspace's images ...")
    classifier = build_text_classifier(reference, label_set)
    exact = _encode(reference, pixels)
    exact_probs = classifier.probabilities(exact[0])
    trials = [_trial("fp32", exact, exact_probs, exact_probs)]
    trials[0].seconds = time.perf_counter() - started
    log(f"  {_describe(trials[0])}")
    candidates = dict(_candidates(reference, hashes, pixels, borrow=only is not None))
    if only is not None:  # by kind: ov-int8 is ov-int8.<calibration> here
        candidates = {n: candidates[n] for kind in only for n in candidates
                      if payoff.kind_of(n) == kind}
    for name in candidates:
        trials.append(_try(name, candidates[name], classifier, pixels, exact_probs))
        log(f"  {_describe(trials[-1])}")
        if only is not None and trials[-1].disqualified is None:
            break
    fit = [t for t in trials if t.disqualified is None]
    best = max(fit, key=lambda t: t.images_per_second)
    result = Measurement(best.runtime, len(ids), time.perf_counter() - started, trials)
    _store(db, reference, label_set, result)
    payoff.remember(payoff.machine_key(cpu_identity(), software(), reference.model_key),
                    result.to_json())
    return result


def _try(name: str, build, classifier, pixels: torch.Tensor, exact_probs) -> Trial:
    """One candidate built and run on the sample, timed whole."""
    started = time.perf_counter()
    try:
        model = build()
    except (ModelLoadError, RuntimeError, ImportError, OSError) as exc:  # cannot run here
        return Trial(name, 0.0, 0.0, 0.0, f"failed: {str(exc).splitlines()[0]}")
    encoded = _encode(model, pixels)
    trial = _trial(name, encoded, classifier.probabilities(encoded[0]), exact_probs)
    trial.seconds = time.perf_counter() - started
    return trial


def _describe(trial: Trial) -> str:
    verdict = f" - {trial.disqualified}" if trial.disqualified else ""
    return (f"{trial.runtime:>22s}: {trial.images_per_second:6.1f} images/s, top-1 agreement "
            f"{trial.agreement:7.2%}, drift {trial.drift:.4f}{verdict}")


def _trial(name: str, encoded: tuple[torch.Tensor, float], probs: torch.Tensor,
           exact_probs: torch.Tensor) -> Trial:
    embeddings, rate = encoded
    agreement = (probs.argmax(1) == exact_probs.argmax(1)).float().mean().item()
    drift = (probs.max(1).values - exact_probs.max(1).values).abs().mean().item()
    why = None
    if not torch.isfinite(embeddings).all():  # seen: OpenVINO bf16 on a tiny test model
        why, agreement, drift = "non-finite embeddings", 0.0, 1.0
    elif agreement < MIN_AGREEMENT:
        why = f"agreement below {MIN_AGREEMENT:.1%}"
    elif drift > MAX_DRIFT:
        why = f"drift above {MAX_DRIFT}"
    return Trial(name, rate, agreement, drift, why)


def _encode(model: LoadedModel, pixels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Embeddings of the sample, and the tower's images/s over it (after one warm batch)."""
    model.encode_images(pixels[:BATCH])
    started = time.perf_counter()
    out = torch.cat([model.encode_images(pixels[i:i + BATCH])
                     for i in range(0, len(pixels), BATCH)])
    return out, len(pixels) / max(time.perf_counter() - started, 1e-9)


def _candidates(reference: LoadedModel, hashes: list[str], pixels: torch.Tensor,
                borrow: bool = False):
    """(name, build) of each runtime to try. torch's are built on a copy of the
    reference, which the measurement still needs as it was. borrow: where this
    workspace's own int8 tower is not calibrated yet, first try the newest one that
    another workspace calibrated on this machine (NNCF's calibration is most of int8's
    trial: about 25 s of 30 for ViT-B/32 on 2 cores); like every candidate it must agree
    with fp32 on this workspace's sample, and the workspace's own follows if it does not."""
    def on_a_copy(name: str):
        return lambda: apply_runtime(
            dataclasses.replace(reference, model=copy.deepcopy(reference.model)), name)

    if cpu_has_fast_bf16():
        yield "bf16", on_a_copy("bf16")
    yield "int8", on_a_copy("int8")
    if not ov_runtime.available():
        return
    if cpu_has_fast_bf16():
        yield "ov-bf16", lambda: ov_runtime.on_openvino(reference, "ov-bf16")
    name = int8_name(hashes[:CALIBRATION])
    tag = name.split(".", 1)[1]
    own = ov_runtime.quantised_tower_path(reference.model_key, tag).is_file()
    others = [] if own or not borrow else [
        t for t in ov_runtime.calibrated_tags(reference.model_key) if t != tag]
    if others:
        borrowed = f"ov-int8.{others[0]}"
        yield borrowed, lambda: apply_runtime(reference, borrowed)
    yield name, lambda: calibrated_int8(reference, name, pixels[:CALIBRATION])


def int8_name(hashes: list[str]) -> str:
    """The OpenVINO int8 runtime calibrated on these images (by their content hashes)."""
    return f"ov-int8.{ov_runtime.calibration_tag(hashes)}"


def calibrated_int8(reference: LoadedModel, name: str, pixels: torch.Tensor) -> LoadedModel:
    """The reference with an int8 tower calibrated on these uint8 crops (cached)."""
    return ov_runtime.on_openvino(reference, name, calibration=normalised(reference, pixels))


def normalised(model: LoadedModel, pixels: torch.Tensor) -> list[np.ndarray]:
    """uint8 crops -> one normalised float32 image per item, as NNCF calibrates on."""
    scale, shift = model.preprocess.scale_and_shift()
    return [(p.numpy()[None].astype(np.float32) * scale - shift).astype(np.float32)
            for p in pixels]


def workspace_sample(db: Database, model: LoadedModel, count: int
                     ) -> tuple[list[int], list[str], torch.Tensor]:
    """Up to `count` decodable images, the same ones on every run while the workspace
    holds them: the first by content hash, which is as good as a random draw. Decoded as
    predict decodes them (JPEG draft), to uint8 crops."""
    with db.read() as session:
        rows = session.execute(select(Image.id, Image.sha256).where(Image.error.is_(None))
                               .order_by(Image.sha256).limit(count * 2)).all()
        paths = image_paths(session, [i for i, _ in rows])
    ids, hashes, crops = [], [], []
    for image_id, sha in rows:
        crop = load_pixels(paths.get(image_id, []), model.preprocess, True, DEFAULT_MAX_PIXELS)
        if isinstance(crop, np.ndarray):
            ids.append(image_id), hashes.append(sha), crops.append(crop)
        if len(ids) == count:
            break
    pixels = torch.from_numpy(np.stack(crops)) if crops else torch.empty(0)
    return ids, hashes, pixels


def _store(db: Database, reference: LoadedModel, label_set: LabelSet,
           result: Measurement) -> None:
    with db.write() as session:
        session.add(RuntimeChoice(model_key=reference.model_key,
                                  label_fingerprint=_fingerprint(reference, label_set),
                                  cpu=cpu_identity(), software=software(),
                                  runtime=result.runtime,
                                  model_version=version_name_for(reference, label_set,
                                                                 result.runtime),
                                  measurement=result.to_json(),
                                  created_at=utcnow()))


def apply_runtime(reference: LoadedModel, runtime: str) -> LoadedModel:
    """The torch fp32 reference turned into a runtime by name (it may be changed)."""
    if runtime == "fp32":
        return reference
    if runtime == "bf16":
        return dataclasses.replace(reference, model=reference.model.to(torch.bfloat16),
                                   dtype=torch.bfloat16)
    if runtime == "int8":
        return dataclasses.replace(reference, model=quantise_int8(reference.model))
    return ov_runtime.on_openvino(reference, runtime)


def needs_choice(device: str, dtype: str) -> bool:
    """Whether the runtime comes from this workspace (measured, or calibrated on it):
    --dtype auto or ov-int8 on a CPU. Elsewhere the name alone says what to load."""
    from ..model.load import resolve_device

    return dtype in ("auto", "ov-int8") and resolve_device(device).type == "cpu"


def load_for_predict(db: Database, model_id: str, label_set: LabelSet, *, device: str,
                     dtype: str, log: Log = lambda message: None,
                     sample: int = SAMPLE) -> tuple[LoadedModel, str]:
    """The model predict runs, and the runtime's name (what worker processes load).
    On a CPU, `auto` takes the stored choice for this workspace, or measures when that
    pays on the images pending (payoff.py), else runs torch's default unmeasured."""
    from ..model.load import load_model

    if not needs_choice(device, dtype):
        return load_model(model_id, device=device, dtype=dtype), dtype
    reference = load_model(model_id, device="cpu", dtype="fp32")
    if dtype == "ov-int8":
        ids, hashes, pixels = workspace_sample(db, reference, min(sample, CALIBRATION))
        if not ids:
            raise ConfigError("--dtype ov-int8 calibrates on the workspace's images, and it "
                              "has none that decode: ingest some first")
        log(f"calibrating int8 on {len(ids):,} of this workspace's images ...")
        name = int8_name(hashes)
        return calibrated_int8(reference, name, pixels), name
    choice = stored_choice(db, reference, label_set)
    if choice is None:
        plan = plan_trial(db, reference, label_set, sample)
        log(plan.reason)
        if plan.measure:
            choice = measure_runtimes(db, reference, label_set, sample=sample, log=log,
                                      only=plan.candidates).to_json()
        else:
            name = default_runtime()
            return apply_runtime(reference, name), name
    try:
        model = apply_runtime(reference, choice["runtime"])
    except ModelLoadError:  # the calibrated int8 tower is no longer in the cache
        choice = measure_runtimes(db, reference, label_set, sample=sample, log=log).to_json()
        model = apply_runtime(reference, choice["runtime"])
    log(f"runtime: {describe_choice(choice)}")
    return model, choice["runtime"]


def default_runtime() -> str:
    """What predict runs unmeasured: bf16 where the CPU is fast at it, else fp32."""
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def plan_trial(db: Database, reference: LoadedModel, label_set: LabelSet,
               sample: int) -> payoff.Plan:
    """Whether measuring pays on the images this predict will encode: from this
    machine's memory of an earlier trial, else from a quick probe of two batches."""
    default, pending = default_runtime(), pending_encodes(db, reference, label_set)
    memory = payoff.remembered(payoff.machine_key(cpu_identity(), software(),
                                                  reference.model_key))
    if memory is not None:
        return payoff.from_memory(pending, default, memory, sample)
    if payoff.never_pays(pending, sample):
        return payoff.Plan(False, f"runtime: torch {default}, not measured: on {pending:,} "
                                  "images to encode, measuring would cost more than it can "
                                  "save (`labelassist runtimes` measures now)")
    _, _, pixels = workspace_sample(db, reference, payoff.PROBE)
    fp32 = _seconds_per_image(reference, pixels)
    copied = dataclasses.replace(reference, model=copy.deepcopy(reference.model))
    fast = fp32 if default == "fp32" else _seconds_per_image(apply_runtime(copied, default),
                                                             pixels)
    count = len(list(_candidates(reference, [], pixels[:0])))
    return payoff.from_probe(pending, default, sample, count, fp32, fast)


def _seconds_per_image(model: LoadedModel, pixels: torch.Tensor) -> float:
    model.encode_images(pixels[:2])  # warm
    started = time.perf_counter()
    model.encode_images(pixels)
    return (time.perf_counter() - started) / max(len(pixels), 1)


def pending_encodes(db: Database, reference: LoadedModel, label_set: LabelSet) -> int:
    """Images the torch version has yet to encode (re-scoring stored embeddings costs no
    tower time, so it counts for nothing here)."""
    from ..db.claims import pending_images_query
    from ..db.models import ModelVersion

    name = version_name_for(reference, label_set, "fp32")
    with db.read() as session:
        version_id = session.scalar(select(ModelVersion.id).where(ModelVersion.name == name))
        query = pending_images_query(version_id if version_id is not None else -1,
                                     reference.model_key, stored=False, now=utcnow())
        return session.scalar(select(func.count()).select_from(query.subquery()))
