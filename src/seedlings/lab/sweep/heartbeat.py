"""A database study's heartbeats, read straight from Optuna's tables: which running trials' workers are gone (so a
worker waits out the grace period and retries them instead of leaving the study stuck), and when a failed trial
really ended."""

from __future__ import annotations

import time
from datetime import timedelta

import optuna
import sqlalchemy
from optuna.trial import TrialState

from seedlings.lab.sweep.space import Sweep


def heartbeat_ages(sweep: Sweep) -> dict[int, tuple[int, float]]:
    """Running trials with a heartbeat (a database storage): trial id -> (number, seconds since its last heartbeat),
    both times read from the database's clock, as Optuna's heartbeat writes them."""
    if sweep.is_file_storage:
        return {}
    query = sqlalchemy.text(
        "SELECT t.trial_id, t.number, h.heartbeat FROM trials t JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
        "JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = :name AND t.state = 'RUNNING'"
    )
    with sweep.database().connect() as conn:
        now = conn.execute(sqlalchemy.text("SELECT CURRENT_TIMESTAMP")).scalar().replace(tzinfo=None)
        rows = conn.execute(query, {"name": sweep.name}).all()
    return {tid: (number, (now - beat).total_seconds()) for tid, number, beat in rows}


def silent_trials(sweep: Sweep) -> dict[int, float]:
    """Running trials whose worker is gone (killed, its machine lost): number -> seconds until the grace period is
    over and a worker may retry them. A heartbeat older than two intervals is silent at once; a younger one is
    watched for one interval (a live worker beats in it). A file storage has none: a dead local worker is found by
    its process at once."""
    ages = heartbeat_ages(sweep)
    if any(age <= 2 * sweep.heartbeat for _, age in ages.values()):
        time.sleep(sweep.heartbeat + 1)
        ages = heartbeat_ages(sweep)
    return {n: max(0.0, sweep.grace - age) for n, age in ages.values() if age > sweep.heartbeat + 0.5}


def end_at_last_heartbeat(study: optuna.Study, sweep: Sweep, ages: dict[int, tuple[int, float]]) -> None:
    """A trial just failed for a stale heartbeat ended at its last heartbeat, not when a later worker noticed (a
    worker killed at 100 s used to record 366 s): its recorded end moved back by the heartbeat's age."""
    update = sqlalchemy.text("UPDATE trials SET datetime_complete = :end WHERE trial_id = :id")
    late = []
    for tid, (_, age) in ages.items():
        trial = study._storage.get_trial(tid)
        if age > sweep.grace and trial.state == TrialState.FAIL and trial.datetime_complete is not None:
            late.append({"id": tid, "end": trial.datetime_complete - timedelta(seconds=age)})
    if late:
        with sweep.database().begin() as conn:
            conn.execute(update, late)
