"""The model: one factory that loads CLIP (or SigLIP) from a hub id or a folder (load.py),
the prompt set turned into a text classifier and class probabilities (zeroshot.py), and the
OpenVINO runtime for the image tower on CPUs (openvino.py, the `openvino` extra)."""
