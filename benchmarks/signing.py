"""What Ed25519 signatures cost against HMAC-SHA256: pack (sign) and verify of the same artifacts, same run.

    /work/main/.venv/bin/python benchmarks/signing.py [--sizes-mib 1,64] [--repeats 5] [--checks 300]

- verify: `kolm_ray.artifact.verify()` of an artifact of each size (one safetensors member of random bytes
  plus a config), signed with each algorithm; the HMAC run is the baseline (what every node did before).
  On the Ed25519 side the node holds only the public key (KOLM_TRUSTED_KEYS), as a serving node does.
- signature check alone: `check_signature()` on one real manifest, repeated: the per-artifact cost of the
  algorithm itself, reading the key files included (Ed25519 loads KOLM_TRUSTED_KEYS on every check).
- pack: `pack()` of the same staging directory with each algorithm.
Medians of `--repeats` runs (`--checks` for the signature check alone). Timings on a shared, loaded machine:
the 1-minute load average is recorded before and after. Writes benchmarks/results/signing.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kolm_ray.artifact import MANIFEST, SIGNATURE, pack, verify  # noqa: E402
from kolm_ray.artifact.signing import check_signature, generate  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
ALGS = ("hmac-sha256", "ed25519")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def env_for(alg: str, keys: dict[str, str], signing: bool) -> dict[str, str | None]:
    """The variables of a node that signs (compile) or only verifies (serve) with `alg`."""
    if alg == "ed25519":
        return {
            "KOLM_SIGNING_KEY": None,
            "KOLM_SIGNING_KEY_FILE": keys["private_key"] if signing else None,
            "KOLM_TRUSTED_KEYS": keys["public_key"],
        }
    return {
        "KOLM_SIGNING_KEY": "benchmark-hmac-key-0123456789abcdef",
        "KOLM_SIGNING_KEY_FILE": None,
        "KOLM_TRUSTED_KEYS": None,
    }


def set_env(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="1,64")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--checks", type=int, default=300)
    ap.add_argument("--out", default=str(RESULTS / "signing.json"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    work = Path(tempfile.mkdtemp(prefix="kolm-bench-signing-"))
    try:
        return run(args, sizes, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, sizes: list[int], work: Path) -> int:
    os.environ["KOLM_HOME"] = str(work / "home")
    keys = generate(work / "keys")
    load_before = load()
    rows = []
    manifest = {"name": "b", "kind": "encoder-tagger", "spec": {}, "metrics": {}}
    for mib in sizes:
        staging = work / f"staging-{mib}"
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(os.urandom(mib << 20))
        (staging / "config.json").write_text('{"hidden_size": 384}')
        times: dict[str, dict[str, list[float]]] = {
            alg: {"pack": [], "verify": [], "check": []} for alg in ALGS
        }
        outs = {alg: work / f"{alg}-{mib}.kolm" for alg in ALGS}
        # The algorithms take turns, repeat by repeat, so both see the same (shifting) machine load.
        for _ in range(args.repeats):
            for alg in ALGS:
                set_env(env_for(alg, keys, signing=True))
                times[alg]["pack"] += timed(partial(pack, staging, outs[alg], manifest), 1)
                set_env(env_for(alg, keys, signing=False))
                times[alg]["verify"] += timed(partial(verify, outs[alg]), 1)
                with zipfile.ZipFile(outs[alg]) as z:
                    body, sig = z.read(MANIFEST), z.read(SIGNATURE).strip()
                check = partial(check_signature, body, sig, json.loads(body), "bench")
                times[alg]["check"] += timed(check, max(1, args.checks // args.repeats))
        for alg in ALGS:
            t = times[alg]
            rows.append(
                {
                    "alg": alg,
                    "size_mib": mib,
                    "pack_ms_p50": round(statistics.median(t["pack"]), 2),
                    "verify_ms_p50": round(statistics.median(t["verify"]), 2),
                    "verify_ms_min": round(min(t["verify"]), 2),
                    "signature_check_ms_p50": round(statistics.median(t["check"]), 4),
                    "signature_check_ms_p99": round(sorted(t["check"])[int(0.99 * (len(t["check"]) - 1))], 4),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "signing",
        "command": "benchmarks/signing.py " + " ".join(sys.argv[1:]),
        "repeats": args.repeats,
        "signature_checks": args.checks,
        "baseline": "hmac-sha256 (what every node did before; measured in the same run)",
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": load(),
        "cpus": os.cpu_count(),
        "note": "2 cores shared by ~8 engineers: absolute times inflated; compare algorithms within the run",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size_mib"] for r in result["rows"]})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for i, alg in enumerate(ALGS):
        by = {r["size_mib"]: r for r in result["rows"] if r["alg"] == alg}
        xs = [j + (i - 0.5) * width for j in range(len(sizes))]
        axes[0].bar(xs, [by[s]["verify_ms_p50"] for s in sizes], width, label=alg)
        axes[1].bar(xs, [by[s]["signature_check_ms_p50"] for s in sizes], width, label=alg)
    for ax, title in zip(
        axes, ("verify() p50, ms (hashes every member)", "signature check alone p50, ms"), strict=True
    ):
        ax.set_xticks(range(len(sizes)), [f"{s} MiB" for s in sizes])
        ax.set_title(title)
        ax.legend()
    fig.suptitle(
        f"Ed25519 vs HMAC-SHA256 (load {result['loadavg_1m_before']} -> {result['loadavg_1m_after']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
