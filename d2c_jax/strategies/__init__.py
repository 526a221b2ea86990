"""Clustering strategies: the paper's D²C, population search and the baselines."""
