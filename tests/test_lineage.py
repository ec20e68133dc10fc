"""Every compiled artifact says what data it was trained on: the recipe records where its pairs came from
(namespace, store scheme, how many observations, first/last seen), compile signs that into the manifest's
`lineage` with the sha256 of the pairs and of the recipe, and `kolm inspect` shows it."""

from __future__ import annotations

import hashlib
import json
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import recipe_data as rd
import yaml
from compile_helpers import build_artifact_without_ray

from kolm_ray.cli import build_parser, main
from kolm_ray.compile.plan import validate
from kolm_ray.observations.model import Observation
from kolm_ray.observations.store import open_store
from kolm_ray.recipe import recipe_from_observations

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_recipe_records_lineage_and_compile_plans_it(store_url, tmp_path):
    """Cluster members carry no created_at: the recipe asks the store (each backend) for the pairs' times."""
    members, _ = rd.categorical(300, field="namespace")
    # one observation per hour from T0; the last 20 are rejected (verified false) and never become pairs
    rows = [{**m, "verified": None if i < 280 else False} for i, m in enumerate(members)]
    with open_store(store_url) as store:
        store.append_many([Observation(**{**r, "namespace": "support", "provider": "openai",
                                          "created_at": T0 + timedelta(hours=i)}) for i, r in enumerate(rows)])  # fmt: skip
    info = recipe_from_observations(rows, out_dir=str(tmp_path / "r"), namespace="support", store=store_url)
    recipe = yaml.safe_load((tmp_path / "r" / "recipe.yaml").read_text())
    n_pairs = len((tmp_path / "r" / "pairs.jsonl").read_text().splitlines())
    scheme = store_url.split(":")[0]
    assert n_pairs == 280 and recipe["lineage"] == {
        "namespace": "support",
        "store": scheme,
        "observations": 280,
        "first_seen": T0.isoformat(),
        "last_seen": (T0 + timedelta(hours=279)).isoformat(),  # the rejected rows after it are not counted
    }
    assert "password" not in json.dumps(recipe["lineage"]) and "@" not in json.dumps(recipe["lineage"])

    plan = validate(
        build_parser().parse_args(["compile", "--recipe", info["recipe_dir"], "--output", "x.kolm"])
    )
    d = Path(info["recipe_dir"])
    listing = "".join(f"{sha256(d / n)}  {n}\n" for n in ("pairs.jsonl", "recipe.yaml", "spec.json"))
    assert plan.lineage == {
        **recipe["lineage"],
        "pairs_sha256": sha256(d / "pairs.jsonl"),
        "recipe_sha256": hashlib.sha256(listing.encode()).hexdigest(),  # `sha256sum ... | sha256sum`
    }


def test_observations_with_their_own_times_need_no_store(tmp_path):
    members, _ = rd.categorical(300, field="namespace")
    obs = [{**m, "created_at": (T0 - timedelta(minutes=i)).isoformat()} for i, m in enumerate(members)]
    recipe_from_observations(obs, out_dir=str(tmp_path / "r"), namespace="support")
    lineage = yaml.safe_load((tmp_path / "r" / "recipe.yaml").read_text())["lineage"]
    assert lineage["store"] is None and lineage["last_seen"] == T0.isoformat()
    assert lineage["first_seen"] == (T0 - timedelta(minutes=299)).isoformat()


def test_plain_pairs_lineage_and_the_signed_manifest(tmp_path, capsys):
    """--pairs: no namespace, store or times, observations = pairs; the lineage is signed and inspectable."""
    artifact, _ = build_artifact_without_ray(tmp_path, epochs=1)
    capsys.readouterr()
    assert main(["inspect", str(artifact)]) == 0
    lineage = json.loads(capsys.readouterr().out)["lineage"]
    assert lineage == {
        "namespace": None, "store": None, "observations": 90, "first_seen": None, "last_seen": None,
        "pairs_sha256": sha256(tmp_path / "pairs.jsonl"), "recipe_sha256": None,
    }  # fmt: skip

    # the lineage is under the signature: an edited one no longer verifies (exit 4)
    forged = tmp_path / "forged.kolm"
    with zipfile.ZipFile(artifact) as zin, zipfile.ZipFile(forged, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "manifest.json":
                m = json.loads(data)
                m["lineage"]["namespace"] = "billing"
                data = json.dumps(m, indent=2, sort_keys=True).encode()
            zout.writestr(item.filename, data)
    assert main(["verify", str(forged)]) == 4


def test_a_recipe_with_a_bad_lineage_is_refused(tmp_path, capsys):
    members, _ = rd.categorical(300, field="namespace")
    info = recipe_from_observations(members, out_dir=str(tmp_path / "r"), namespace="support")
    path = Path(info["recipe_dir"]) / "recipe.yaml"
    path.write_text(path.read_text().replace('"observations": ', '"observations": -'))
    assert (
        main(["compile", "--recipe", info["recipe_dir"], "--output", str(tmp_path / "x.kolm"), "--dry-run"])
        == 2
    )
    assert "lineage.observations must be a count" in capsys.readouterr().err
