"""The CLI's surface: every command is listed, every --help works, user mistakes are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kolm_ray.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_handler_imports(name):
    """Each table entry names a real function (a typo would only show when a user runs it)."""
    import importlib

    module, _, func = COMMANDS[name][0].partition(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_unknown_verifier_is_one_line_exit_2():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kolm_ray.cli",
            "compile",
            "x",
            "--base",
            "minilm-l6",
            "--pairs",
            "nope.jsonl",
            "--verifier",
            "closed-vocab,bogus",
            "--k-floor",
            "0.8",
            "--output",
            "x.kolm",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "error:" in lines[0]


def test_spec_schema_prints_json(capsys):
    import json

    assert main(["spec-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"].startswith("kolm verifier spec")


def test_compile_args_parse_as_the_cli_does():
    """The loop recompiles through compile_args (it may not import the CLI): the same flags, the same values."""
    from kolm_ray.cli import build_parser
    from kolm_ray.compile.args import compile_args

    argv = ["--recipe", "recipe-out", "--output", "x.kolm", "--epochs", "2", "--use-gpu"]
    parsed = vars(build_parser().parse_args(["compile", *argv]))
    assert parsed.pop("command") == "compile"
    assert vars(compile_args(argv)) == parsed
    assert vars(compile_args(argv[:4]))["epochs"] is None


# Every command line argparse rejects, at every level: `error: <prog>: <what>` on one line, exit 2, no usage.
BAD_ARGV = [
    ([], "kolm: the following arguments are required: COMMAND"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["compile", "x", "--epochs", "abc"], "kolm compile: argument --epochs: invalid int value: 'abc'"),
    (["observations"], "kolm observations: the following arguments are required"),
    (["observations", "list", "--limit", "x"], "kolm observations list: argument --limit: invalid int"),
    (["models", "nope"], "kolm models: argument ACTION: invalid choice: 'nope'"),
    (["capture", "--port", "99999"], "'99999' is not a port (0-65535)"),
    # each command: a missing required argument or the unknown flag, whichever argparse meets first
    *[([name, "--no-such-flag"], "error: kolm") for name in sorted(COMMANDS)],
]


@pytest.mark.parametrize(
    ("argv", "message"), BAD_ARGV, ids=lambda a: " ".join(a) if isinstance(a, list) else ""
)
def test_argparse_errors_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err  # no usage block before it
    assert err.startswith("error: ") and message in err, err


def test_argparse_error_in_a_subprocess_is_one_line_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "kolm_ray.cli", "compile", "--epochs", "abc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: kolm compile: argument --epochs: invalid int value: 'abc'\n"
