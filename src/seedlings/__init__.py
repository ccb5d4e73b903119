"""seedlings: the fast.ai recipe for Kaggle's Plant Seedlings Classification, on PyTorch + timm + albumentations."""

import os

# albumentations asks PyPI for a newer release on import unless told not to (offline machines, reproducible runs).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
