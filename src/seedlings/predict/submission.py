"""Submission CSVs: write one in Kaggle's layout, validate one against a competition folder, grade one."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from seedlings.data.competition import read_sample, scan_competition
from seedlings.errors import UserError
from seedlings.storage import write_csv


def write_submission(path: Path, files: list[str], species: list[str], sample: Path) -> None:
    """file,species in sample_submission.csv's order, written atomically."""
    order = read_sample(sample.parent)
    by_file = dict(zip(files, species))
    missing = [f for f in order if f not in by_file]
    if missing:
        raise UserError(f"{sample}: {len(missing)} test files have no prediction, e.g. {missing[0]}")
    write_csv(path, pd.DataFrame({"file": order, "species": [by_file[f] for f in order]}))


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """A CSV's header and rows (UTF-8, a byte-order mark allowed); missing, a folder, empty or binary exits 2."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a CSV file")
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the header
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    if not any(rows):
        raise UserError(f"{path}: empty file")
    return rows[0], rows[1:]


def validate_submission(data: str | Path, submission: str | Path) -> int:
    """Check a submission against a competition folder; every problem is listed, then exit 2. Returns the row count."""
    comp = scan_competition(data)
    submission = Path(submission)
    header, rows = read_rows(submission)
    problems = []
    if [h.strip() for h in header] != ["file", "species"]:
        problems.append(f"header is {','.join(header)!r}, expected 'file,species'")
    expected = read_sample(data)
    species = set(comp.classes)
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=2):
        if len(row) != 2:
            problems.append(f"line {i}: {len(row)} fields, expected 2")
            continue
        file, sp = row
        if not file or not sp:
            problems.append(f"line {i}: empty field")
            continue
        if file in seen:
            problems.append(f"line {i}: duplicate file {file} (first on line {seen[file]})")
        seen.setdefault(file, i)
        if sp not in species:
            problems.append(f"line {i}: unknown species {sp!r}")
    missing = [f for f in expected if f not in seen]
    extra = [f for f in seen if f not in set(expected)]
    if missing:
        problems.append(f"{len(missing)} test files missing, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} files not in the test set, e.g. {extra[0]}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(f"{submission}: {shown}")
    return len(rows)


def species_of(probs: np.ndarray, classes: list[str]) -> list[str]:
    return [classes[i] for i in probs.argmax(1)]
