"""What runs on the cluster's nodes: a decode task and the encoder actor.

Both call the code a local predict calls (feed.decode_jobs, LoadedModel.encode_images),
so one image becomes the same crop and the same embedding on either path.
"""

from __future__ import annotations

import socket

import numpy as np


def decode_batch(jobs: list, preprocess, draft: bool, max_pixels: int) -> tuple:
    """A Ray task: read and decode one claimed batch where the node sees the files
    (the same paths, on a shared mount) -> (ids, uint8 crops, [(id, reason, detail)])."""
    from ..feed import decode_jobs

    return decode_jobs(jobs, preprocess, draft=draft, max_pixels=max_pixels)


class Encoder:
    """A Ray actor: the model, loaded once, embedding decoded batches."""

    def __init__(self, model_id: str, device: str, dtype: str, threads: int | None):
        import torch

        from ..model import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(model_id, device=device, dtype=dtype)

    def describe(self) -> dict:
        """Called once the actor is up: what it loaded, and where."""
        import ray

        return {"model_key": self.model.model_key, "host": socket.gethostname(),
                "device": str(self.model.device),
                "node": ray.get_runtime_context().get_node_id()}

    def encode(self, decoded: tuple) -> tuple:
        import torch

        ids, pixels, bad = decoded
        vectors = self.model.encode_images(torch.from_numpy(pixels)).numpy() if ids else \
            np.zeros((0, 0), np.float32)
        return ids, vectors, bad
