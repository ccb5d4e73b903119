"""From trained folds to probabilities: TTA, each member's predictions, blends and calibration, the submission CSV, the
report, new photos and the export. Nothing here trains (the chain that trains and predicts is seedlings.chain)."""
