"""A trained run's out-of-fold predictions made twice, in float32 and in bf16 (on this CPU: native bf16), with the same
TTA: speed, scores, and how many images get the same answer.

    .venv/bin/python scripts/bf16_agreement.py RUN [TTA]     (RUN: a trained run under runs/, e.g. cpu-holdout)
"""

import sys
import time

from seedlings.metrics import val_scores
from seedlings.precision import choose_precision, cpu_has_bf16
from seedlings.predict.infer import tta_probs
from seedlings.predict.members import run_members
from seedlings.run import saved_run
from seedlings.train.fold import prepare_fold
from seedlings.train.predictor import Predictor

run = saved_run(sys.argv[1])
tta = sys.argv[2] if len(sys.argv) > 2 else run.recipe.tta
print(f"run {run.name}, TTA {tta}, native bf16 on this CPU: {cpu_has_bf16()}")
header = ("fold", "float32 img/s", "bf16 img/s", "micro-F1 f32", "micro-F1 bf16", "same answer")
print(" ".join(f"{h:>{w}}" for h, w in zip(header, (4, 14, 11, 13, 14, 12))))
for fold in run.models():
    ctx = prepare_fold(run, fold)
    ctx.model.load_state_dict(run_members(run, fold)[-1].state_dict(ctx.device))
    labels, probs, speed = ctx.labels[ctx.val_idx], {}, {}
    for bf16 in (False, True):
        ctx.precision = choose_precision("auto" if bf16 else "fp32", ctx.device)  # auto: bf16 forwards where native
        start = time.perf_counter()
        probs[bf16] = tta_probs(Predictor(ctx, through_network=True), "train", ctx.val_idx, tta)
        speed[bf16] = len(labels) / (time.perf_counter() - start)
    f1 = {b: val_scores(p, labels)["val_f1"] for b, p in probs.items()}
    same = int((probs[True].argmax(1) == probs[False].argmax(1)).sum())
    print(
        f"{fold:>4} {speed[False]:>14.1f} {speed[True]:>11.1f} {f1[False]:>13.4f} {f1[True]:>14.4f} "
        f"{same:>7} of {len(labels)}"
    )
