#!/usr/bin/env bash
# The jobs run the .venv built before sbatch (make setup): many tasks installing into one shared .venv at once would
# break it, so a missing or stale one (older than requirements.txt or pyproject.toml) stops the job instead.
cd "$(dirname "$0")/../.."
if ! make -s -q .venv/.installed 2>/dev/null; then
  echo "error: .venv is missing or older than requirements.txt: run make setup before sbatch" >&2
  exit 2
fi
