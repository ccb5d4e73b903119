"""Data in: the competition (fetch, scan, folds), images decoded once (cache), and training batches (loaders,
augmentation)."""
