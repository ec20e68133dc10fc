"""What the cluster tests share: where cluster/ is, the Ray name of the RTX 5090, and cluster/kolm_node.py
loaded as a module (it is a script beside the launcher configs, not part of the kolm_ray package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLUSTER_DIR = REPO / "cluster"
RTX5090 = "GeForce-RTX-5090"  # what Ray 2.60 names an "NVIDIA GeForce RTX 5090"


def _load_kolm_node():
    spec = importlib.util.spec_from_file_location("kolm_node", CLUSTER_DIR / "kolm_node.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


kolm_node = _load_kolm_node()
