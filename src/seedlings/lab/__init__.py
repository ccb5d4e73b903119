"""Experiment tools built on the pipeline (never imported by it): the accuracy benchmark and its ablations, the probe,
held-out splits, throughput benchmarks, the GPU check and the recipe sweep."""
