"""Artifact -> Predictor.predict: the one inference path (kolm run, the K-score, Serve, local answers)."""
