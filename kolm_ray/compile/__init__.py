"""Compile: validate a recipe -> train on Ray Train (train/) -> evaluate (K-score, calibration) -> gate -> pack."""
