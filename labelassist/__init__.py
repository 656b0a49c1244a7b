"""labelassist: CLIP pre-labels your images, Label Studio reviewers fix them."""

__version__ = "0.1.0"
