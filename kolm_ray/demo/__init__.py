"""`make demo`: the whole loop on a simulated team (demo.py), its loop step, the stand-in frontier API."""
