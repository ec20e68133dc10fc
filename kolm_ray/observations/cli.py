"""`kolm observations list|import|export`: the bridge API's twins, straight on the store.

kolm observations list --namespace support --verified true --limit 20     # JSON lines on stdout
kolm observations import rows.jsonl --namespace support                   # all rows or none
kolm observations export --namespace support --out support.jsonl [--verified-only]
kolm observations delete --namespace support [--tenant T] [--before 2026-12-01] [--matching jane@example.com]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kolm_ray.errors import KolmError
from kolm_ray.observations.model import check_namespace, parse_import
from kolm_ray.observations.store import MAX_PAGE, open_store


def _list(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 100_000:
        raise KolmError(f"--limit must be in [1, 100000], got {args.limit}")
    flag = {"true": True, "false": False, "null": "null", None: None}[args.verified]
    store = open_store(args.store)
    try:
        left, cursor = args.limit, None
        while left > 0:
            page, cursor = store.list(
                namespace=args.namespace,
                tenant=args.tenant,
                verified=flag,
                limit=min(left, MAX_PAGE),
                cursor=cursor,
            )
            for obs in page:
                sys.stdout.write(obs.model_dump_json() + "\n")
            left -= len(page)
            if cursor is None:
                break
    finally:
        store.close()
    return 0


def _import(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise KolmError(f"{path}: no such file")
    if args.namespace is not None:
        try:
            check_namespace(args.namespace)
        except ValueError as e:
            raise KolmError(f"--namespace: {e}") from None
    try:
        observations = parse_import(path.read_bytes(), default_namespace=args.namespace)
    except UnicodeDecodeError:
        raise KolmError(f"{path}: not UTF-8 text") from None
    except ValueError as e:
        raise KolmError(f"{path}: {e}; nothing imported") from None
    store = open_store(args.store)
    try:
        inserted = store.append_many(observations)
    except KeyError as e:
        raise KolmError(f"{path}: {e.args[0]}; nothing imported") from None
    finally:
        store.close()
    print(json.dumps({"inserted": inserted}))
    return 0


def _export(args: argparse.Namespace) -> int:
    try:
        check_namespace(args.namespace)
    except ValueError as e:
        raise KolmError(f"--namespace: {e}") from None
    out = Path(args.out)
    if not out.parent.is_dir():
        raise KolmError(f"--out: directory {out.parent} does not exist")
    store = open_store(args.store)
    tmp = out.with_name(out.name + ".partial")
    n = 0
    try:
        # Written to a side file and renamed: a failed export never leaves a half file at --out.
        with open(tmp, "w", encoding="utf-8") as f:
            for batch in store.iter_observations(
                args.namespace, verified=True if args.verified_only else None
            ):
                for obs in batch:
                    f.write(obs.model_dump_json() + "\n")
                n += len(batch)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        store.close()
    print(f"ok wrote {n} observations to {out}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    from kolm_ray.observations.erase import Erasure, erase
    from kolm_ray.settings import kolm_home

    try:
        erasure = Erasure.parse(args.namespace, args.tenant, args.before, args.matching)
    except ValueError as e:
        raise KolmError(f"--{e}") from None  # "--before: '2026-13-01' is not an ISO date: ..."
    store = open_store(args.store)
    try:
        result = erase(store, erasure, kolm_home())
    except TimeoutError as e:
        raise KolmError(str(e)) from None
    finally:
        store.close()
    print(json.dumps(result))
    return 0


def observations_command(args: argparse.Namespace) -> int:
    """Dispatch `kolm observations list|import|export|delete`."""
    return {"list": _list, "import": _import, "export": _export, "delete": _delete}[args.action](args)
