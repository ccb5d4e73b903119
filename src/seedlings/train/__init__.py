"""Training a fold: the model, its stages and steps, checkpoints, precomputed features, the LR finder."""
