"""The closed loop: `kolm loop` (recompile, evaluate, promote), the report and its prices."""
