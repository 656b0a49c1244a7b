"""How far the model can be trusted, from the reviews: the reviews themselves (reviews.py),
the audit and its thresholds (audit.py), images out of set (outofset.py), auto-accepting
what the thresholds allow (accept.py), the probe learned from reviewed embeddings
(learn.py), better descriptions found in the reviews (suggest.py), and the review
session replayed (replay.py)."""
