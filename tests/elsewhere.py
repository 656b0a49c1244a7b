"""A second device on a CPU-only machine, for tests of the device boundary.

`model_elsewhere(loaded)` makes a loaded model behave as if its weights lived on an
accelerator, the way CUDA does: a tensor that came from the model (or was sent to its
device) cannot meet a host tensor in one op, cannot become a numpy array, and comes home
only through `.cpu()` / `.to("cpu")`. The data stays in host memory, so every number is the
real one; only the placement is simulated, and every mix-up CUDA would refuse is refused.

It is a TorchFunctionMode: it sees each torch call on this thread. "Elsewhere" tensors are
tracked by identity; the model's parameters and buffers count as elsewhere. The device's
name is "meta", which no real tensor in these tests uses.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
_DEVICE_GETTER = torch.Tensor.device.__get__
# CUDA takes host index tensors for indexing a device tensor.
_INDEXING = (torch.Tensor.__getitem__, torch.Tensor.__setitem__)


class DeviceMixup(RuntimeError):
    pass


class _Elsewhere(TorchFunctionMode):
    def __init__(self, resident: list[torch.Tensor]):
        super().__init__()
        self.tagged: dict[int, weakref.ref] = {}  # by identity: tensors compare elementwise
        self.ops = 0
        for t in resident:
            self.tag(t)

    def is_elsewhere(self, t) -> bool:
        ref = self.tagged.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func == _DEVICE_GETTER:  # a method-wrapper: equal, never identical
            return DEVICE if self.is_elsewhere(args[0]) else func(*args, **kwargs)
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and self.is_elsewhere(args[0]):
            raise DeviceMixup("can't convert an accelerator tensor to numpy: call .cpu() first")
        target = self.target_device(func, args, kwargs)
        if target is not None:
            return self.move(func, args, kwargs, target)
        leaves, _ = tree_flatten((args[:1], kwargs) if func in _INDEXING else (args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        away = [t for t in tensors if self.is_elsewhere(t)]
        # Like CUDA, a 0-dim host tensor may meet a device tensor; nothing bigger may.
        home = [t for t in tensors if not self.is_elsewhere(t) and t.dim() > 0]
        if away and home:
            name = getattr(func, "__name__", str(func))
            raise DeviceMixup(f"Expected all tensors to be on the same device ({name}: "
                              f"{len(away)} on the accelerator, {len(home)} on the host)")
        out = func(*args, **kwargs)
        if away:
            tree_map(self.tag, out)
        return out

    def tag(self, t):
        if isinstance(t, torch.Tensor):
            self.tagged[id(t)] = weakref.ref(t)
        return t

    def target_device(self, func, args, kwargs) -> torch.device | None:
        """Where a call puts its result, when it names a device (or is .cpu())."""
        if func is torch.Tensor.cpu:
            return torch.device("cpu")
        device = kwargs.get("device")
        if device is None and func is torch.Tensor.to:
            for a in args[1:]:
                if isinstance(a, torch.Tensor):
                    return DEVICE if self.is_elsewhere(a) else torch.device("cpu")
                if _is_device(a):
                    device = a
        return None if device is None else torch.device(device)

    def move(self, func, args, kwargs, target: torch.device):
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        kwargs = {k: (torch.device("cpu") if k == "device" else v) for k, v in kwargs.items()}
        args = tuple(a.dtype if i and isinstance(a, torch.Tensor)
                     else torch.device("cpu") if _is_device(a) else a
                     for i, a in enumerate(args))
        out = func(*args, **kwargs)
        if target == DEVICE:
            return self.tag(out)
        if source is not None and out is source and self.is_elsewhere(source):
            out = out.clone()  # a real copy comes home; the device tensor stays where it is
        self.tagged.pop(id(out), None)
        return out


def _is_device(value) -> bool:
    return isinstance(value, torch.device) or (
        isinstance(value, str) and value.split(":")[0] in ("cpu", "meta", "cuda", "mps"))


@contextlib.contextmanager
def model_elsewhere(loaded):
    """Run `loaded` (a LoadedModel on cpu, fp32) as if it lived on an accelerator."""
    resident = list(loaded.model.parameters()) + list(loaded.model.buffers())
    saved = loaded.device
    loaded.device = DEVICE
    mode = _Elsewhere(resident)
    try:
        with mode:
            yield mode
    finally:
        loaded.device = saved
