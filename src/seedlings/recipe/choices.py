"""The values each choice key of the recipe takes, and the crop's default: what the schema checks a recipe against,
without importing the modules that give each value its behaviour (torch, scikit-learn, OpenCV), so that reading a
recipe, and `seedlings runs` listing a few hundred runs, take a fraction of a second. Each of those modules keys its
table by these names (data.augment.TTA_VIEWS, metrics.MEANS, optim.OPTIMIZERS, data.cache.BACKGROUND; a test in
tests/test_config.py holds them equal) or tells the values apart by name (precision.py).
"""

CROP_SCALE = 0.8  # RandomResizedCrop's smallest area fraction: 0.35 cost 6 points at unfreezing (docs/history.md)
TTA = ("none", "flip", "d2", "d4", "d4+scales")  # the views predicted and averaged: data.augment.TTA_VIEWS
TTA_MEANS = ("arith", "geom")  # how the views' probabilities are averaged: metrics.MEANS
OPTIMIZERS = ("sgd", "adamw")  # optim.OPTIMIZERS
PLANT_MASKS = ("none", "green", "dim")  # what is kept of the gravel and soil: data.cache.BACKGROUND
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # precision.choose_precision
ENGINES = ("auto", "torch", "onnx")  # where forwards through fixed weights run: precision.choose_engine
