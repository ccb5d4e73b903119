"""Runs side by side and over time: the runs table (`seedlings runs`), MLflow tracking and its UI."""
