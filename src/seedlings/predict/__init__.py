"""From trained folds to a submission: TTA probabilities, blends and calibration, the submission CSV and the chain."""
