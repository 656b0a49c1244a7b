"""predict --ray: the encode phase of predict on a Ray cluster.

The ledger stays the single source of truth and this process (the driver) its only
writer. It claims pending images a batch at a time, exactly as a local predict does
(claims.py), and hands each batch to the cluster: a decoder actor reads and decodes it
with the project's own feed code (feed.decode_jobs, the same bad-file reasons), on the
node of the encoder actor, which holds the model once and embeds it. Embeddings come
back to the driver, which turns them into predictions and writes them through
predict.Writer, the local write path.
So the cluster never touches the database, a crash anywhere loses only the batches in
flight, and a rerun predicts what is still pending: the ledger's keys decide.

Ray is the optional extra `labelassist[ray]`; nothing here is imported without --ray.
"""

from __future__ import annotations

from ...errors import ConfigError


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'labelassist[ray]' (on every node of "
                          "the cluster)") from None
    return ray
