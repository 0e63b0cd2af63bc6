"""Hyper-parameter sweeps and spread comparisons on Optuna: a search space over training settings (`space`), the
study and its workers on a shared storage (`study`), and what a finished study shows (`show`)."""
