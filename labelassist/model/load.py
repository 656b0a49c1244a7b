"""Load CLIP-family models (CLIP, SigLIP) through one factory: a hub id or a local dir.

The device boundary. The model, its inputs and the text classifier's weights live on the
model's device (cpu, cuda or mps). What leaves this module and zeroshot.py is float32 on
the CPU: embeddings from `encode_images` / `encode_texts`, probabilities from
`TextClassifier.probabilities`. Inputs may come from anywhere: uint8 or float pixels from
the CPU feed (pinned for CUDA), stored embeddings read from the database. So no caller ever
needs to know where the model runs, and numpy never meets a device tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..images import Preprocess

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    preprocess: Preprocess
    model_id: str
    name: str
    revision: str
    device: torch.device
    dtype: torch.dtype
    # Another runtime's image tower (runtimes/): normalised float pixels -> features. Its
    # name is part of model_key, so its embeddings are never mixed with torch's.
    tower: Callable[[torch.Tensor], torch.Tensor] | None = None
    runtime: str = ""  # "" for torch (every dtype), else e.g. "ov-bf16", "ov-int8.<calib>"
    _normaliser_on: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def model_key(self) -> str:
        """Key of stored embeddings: same weights, same vectors, whatever the prompts."""
        return f"{self.name}@{self.revision[:12]}" + (f"+{self.runtime}" if self.runtime else "")

    @property
    def identity(self) -> str:
        """The weights and the runtime that runs them: what a model_version's name hashes."""
        return self.revision + (f"+{self.runtime}" if self.runtime else "")

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())

    @property
    def logit_bias(self) -> float | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach().float())

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 crops (normalised here, on the device) or float pixel values
        already normalised -> L2-normalised float32 embeddings (B, D) on the CPU."""
        pixels = pixels.to(self.device, non_blocking=True)
        if pixels.dtype == torch.uint8:
            scale, shift = self._normaliser()
            pixels = pixels.float() * scale - shift
        if self.tower is not None:
            return _normalise(self.tower(pixels.float()))
        features = self.model.get_image_features(pixel_values=pixels.to(self.dtype))
        return _normalise(_features(features)).cpu()

    def _normaliser(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The preprocessing's scale and shift, as (3, 1, 1) tensors on the device."""
        if self._normaliser_on is None or self._normaliser_on[0] != self.device:
            scale, shift = self.preprocess.scale_and_shift()
            self._normaliser_on = (self.device, torch.from_numpy(scale).to(self.device),
                                   torch.from_numpy(shift).to(self.device))
        return self._normaliser_on[1], self._normaliser_on[2]

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        siglip = "siglip" in self.model.config.model_type
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(texts, padding="max_length" if siglip else True,
                                truncation=True, max_length=max_length, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()
                  if k in ("input_ids", "attention_mask")}
        if siglip:
            tokens.pop("attention_mask", None)  # SigLIP is trained without one
        return _normalise(_features(self.model.get_text_features(**tokens))).cpu()


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projection.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ModelLoadError(f"--device {device!r}: use auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda, but torch sees no CUDA GPU (use --device cpu)")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run several times faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def cpu_identity() -> str:
    """The kind of CPU, as far as torch's results and speed depend on it: its vector ISA,
    the vendor (MKL and oneDNN pick other kernels on AMD and Intel) and AMX. "AVX512"
    alone matched an Intel Xeon with AMX against an AMD EPYC, where training the toy
    model summed in another order and runtimes run at other speeds."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    vendor = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                   if line.startswith("vendor_id")), "")
    amx = " amx" if " amx_tile" in info else ""
    return f"{torch.backends.cpu.get_cpu_capability()} {vendor}{amx}".strip()


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype.startswith("ov-"):
        if device.type != "cpu":
            raise ModelLoadError(f"--dtype {dtype} is a CPU runtime (OpenVINO); use bf16 or "
                                 "fp32 on a GPU")
        return torch.float32  # the torch model stays fp32: the reference and the text tower
    if dtype == "int8":
        if device.type != "cpu":
            raise ModelLoadError("--dtype int8 is a CPU path (dynamic quantisation); use bf16 "
                                 "or fp32 on a GPU")
        return torch.float32  # weights are quantised after loading; activations stay fp32
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r}: use auto, fp32, bf16, int8, ov-bf16 or "
                             "ov-int8")
    return DTYPES[dtype]


def load_model(model_id_or_path: str, device: str = "auto", dtype: str = "fp32") -> LoadedModel:
    """Load a CLIP-family model, its tokenizer and its preprocessing, once per worker."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress goes to stderr; theirs is noise
    hf_logging.set_verbosity_error()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source = _resolve_source(model_id_or_path)
    local_only = not os.path.isdir(source) and not _hub_reachable()
    try:
        model = AutoModel.from_pretrained(source, dtype=torch_dtype, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        processor = AutoImageProcessor.from_pretrained(source, backend="pil",
                                                       local_files_only=local_only)
    except OSError as exc:
        raise ModelLoadError(_explain_load_failure(model_id_or_path, exc, local_only)) \
            from None
    if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
        raise ModelLoadError(f"{model_id_or_path} is a {type(model).__name__}, not a CLIP-family "
                             "model with image and text towers")
    model.to(dev).eval()
    if dtype == "int8":
        model = quantise_int8(model)
    local_dir = source if os.path.isdir(source) else _snapshot_dir(source)
    loaded = LoadedModel(model=model, tokenizer=tokenizer,
                         preprocess=Preprocess.from_processor(processor),
                         model_id=model_id_or_path, name=model_name(model_id_or_path),
                         revision=fingerprint_dir(local_dir), device=dev, dtype=torch_dtype)
    if dtype.startswith("ov-"):  # the `openvino` extra, imported only when asked for
        from .openvino import on_openvino

        loaded = on_openvino(loaded, dtype)
    return loaded


def model_name(model_id_or_path: str) -> str:
    return Path(model_id_or_path.rstrip("/\\")).name or "model"


def _resolve_source(model_id_or_path: str) -> str:
    path = Path(model_id_or_path).expanduser()
    looks_local = path.exists() or model_id_or_path.startswith((".", "/", "~")) \
        or model_id_or_path.count("/") > 1
    if not looks_local:
        return model_id_or_path
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist (check --model or 'model' "
                             "in the label file)")
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if missing:
        raise ModelLoadError(f"model directory {path} lacks {' and '.join(missing)}; save it "
                             "with model.save_pretrained(dir) and processor.save_pretrained(dir)")
    return str(path)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable() -> bool:
    """Whether to ask the model hub at all. A cached model then loads without a request,
    and one that is not cached fails at once, in one line, instead of after half a minute
    of retries against a host that does not even resolve."""
    if _hub_offline():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy resolves names, not this machine: just try
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False


def _explain_load_failure(model_id: str, exc: OSError, local_only: bool) -> str:
    text = str(exc)
    if os.path.isdir(model_id):
        return f"cannot load model from {model_id}: {text.splitlines()[0]}"
    if _hub_offline():
        return (f"model {model_id} is not in the local cache, and HF_HUB_OFFLINE=1 forbids "
                "downloading it: pass --model DIR with a model saved by save_pretrained, or "
                "--model toyworld to try labelassist on the toy model it ships")
    if local_only:  # the hub was not asked: its name does not resolve here
        from huggingface_hub import constants

        return (f"model {model_id} is not in the local cache, and the model hub "
                f"({constants.ENDPOINT}) cannot be reached from this machine: pass --model "
                "DIR with a model saved by save_pretrained (copied from a machine that can "
                "download it), or --model toyworld to try labelassist on the toy model it "
                "ships")
    if "not a valid model identifier" in text or "404" in text or "Repository Not Found" in text:
        return f"model {model_id} does not exist on the hub (check --model)"
    return (f"cannot download model {model_id}: the hub is unreachable ({text.splitlines()[0]}). "
            "Pass --model DIR with a saved model, or check the network")


def _snapshot_dir(model_id: str) -> str:
    from transformers.utils import cached_file

    return str(Path(cached_file(model_id, "config.json")).parent)


def fingerprint_dir(path: str) -> str:
    """A cheap identity for a model directory: its config plus the size, head and tail of
    each weight file. Renaming or copying the directory keeps the identity (and so the
    stored embeddings); retrained weights change it."""
    digest = hashlib.sha256()
    config = Path(path) / "config.json"
    digest.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    for name in sorted(os.listdir(path)):
        file = Path(path) / name
        if not name.endswith((".safetensors", ".bin")) or not file.is_file():
            continue
        size = file.stat().st_size
        digest.update(f"{name}:{size}".encode())
        with open(file, "rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def quantise_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of every Linear (VNNI on x86): on a CPU without AMX the
    fastest path measured here (benchmarks/). Checked against fp32 in the benchmark."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch points at torchao; the eager API still works
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                      dtype=torch.qint8)
