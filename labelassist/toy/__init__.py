"""The toy world: pictures whose labels are known, and a small CLIP trained on them on a
CPU and shipped with the code (world.py, `python -m labelassist.toy.world`: the cache, the
shipped weights, the command line; pictures.py: the pictures and captions; training.py:
the training recipe), plus tiny random CLIP and SigLIP models for tests (tiny.py)."""
