"""What runs on the cluster's nodes: the decoder and encoder actors.

Both call the code a local predict calls (feed.decode_jobs, LoadedModel.encode_images),
so one image becomes the same crop and the same embedding on either path.
"""

from __future__ import annotations

import socket

import numpy as np


class Decoder:
    """A Ray actor on each encoder's node: it reads and decodes the batches that encoder
    will embed, from the same paths (a shared mount) or the bucket, in threads (Pillow releases the
    GIL). An actor rather than a task per batch: a task may start a fresh worker process,
    which imports torch, for every batch (measured: a third of a 2-core machine)."""

    def __init__(self, preprocess, draft: bool, max_pixels: int, threads: int):
        from concurrent.futures import ThreadPoolExecutor

        self.args = {"preprocess": preprocess, "draft": draft, "max_pixels": max_pixels}
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.readers = None  # for batches of objects, which wait on the network

    def decode(self, jobs: list) -> tuple:
        """One claimed batch -> (ids, uint8 crops, [(id, reason, detail)]). Objects in a
        bucket are read here, on this node, with its own credentials."""
        from concurrent.futures import ThreadPoolExecutor

        from ..feed import OBJECT_READERS, decode_jobs, reads_objects

        pool = self.pool
        if reads_objects(jobs):
            self.readers = self.readers or ThreadPoolExecutor(OBJECT_READERS,
                                                              thread_name_prefix="read")
            pool = self.readers
        return decode_jobs(jobs, **self.args, pool=pool)


class Encoder:
    """A Ray actor: the model, loaded once, embedding decoded batches. It starts its
    decoder on its own node first, so the two load together, and the decoder shares its
    fate: when the encoder dies, so does its decoder."""

    def __init__(self, model_id: str, device: str, dtype: str, threads: int | None,
                 decoder_args: tuple, decoder_options: dict):
        import ray
        import torch
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from ...model.load import load_model

        here = ray.get_runtime_context().get_node_id()
        self.decoder = ray.remote(Decoder).options(
            **decoder_options,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        ).remote(*decoder_args)
        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(model_id, device=device, dtype=dtype)
        self.node = here

    def describe(self) -> dict:
        """Called once the actor is up: what it loaded, where, and its decoder."""
        return {"model_key": self.model.model_key, "host": socket.gethostname(),
                "device": str(self.model.device), "node": self.node,
                "decoder": self.decoder}

    def encode(self, decoded: tuple) -> tuple:
        import torch

        ids, pixels, bad = decoded
        vectors = self.model.encode_images(torch.from_numpy(pixels)).numpy() if ids else \
            np.zeros((0, 0), np.float32)
        return ids, vectors, bad
