"""Trainers for dcp_forge: a tiny causal LM, synthetic data, training strategies and thin trainers."""
