"""Runs side by side: the runs table (`seedlings runs`)."""
