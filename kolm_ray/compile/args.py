"""The flags of `kolm compile`, apart from the CLI so that the loop's recompile parses the same ones
(the library never imports kolm_ray.cli). Standard library only: `kolm --help` builds every
subcommand's flags, and that must not import what compile itself needs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from kolm_ray.errors import ArgumentParser


def add_compile_arguments(p: argparse.ArgumentParser) -> None:
    """`kolm compile`'s flags (the CLI's table names this builder)."""
    p.add_argument("description", nargs="?", help="what the model does (pairs form)")
    p.add_argument("--recipe", help="a recipe directory written by `kolm recipe`")
    p.add_argument("--base", help="qwen2.5-coder-0.5b|1.5b|3b|7b, minilm-l6, or a local HF model directory")
    p.add_argument("--pairs", help="JSON lines {input, output[, split]}")
    p.add_argument("--eval-pairs", help="JSON lines held out for the K-score")
    p.add_argument(
        "--namespaces", help="JSON array (or object name->description) closing the `namespace` field"
    )
    p.add_argument("--verifier", help="comma-separated verifiers, e.g. closed-vocab,calibrated-brier=0.10")
    p.add_argument("--k-floor", type=float, help="minimum K-score in [0, 1]")
    p.add_argument("--output", required=True, help="where to write the signed .kolm")
    p.add_argument("--epochs", type=int)
    p.add_argument(
        "--lr", type=float, help="peak learning rate (default per base kind; recipe.yaml training.lr)"
    )
    p.add_argument("--num-workers", type=int)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--deepspeed", help="DeepSpeed config JSON (configs/deepspeed/*.json)")
    p.add_argument(
        "--bundle-base", action="store_true", help="LoRA bases: write merged weights, not just the adapter"
    )
    p.add_argument("--dry-run", action="store_true", help="validate everything, train nothing, write nothing")


def compile_args(argv: Sequence[str]) -> argparse.Namespace:
    """`kolm compile ARGV` parsed as the CLI parses it (every flag not in argv at its default)."""
    parser = ArgumentParser(prog="kolm compile")
    add_compile_arguments(parser)
    return parser.parse_args(list(argv))
