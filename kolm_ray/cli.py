"""The `kolm` command: one table of subcommands, each a typed handler imported on use.

    kolm capture --port 8700                      # proxy OpenAI/Anthropic calls, record observations
    kolm observations list|import|export ...      # the bridge API's CLI twins
    kolm cluster --namespace NS                   # Ray Data clustering of a namespace
    kolm recipe --namespace NS --out DIR          # pairs, spec, verifiers, K-floor
    kolm compile --recipe DIR --output X.kolm     # Ray Train fine-tune, K-score gate, signed artifact
    kolm run X.kolm "text"                        # offline inference
    kolm serve deployments/recall.yaml            # Ray Serve recall router
    kolm bench recall --url URL                   # open-loop load on the router

Handlers live next to what they drive (`module:function`, imported only when that command runs, so
`kolm --help` stays fast). Each takes the parsed arguments and returns an exit code; a KolmError
becomes one line on stderr and its exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from kolm_ray.compile.args import add_compile_arguments
from kolm_ray.errors import ArgumentParser, KolmError

Builder = Callable[[argparse.ArgumentParser], None]


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return port


def _capture(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: local only)")
    p.add_argument("--port", type=_port, default=8700, help="port to bind (default 8700)")
    p.add_argument(
        "--store", default=None, help="observation store URL (default $KOLM_STORE or SQLite in $KOLM_HOME)"
    )
    p.add_argument(
        "--openai-upstream", default=None, help="OpenAI-compatible upstream (default https://api.openai.com)"
    )
    p.add_argument(
        "--anthropic-upstream", default=None, help="Anthropic upstream (default https://api.anthropic.com)"
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="capture processes on the one port (SO_REUSEPORT), one writer each (default 1)",
    )
    p.add_argument(
        "--redact",
        choices=["pii"],
        default=None,
        help="pii: store e-mails, phones, cards, IBANs, SSNs as [EMAIL] ... (docs/privacy.md)",
    )

    p.set_defaults(precheck=_check_capture_bind)


def _check_capture_bind(args: argparse.Namespace) -> None:
    from kolm_ray.settings import check_bind

    check_bind(args.host)  # before anything starts: exit 2 with the reason


def _workers(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, 64], got {value!r}")
    return n


def _observations(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="{list,import,export,delete}")
    ls = sub.add_parser("list", help="print observations as JSON lines")
    ls.add_argument("--namespace")
    ls.add_argument("--tenant")
    ls.add_argument("--verified", choices=["true", "false", "null"])
    ls.add_argument("--limit", type=int, default=100)
    imp = sub.add_parser(
        "import", help="import a JSON list or JSON lines of {namespace, input, output, verified?, tenant?}"
    )
    imp.add_argument("file")
    imp.add_argument("--namespace", help="namespace for rows that name none")
    exp = sub.add_parser("export", help="write a namespace's observations as JSON lines")
    exp.add_argument("--namespace", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--verified-only", action="store_true")
    rm = sub.add_parser(
        "delete", help="delete matching rows, their shadow pairs, spool and dead-letter copies"
    )
    rm.add_argument("--namespace", required=True)
    rm.add_argument("--tenant")
    rm.add_argument("--before", help="only rows created before this ISO date or date-time (UTC if no zone)")
    rm.add_argument("--matching", help="only rows holding this text in input, output or request")
    for q in (ls, imp, exp, rm):
        q.add_argument("--store", default=None, help="observation store URL")


def _keys(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="{create,list,revoke}")
    cr = sub.add_parser("create", help="issue a capture key (printed once, as JSON)")
    cr.add_argument("--tenant", required=True, help="the tenant every observation of this key records")
    cr.add_argument("--namespace", required=True, action="append", help="a namespace it may use (repeatable)")
    cr.add_argument("--name", default=None, help="a label shown by `kolm keys list`")
    cr.add_argument("--no-train", action="store_true", help="its rows count for spend/report, never train")
    cr.add_argument("--redact", choices=["pii"], default=None, help="redact PII from its rows before storing")
    ls = sub.add_parser("list", help="every key (never the key itself)")
    ls.add_argument("--json", action="store_true", help='print {"keys": [...]}')
    rv = sub.add_parser("revoke", help="refuse a key from now on (a running proxy within ~1 s)")
    rv.add_argument("id", help="the key's id (key_...), as `kolm keys list` shows it")
    for q in (cr, ls, rv):
        q.add_argument("--store", default=None, help="store URL (default $KOLM_STORE or $KOLM_HOME)")


def _cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--namespace",
        required=True,
        action="append",
        help="namespace to cluster; repeat it to cluster several in one pass (one featurize pool)",
    )
    p.add_argument("--store", default=None)
    p.add_argument("--num-workers", type=int, default=None, help="featurize actors (default: 1)")
    p.add_argument("--json", action="store_true", help="print the clusters as JSON")
    p.add_argument(
        "--include-untrusted",
        action="store_true",
        help="also learn from rows of --no-train keys and of an open (keyless) proxy",
    )


def _recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", required=True)
    p.add_argument(
        "--cluster", type=int, default=None, help="cluster id from `kolm cluster` (default: the largest)"
    )
    p.add_argument("--out", default="./recipe-out")
    p.add_argument("--verified-only", action="store_true", help="use only observations verified true")
    p.add_argument(
        "--base",
        default=None,
        help="base written into recipe.yaml (default: minilm-l6 when every output field is categorical (a tagger) or categorical/grounded in the input (an extractor), else qwen2.5-coder-0.5b)",
    )
    p.add_argument("--store", default=None)
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="featurize actors for the clustering (default: 1)",
    )
    p.add_argument(
        "--include-untrusted",
        action="store_true",
        help="also learn from rows of --no-train keys and of an open (keyless) proxy",
    )


def _run(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact")
    p.add_argument("text", nargs="?")
    p.add_argument("--input-file", help="JSON lines {input: ...}; one JSON line out per input, in order")


def _artifact_only(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact")


def _serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="deployments/recall.yaml")


def _bench(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="target", required=True, metavar="{recall}")
    r = sub.add_parser("recall", help="open-loop load on POST /v1/recall/route")
    r.add_argument("--url", default="http://127.0.0.1:8000")
    r.add_argument("--rps", default="50,100,200", help="comma-separated request rates")
    r.add_argument("--duration", type=float, default=20.0, help="seconds per rate")
    r.add_argument("--out", default="bench-out")
    r.add_argument("--key", default=None, help="tenant bearer key (default $KOLM_TENANT_KEY)")
    r.add_argument("--queries", default=None, help="JSON lines {input: ...} to send (default: built-in)")


def _models(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    pr = sub.add_parser("promote", help="verify a .kolm and make it a namespace's live model")
    pr.add_argument("artifact", help="path of the .kolm to promote")
    pr.add_argument("--namespace", required=True, help="the namespace it answers")
    pr.add_argument(
        "--force", action="store_true", help="promote even with no traffic of its request shape in NS"
    )
    ls = sub.add_parser("list", help="registered versions (live marked)")
    ls.add_argument("--namespace", default=None)
    ls.add_argument("--json", action="store_true", help='print {"models": [...]}')
    rb = sub.add_parser("rollback", help="make the previously live version live again")
    rb.add_argument("--namespace", required=True)
    hi = sub.add_parser("history", help="every promote and rollback, oldest first: who, when, why")
    hi.add_argument("--namespace", default=None)
    hi.add_argument("--json", action="store_true", help='print {"events": [...]}')
    for q in (pr, rb):
        q.add_argument(
            "--reason", default=None, help="why, kept in `kolm models history` (actor: $KOLM_ACTOR)"
        )
    for q in (pr, ls, rb, hi):
        q.add_argument("--store", default=None, help="store URL (default $KOLM_STORE or $KOLM_HOME)")


def _report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", default=None, help="one namespace (default: all)")
    p.add_argument("--json", action="store_true", help='print {"namespaces": [...], "prices", "since"}')
    p.add_argument("--html", default=None, metavar="FILE", help="also write a self-contained HTML page")
    p.add_argument(
        "--prices", default=None, help="price table (default $KOLM_PRICES, $KOLM_HOME/prices.yaml, configs/)"
    )
    p.add_argument("--compute-prices", default=None, help="$/CPU-hour, $/GPU-hour table (default"
                   " $KOLM_COMPUTE_PRICES, $KOLM_HOME/compute_prices.yaml, configs/)")  # fmt: skip
    p.add_argument("--store", default=None, help="store URL (default $KOLM_STORE or $KOLM_HOME)")


def _loop(p: argparse.ArgumentParser) -> None:
    p.add_argument("--once", action="store_true", help="one pass over the namespaces, then exit")
    p.add_argument(
        "--min-new",
        type=int,
        default=None,
        help="new usable observations that start a recompile (default 500)",
    )
    p.add_argument("--interval", type=float, default=3600.0, help="seconds between passes without --once")
    p.add_argument("--namespace", action="append", default=None, help="only these namespaces (repeatable)")
    p.add_argument("--store", default=None, help="store URL (default $KOLM_STORE or $KOLM_HOME)")
    p.add_argument(
        "--include-untrusted",
        action="store_true",
        help="also learn from rows of --no-train keys and of an open (keyless) proxy",
    )


def _signing(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="{generate,status}")
    gen = sub.add_parser("generate", help="write a new Ed25519 key pair (never overwrites one)")
    gen.add_argument(
        "--out", required=True, help="directory for kolm-signing.key (0600) and kolm-signing.pub"
    )
    sub.add_parser("status", help="what this node signs with and which keys it trusts (JSON)")


# name -> (handler "module:function", help, argument builder)
COMMANDS: dict[str, tuple[str, str, Builder]] = {
    "capture": ("kolm_ray.capture.app:capture_command", "run the capture proxy", _capture),
    "observations": (
        "kolm_ray.observations.cli:observations_command",
        "list, import or export observations",
        _observations,
    ),
    "keys": ("kolm_ray.observations.keys:keys_command", "create, list or revoke capture keys", _keys),
    "cluster": (
        "kolm_ray.clustering:cluster_command",
        "cluster a namespace's observations by intent (Ray Data)",
        _cluster,
    ),
    "recipe": ("kolm_ray.recipe:recipe_command", "write a recipe (pairs, spec, verifiers, K-floor)", _recipe),
    "spec-schema": (
        "kolm_ray.artifact.spec:spec_schema_command",
        "print the JSON Schema that spec.json follows",
        lambda p: None,
    ),
    "compile": (
        "kolm_ray.compile.compile:compile_command",
        "fine-tune on Ray Train, gate on K-score, sign a .kolm",
        add_compile_arguments,  # in compile_args.py: the loop parses the same flags without the CLI
    ),
    "run": ("kolm_ray.inference.offline:run_command", "run a .kolm artifact offline", _run),
    "verify": (
        "kolm_ray.artifact:verify_command",
        "check a .kolm's signature and file hashes",
        _artifact_only,
    ),
    "inspect": ("kolm_ray.artifact:inspect_command", "print a .kolm's manifest", _artifact_only),
    "signing": (
        "kolm_ray.artifact.signing:signing_command",
        "make an Ed25519 key pair for signing artifacts, or show this node's keys",
        _signing,
    ),
    "serve": ("kolm_ray.serve.router:serve_command", "run the Ray Serve recall router", _serve),
    "bench": ("kolm_ray.serve.bench:bench_command", "load-test a running router", _bench),
    "models": (
        "kolm_ray.registry:models_command",
        "promote, list, roll back registered models; their history",
        _models,
    ),
    "report": ("kolm_ray.loop.report:report_command", "spend, savings and drift per namespace", _report),
    "loop": (
        "kolm_ray.loop.loop:loop_command",
        "recompile, evaluate and promote namespaces on new traffic",
        _loop,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(  # its subparsers are ArgumentParsers too: argparse errors are one line, exit 2
        prog="kolm", description="Turn frontier-API traffic into small models you own."
    )
    parser.add_argument(  # SUPPRESS: absent unless given, so each command's namespace is its own flags
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show Ray's own logs too (KOLM_VERBOSE=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text, build) in COMMANDS.items():
        build(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _handler(name: str) -> Callable[[argparse.Namespace], int]:
    module, _, func = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), func)


def _printable(text: str) -> str:
    """An error as one line a terminal shows as is: newlines become spaces, other control and escape
    characters are dropped (a message may quote a file's or an artifact's untrusted text)."""
    return "".join(ch if ch.isprintable() else " " if ch in "\n\r\t" else "" for ch in text)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from kolm_ray.placement import quiet_output

        if getattr(args, "verbose", False):
            os.environ["KOLM_VERBOSE"] = "1"
        quiet_output()  # progress bars only on a terminal; Ray's chatter off unless verbose (children follow)
        if precheck := getattr(args, "precheck", None):
            precheck(args)
        return int(_handler(args.command)(args) or 0)
    except KolmError as e:
        print(f"error: {_printable(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kolm inspect X | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
