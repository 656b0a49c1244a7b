"""The image tower on OpenVINO: bf16, or int8 through NNCF post-training quantisation.

The torch tower is converted once per model and cached (an IR per model_key and OpenVINO
version); the int8 IR is cached per calibration set too, since its weights depend on the
images it was calibrated on. A compiled tower takes float pixels already normalised and
returns the image features; model.py normalises them, so every runtime's embeddings cross
the same boundary. The text tower stays in torch: it runs once per prompt set.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError
from ..workspace import cache_root

PRECISIONS = {"ov-bf16": "bf16", "ov-fp32": "f32", "ov-int8": "f32"}  # int8: the rest in f32
INSTALL_HINT = "pip install 'labelassist[openvino]'"


def no_telemetry() -> None:
    """OpenVINO and NNCF send usage telemetry when `openvino_telemetry` imports, and its
    first import writes ~/intel/openvino_ga_cid and ~/intel/stats. Both fall back to a
    silent stub when it cannot be imported: labelassist writes nothing outside the
    workspace, the cache and Label Studio's data folder, and sends nothing."""
    sys.modules.setdefault("openvino_telemetry", None)  # None: its import fails


def require_openvino():
    no_telemetry()
    try:
        import openvino
    except ImportError:
        raise ModelLoadError(f"the OpenVINO runtime is not installed: {INSTALL_HINT}") from None
    return openvino


def require_nncf():
    no_telemetry()
    try:
        import nncf
    except ImportError:
        raise ModelLoadError(f"int8 needs NNCF, which is not installed: {INSTALL_HINT}") \
            from None
    return nncf


@functools.lru_cache(maxsize=1)
def core():
    """One OpenVINO Core per process. Each Core brings its own CPU plugin and thread
    pools: with a new one per compiled tower, a process that had compiled a dozen and
    then started worker processes segfaulted (tests/test_runtimes.py then
    tests/test_feed.py in one pytest process, 3 runs out of 3; with one Core, 0 of 3)."""
    return require_openvino().Core()


def version() -> str:
    """OpenVINO's release, without its build tag."""
    return require_openvino().__version__.split("-")[0]


def available() -> bool:
    try:
        require_openvino()
        return True
    except ModelLoadError:
        return False


def cache_dir() -> Path:
    """Where converted towers live, in labelassist's cache beside the toy model."""
    return cache_root() / "openvino"


class _Tower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pixel_values)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def _model_dir(model_key: str) -> Path:
    """The cache's folder of one model's towers (for this OpenVINO version)."""
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in model_key)
    return cache_dir() / f"{safe}-ov{version()}"


def _tower_dir(model_key: str, tag: str) -> Path:
    return _model_dir(model_key) / tag


def _save_atomically(ov_model, target: Path) -> Path:
    """Write the IR beside the target and rename it into place: a killed conversion
    leaves no half IR, and two processes converting at once both end with a whole one."""
    ov = require_openvino()
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    ov.save_model(ov_model, partial / "tower.xml", compress_to_fp16=False)
    try:
        partial.rename(target)
    except OSError:  # another process got there first: its IR is the same
        shutil.rmtree(partial, ignore_errors=True)
    return target / "tower.xml"


def export_tower(model: torch.nn.Module, model_key: str, image_size: tuple[int, int]) -> Path:
    """The fp32 IR of the image tower, converted once per model_key (3.5 s for ViT-B/32 on
    a 2-core Xeon; 13 to 15 s were measured on an AMD EPYC)."""
    target = _tower_dir(model_key, "fp32")
    if (target / "tower.xml").is_file():
        return target / "tower.xml"
    import warnings

    ov = require_openvino()
    example = torch.zeros(1, 3, *image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes: fixed here anyway
        ov_model = ov.convert_model(_Tower(model.eval()), example_input=example,
                                    input=[(-1, 3, *image_size)])
    return _save_atomically(ov_model, target)


def calibration_tag(image_hashes: Iterable[str]) -> str:
    """A short name for a calibration set: the hash of its images' content hashes."""
    return hashlib.sha256("\n".join(sorted(image_hashes)).encode()).hexdigest()[:10]


def quantised_tower_path(model_key: str, tag: str) -> Path:
    return _tower_dir(model_key, f"int8-{tag}") / "tower.xml"


def calibrated_tags(model_key: str) -> list[str]:
    """The calibration tags of this model's int8 towers already in the cache (whatever
    workspace calibrated them), the newest first."""
    found = [(path.stat().st_mtime, path.parent.name.removeprefix("int8-"))
             for path in _model_dir(model_key).glob("int8-*/tower.xml")]
    return [tag for _, tag in sorted(found, reverse=True)
            if len(tag) == 10 and all(c in "0123456789abcdef" for c in tag)]


def quantise_tower(fp32_ir: Path, model_key: str, tag: str,
                   calibration: list[np.ndarray]) -> Path:
    """int8 weights and activations by NNCF, calibrated on the workspace's own images
    (normalised pixels, one image per item). model_type=TRANSFORMER keeps the attention's
    softmax and layer norms out of int8: without it int8 wrecks the embeddings."""
    target = quantised_tower_path(model_key, tag)
    if target.is_file():
        return target
    nncf = require_nncf()
    import contextlib
    import io
    import logging

    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bars: noise in our output
        quantised = nncf.quantize(core().read_model(fp32_ir), nncf.Dataset(calibration),
                                  model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calibration))
    return _save_atomically(quantised, target.parent)


class CompiledTower:
    """A compiled IR: (B, 3, H, W) float32 normalised pixels -> (B, D) float32 features."""

    def __init__(self, ir: Path, precision: str, threads: int | None = None):
        self.ir, self.precision = ir, precision
        self.compiled = core().compile_model(str(ir), "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "CACHE_DIR": str(cache_dir() / "compiled")})
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()  # one request: serve may encode from several threads

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(pixels.numpy(), dtype=np.float32)
        with self.lock:
            result = self.request.infer({0: array})
            features = np.array(result[self.compiled.output(0)], dtype=np.float32)
        return torch.from_numpy(features)


def on_openvino(model, runtime: str, calibration: list[np.ndarray] | None = None):
    """The LoadedModel with its image tower on OpenVINO. `model` is the torch fp32 model
    on the CPU (its text tower stays in use). runtime: ov-bf16, ov-fp32, or
    ov-int8.<calibration tag>, whose IR comes from the cache or, given the calibration
    images, from NNCF."""
    import dataclasses

    kind, _, tag = runtime.partition(".")
    if kind not in PRECISIONS or (kind == "ov-int8") != bool(tag):
        raise ModelLoadError(f"unknown OpenVINO runtime {runtime!r}: use ov-bf16, or let "
                             "--dtype auto calibrate int8 on this workspace's images")
    if model.device.type != "cpu":
        raise ModelLoadError("OpenVINO runs the image tower on the CPU: use --device cpu")
    if model.runtime or model.dtype != torch.float32:
        raise ValueError("on_openvino needs the torch fp32 model")
    if kind == "ov-int8":
        ir = quantised_tower_path(model.model_key, tag)
        if not ir.is_file():  # the fp32 IR is only needed to calibrate a new one
            if calibration is None:
                raise ModelLoadError(f"no int8 tower calibrated as {tag} in {cache_dir()}: "
                                     "run predict --dtype auto to measure and calibrate again")
            fp32 = export_tower(model.model, model.model_key, model.preprocess.output_size)
            ir = quantise_tower(fp32, model.model_key, tag, calibration)
    else:
        ir = export_tower(model.model, model.model_key, model.preprocess.output_size)
    return dataclasses.replace(model, tower=CompiledTower(ir, PRECISIONS[kind]),
                               runtime=runtime)
