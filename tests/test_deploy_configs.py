"""Every YAML in deployments/ and configs/ is loaded and validated by what consumes it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
YAMLS = sorted(p for d in ("deployments", "configs") for p in (REPO / d).rglob("*.y*ml"))


def _validate_serve_config(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(data)
    assert schema.applications, f"{path}: no applications"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("serve run" in first or "kolm serve" in first), (
        "first line: the command"
    )
    for app in data["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(__import__(module, fromlist=[attr]), attr)
        if module == "deployments.recall":
            from deployments.recall import Args

            args = Args.model_validate(app.get("args") or {})
            assert set(app["args"]) == {"artifact", "tenants", "threshold", "budget_ms"}
            assert (REPO / args.tenants).is_file()
        assert callable(builder)


def _validate_tenants(path: Path) -> None:
    from kolm_ray.serve.router import load_tenants

    assert load_tenants(path).all


def _validate_recipe_yaml(path: Path) -> None:
    from kolm_ray.recipe import validate_recipe_dir

    validate_recipe_dir(path.parent)


def _validate_prices(path: Path) -> None:
    from kolm_ray.loop.prices import load_prices

    table = load_prices(str(path))
    assert table.taken, f"{path}: the date the prices were taken"
    assert table.models and all(p.input > 0 and p.output > 0 for p in table.models.values())
    assert table.key_for("gpt-4o-2024-08-06") == "gpt-4o"  # a dated response model finds its row


def _validate_compute_prices(path: Path) -> None:
    from kolm_ray.loop.compute_prices import load_compute_prices

    table = load_compute_prices(str(path))
    assert table.taken, f"{path}: the date the prices were taken"
    assert table.cpu_hour > 0 and table.gpu_hour > table.cpu_hour  # a GPU-hour costs more than a CPU-hour


def _validator(path: Path):
    rel = path.relative_to(REPO).as_posix()
    if rel.startswith("deployments/"):
        return _validate_serve_config
    if path.name == "tenants.yaml":
        return _validate_tenants
    if path.name == "recipe.yaml":
        return _validate_recipe_yaml
    if path.name == "prices.yaml":
        return _validate_prices
    if path.name == "compute_prices.yaml":
        return _validate_compute_prices
    return None


def test_the_serve_config_and_tenants_are_among_them():
    names = {p.relative_to(REPO).as_posix() for p in YAMLS}
    assert {"deployments/recall.yaml", "configs/tenants.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_yaml_loads_and_validates(path):
    data = yaml.safe_load(path.read_text())
    assert data is not None, f"{path} is empty"
    validate = _validator(path)
    assert validate is not None, (
        f"{path}: add a validator for this kind of YAML to tests/test_deploy_configs.py"
    )
    validate(path)
