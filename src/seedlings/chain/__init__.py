"""`make submit`'s chain, above training and prediction: folds, every fold trained, predicted, blended (a specialist's
division too), the report and submissions/<run>.csv with its provenance."""
