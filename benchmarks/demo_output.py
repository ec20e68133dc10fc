"""What a newcomer sees from `make demo > demo.log 2>&1`: lines, progress-bar redraws, Ray's own chatter.

    python benchmarks/demo_output.py --log before=demo-before.log --log after=demo-after.log \
        [--commit before=3334646 --commit after=HEAD] [--out benchmarks/results/demo_output.json]

Each log is the demo's combined stdout + stderr sent to a file (run it yourself: the demo takes minutes,
so this script only reads the logs). Counted per log: `lines` (newlines, what `wc -l` says), the
carriage-return redraws a progress bar writes inside those lines, lines that are progress bars
(tqdm's `NN%|...|`), error and traceback lines, Ray's own lines (its Python loggers' `INFO`/`WARNING` records, Ray Train's
`Reporting training result`, worker-group and process-group notices, the C++ core's `[... E pid tid]
file.cc:N:` lines), the phase headers (`== N. ...`) and whether the summary was printed. A trailing
`/usr/bin/time -v` block, when the run was timed, is left out of every count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

BAR = re.compile(r"\d+%\|")
RAY_PY = re.compile(r"^(\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING)|(INFO|WARNING) \d{4}-\d\d-\d\d )")
RAY_CORE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWEF] \d+ \d+\] \S+\.(cc|h):\d+: ")
RAY_TRAIN = ("Reporting training result", "Requesting resources:", "Attempting to start training worker",
             "Started training worker group", "Setting up process group", "world_rank=")  # fmt: skip


def count(text: str, through_phase: int | None = None) -> dict:
    """The counts above for one log's text (only up to the end of phase `through_phase` when given: a run
    cut short is compared with another over the phases both finished)."""
    cut = text.find("\tCommand being timed:")
    if cut >= 0:
        text = text[:cut]
    if through_phase is not None and (m := re.search(rf"^== {through_phase + 1}\. ", text, re.M)):
        text = text[: m.start()]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    segments = [seg for ln in lines for seg in ln.split("\r")]
    return {
        "lines": len(lines),
        "carriage_return_redraws": text.count("\r"),
        "progress_bar_lines": sum(1 for ln in lines if BAR.search(ln)),
        "progress_bar_redraws": sum(1 for seg in segments if BAR.search(seg)),
        "ray_python_log_lines": sum(1 for ln in lines if RAY_PY.match(ln)),
        "ray_train_lines": sum(1 for ln in lines if any(k in ln for k in RAY_TRAIN)),
        "ray_core_cpp_lines": sum(1 for ln in lines if RAY_CORE.match(ln)),
        "error_and_traceback_lines": _error_lines(lines),
        "phase_headers": sum(1 for ln in lines if re.match(r"^== \d\. ", ln)),
        "summary_printed": any(ln.startswith("== 8. summary") for ln in lines),
        "longest_line_chars": max((len(ln) for ln in lines), default=0),
    }


def _error_lines(lines: list[str]) -> int:
    """Lines of Python tracebacks (from `Traceback ...` to the exception's own line) and the one-line
    errors that introduce them (`Exception in thread ...`, Ray's `Failed to send resource request ...`)."""
    n, inside = 0, False
    for ln in lines:
        if ln.startswith(("Exception in thread", "Failed to send resource request")):
            n += 1
        elif ln.startswith("Traceback (most recent call last):"):
            inside, n = True, n + 1
        elif inside:
            n += 1
            inside = ln.startswith(" ")  # the exception's unindented line ends the traceback
    return n


def _read(path: str) -> str:
    """The log as written: newline="" keeps a bar's carriage returns (universal newlines would make each
    redraw a line of its own)."""
    with open(path, newline="") as f:
        return f.read()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", action="append", required=True, help="NAME=PATH of a `make demo > f 2>&1` log")
    p.add_argument("--commit", action="append", default=[], help="NAME=COMMIT the log was produced at")
    p.add_argument("--note", default="", help="how the logs were produced (machine, load)")
    p.add_argument("--through-phase", type=int, default=None, help="count only phases 1..N of each log")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_output.json"))
    a = p.parse_args()
    commits = dict(c.split("=", 1) for c in a.commit)
    report: dict = {
        "through_phase": a.through_phase,
        "command": "make demo > LOG 2>&1 (python -m kolm_ray.demo.demo)",
        "note": a.note,
        "runs": {},
    }
    for item in a.log:
        name, path = item.split("=", 1)
        report["runs"][name] = {
            "log": Path(path).name,
            "commit": commits.get(name),
            **count(_read(path), a.through_phase),
        }
    report["loadavg_when_counted"] = list(os.getloadavg())
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
