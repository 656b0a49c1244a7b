"""The feed: claimed images -> decoded uint8 crops, batched for the image tower.

Two ways behind one generator, `decoded_batches(jobs, ...)`:
- threads: a thread pool decodes a batch or two ahead. Pillow releases the GIL while it
  decodes and resizes, which is plenty on a CPU, where the tower is the limit and the
  cores belong to torch. The default there.
- processes: torch DataLoader workers, sized to the cores. Batches come back through shared
  memory, pinned for the copy to a GPU. The default on CUDA, where threads stall on the GIL
  at about a thousand images a second and the GPU waits.
Jobs are claimed lazily in this process as the feed asks for them, so no more than
`prefetch` batches per worker (and, with threads, the one being claimed beside the tower)
are ever claimed ahead. Pixels travel as uint8 (4x fewer bytes
than float32); LoadedModel.encode_images normalises them on the device.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from ..images import BadImage, Preprocess, decode, open_image
from ..objectstore import READERS, is_object_url, read_object

# One image to decode: its id and the (path, size, stamp) of each file that holds it. The
# stamp is a file's mtime_ns, or an object's ETag (s3://...: read by whichever process
# decodes, a Ray node included, with its own credentials).
Job = tuple[int, list[tuple]]
FEEDS = ("auto", "threads", "processes")
# Threads that decode batches of objects: each read waits on the network (two requests),
# so a few decoding threads would leave the tower waiting. Pillow's work is the same.
OBJECT_READERS = READERS


@dataclass
class Batch:
    ids: list[int] = field(default_factory=list)  # decoded images, in the order of pixels
    pixels: torch.Tensor | None = None             # (len(ids), 3, H, W) uint8
    bad: list[tuple[int, BadImage]] = field(default_factory=list)


@dataclass(frozen=True)
class FeedPlan:
    kind: str      # "threads" or "processes"
    workers: int


def check_feed(feed: str) -> None:
    if feed not in FEEDS:
        from ..errors import ConfigError

        raise ConfigError(f"--feed {feed!r}: use {', '.join(FEEDS)}")


def plan_feed(feed: str, device: torch.device, workers: int | None = None,
              objects: bool = False) -> FeedPlan:
    """auto: processes for a CUDA GPU (every core but one decodes), threads elsewhere.
    objects: the images are in a bucket, so threads wait on the network: more of them."""
    check_feed(feed)
    cores = os.cpu_count() or 1
    kind = feed if feed != "auto" else ("processes" if device.type == "cuda" and cores > 2
                                        else "threads")
    if workers is None:
        workers = max(1, cores - 1) if kind == "processes" else max(1, min(4, cores))
        if objects and kind == "threads":
            workers = max(workers, OBJECT_READERS)
    return FeedPlan(kind, workers)


def decoded_batches(jobs: Iterable[list[Job]], preprocess: Preprocess, *, draft: bool,
                    max_pixels: int, plan: FeedPlan, pin_memory: bool = False,
                    prefetch: int = 2) -> Iterator[Batch]:
    """Decode each list of jobs into one Batch, in order, `prefetch` batches ahead."""
    decode_one = partial(load_pixels, preprocess=preprocess, draft=draft, max_pixels=max_pixels)
    if plan.kind == "processes":
        return _process_batches(jobs, decode_one, plan.workers, pin_memory, prefetch)
    return _thread_batches(jobs, decode_one, plan.workers, prefetch)


def _thread_batches(jobs: Iterable[list[Job]], decode_one: Callable, workers: int,
                    prefetch: int) -> Iterator[Batch]:
    """The next batch is claimed on a thread of its own (a claim is a write transaction
    and a query: milliseconds) while the tower encodes, not between two tower calls."""
    source = iter(jobs)
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="claim") as claimer:
        inflight: deque = deque()
        claimed = claimer.submit(next, source, None)

        def submit() -> None:
            nonlocal claimed
            if chunk := claimed.result():
                claimed = claimer.submit(next, source, None)
                inflight.append((chunk, [pool.submit(decode_one, paths) for _, paths in chunk]))

        for _ in range(max(1, prefetch)):
            submit()
        while inflight:
            chunk, futures = inflight.popleft()
            submit()
            yield _from_results([(i, f.result()) for (i, _), f in zip(chunk, futures)])


class _DecodeJobs(torch.utils.data.Dataset):
    """A dataset whose 'indices' are jobs: the batch sampler hands out claimed images."""

    def __init__(self, decode_one: Callable):
        self.decode_one = decode_one

    def __getitem__(self, job: Job):
        return job[0], self.decode_one(job[1])


class _ClaimedBatches:
    """The DataLoader's batch sampler: each iteration step claims the next batch."""

    def __init__(self, jobs: Iterable[list[Job]]):
        self.jobs = jobs

    def __iter__(self):
        return iter(self.jobs)


def _stack_good(results: list[tuple[int, np.ndarray | BadImage]]):
    """The ids and stacked uint8 crops of the images that decoded."""
    good = [(i, r) for i, r in results if not isinstance(r, BadImage)]
    return [i for i, _ in good], (torch.from_numpy(np.stack([r for _, r in good]))
                                  if good else None)


def _collate(items: list[tuple[int, np.ndarray | BadImage]]) -> tuple:
    """In the worker. Bad images travel as plain tuples: a BadImage does not survive
    pickling."""
    return (*_stack_good(items),
            [(i, r.reason, r.detail) for i, r in items if isinstance(r, BadImage)])


def decode_jobs(jobs: list[Job], preprocess: Preprocess, *, draft: bool, max_pixels: int,
                pool: ThreadPoolExecutor | None = None
                ) -> tuple[list[int], np.ndarray | None, list[tuple]]:
    """One batch decoded wherever it runs (a Ray actor on another node), in `pool`'s
    threads if given: the ids that decoded, their stacked uint8 crops, and
    (id, reason, detail) for the rest."""
    decode_one = partial(load_pixels, preprocess=preprocess, draft=draft,
                         max_pixels=max_pixels)
    results = (pool.map if pool else map)(decode_one, [paths for _, paths in jobs])
    ids, pixels, bad = _collate([(i, r) for (i, _), r in zip(jobs, results)])
    return ids, None if pixels is None else pixels.numpy(), bad


def batch_from_decoded(ids: list[int], pixels, bad: list[tuple]) -> Batch:
    """The inverse of _collate and decode_jobs, back in the process that writes."""
    return Batch(ids, pixels, [(i, BadImage(reason, detail)) for i, reason, detail in bad])


def _process_batches(jobs: Iterable[list[Job]], decode_one: Callable, workers: int,
                     pin_memory: bool, prefetch: int) -> Iterator[Batch]:
    loader = torch.utils.data.DataLoader(
        _DecodeJobs(decode_one), batch_sampler=_ClaimedBatches(jobs), collate_fn=_collate,
        num_workers=workers, pin_memory=pin_memory, prefetch_factor=max(1, prefetch),
        worker_init_fn=_quiet_worker)
    for ids, pixels, bad in loader:
        yield batch_from_decoded(ids, pixels, bad)


def _quiet_worker(_: int) -> None:
    # Ctrl-C goes to the parent, which stops claiming and lets the workers finish.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _from_results(results: list[tuple[int, np.ndarray | BadImage]]) -> Batch:
    return Batch(*_stack_good(results), [(i, r) for i, r in results if isinstance(r, BadImage)])


def load_pixels(paths: list[tuple], preprocess: Preprocess, draft: bool,
                max_pixels: int) -> np.ndarray | BadImage:
    """Decode the first path of an image that still holds the ingested bytes -> uint8 crop."""
    first_error = BadImage("missing", "no readable path is left for this image")
    for fs_path, size, stamp in paths:
        try:
            img = open_image(read_ingested(fs_path, size, stamp), max_pixels)
            rgb = decode(img, draft_size=preprocess.draft_size if draft else None)
            return preprocess.crop_uint8(rgb)
        except BadImage as error:
            first_error = error if first_error.reason == "missing" else first_error
        except FileNotFoundError:
            continue
        except OSError as exc:
            first_error = BadImage("unreadable", f"{os.fsdecode(fs_path)}: {exc.strerror}")
    return first_error


def reads_objects(jobs: list[Job]) -> bool:
    """Whether a batch's images live in object storage (as a whole ingest run's do)."""
    return any(is_object_url(paths[0][0]) for _, paths in jobs if paths)


def read_ingested(fs_path: str | bytes, size: int, stamp: int | str) -> bytes:
    """The bytes ingest hashed, or BadImage("changed"): a file while its size and mtime
    are the same, an object while its size and ETag are (one conditional read)."""
    if is_object_url(fs_path):
        return read_object(fs_path, size, stamp)
    st = os.stat(fs_path)
    if (st.st_size, st.st_mtime_ns) != (size, stamp):
        raise BadImage("changed", f"{os.fsdecode(fs_path)} changed since ingest; "
                                  "run labelassist ingest again")
    with open(fs_path, "rb") as fh:
        return fh.read()
