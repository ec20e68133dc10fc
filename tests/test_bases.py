"""The base registry: names, kinds, local directories, tiny config-built models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kolm_ray.errors import KolmError
from kolm_ray.models.bases import QWEN_CODER, resolve_base, weights_digest


@pytest.mark.parametrize("size", ["0.5b", "1.5b", "3b", "7b"])
def test_qwen_names_map_to_instruct_repos(size: str) -> None:
    b = resolve_base(f"qwen2.5-coder-{size}")
    assert b.kind == "causal-lm" and b.source == QWEN_CODER[size] and b.source.endswith("-Instruct")


def test_minilm_is_the_packaged_encoder() -> None:
    b = resolve_base("minilm-l6")
    assert b.kind == "encoder" and (Path(b.source) / "model.safetensors").exists()
    assert b.revision.startswith("sha256:")


def test_unknown_base_lists_known() -> None:
    with pytest.raises(
        KolmError, match=r"'gpt-9' is not a supported base; known: qwen2.5-coder-0.5b.*minilm-l6"
    ):
        resolve_base("gpt-9")
    with pytest.raises(KolmError, match="does not exist"):
        resolve_base("./no/such/dir")


def test_tiny_bases_build_and_load() -> None:
    enc = resolve_base("tiny-encoder")
    assert enc.kind == "encoder"
    model = enc.load_model()
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    lm = resolve_base("tiny-causal-lm")
    tok = lm.load_tokenizer()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok('{"namespace": "runbooks"}')["input_ids"]) == '{"namespace": "runbooks"}'
    assert lm.load_model().config.model_type == "qwen2"
    assert resolve_base("tiny-causal-lm").revision == lm.revision  # cached, deterministic


def test_local_directory_kind_from_config(tmp_path: Path) -> None:
    import shutil

    src = Path(resolve_base("tiny-causal-lm").source)
    local = tmp_path / "my-lm"
    shutil.copytree(src, local)
    b = resolve_base(str(local))
    assert b.kind == "causal-lm" and b.revision == weights_digest(local)
    enc_dir = tmp_path / "enc"
    shutil.copytree(resolve_base("tiny-encoder").source, enc_dir)
    assert resolve_base(str(enc_dir)).kind == "encoder"
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(
        json.dumps({"model_type": "mystery", "architectures": ["X"]})
    )
    with pytest.raises(KolmError, match="cannot tell"):
        resolve_base(str(tmp_path / "odd"))


def _fake_hub_cache(root: Path, repo: str, files: dict[str, str]) -> None:
    """A Hugging Face cache layout (models--org--name/refs/main + snapshots/<commit>/...) holding `files`."""
    d = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(commit)
    snap = d / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)


def test_hub_base_offline_and_uncached_names_the_repo_and_the_fetch(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    base = resolve_base("qwen2.5-coder-3b")
    problem = base.fetch_problem()
    assert problem is not None and "\n" not in problem
    assert "Qwen/Qwen2.5-Coder-3B-Instruct" in problem and "HF_HUB_OFFLINE=1" in problem
    assert "hf download Qwen/Qwen2.5-Coder-3B-Instruct" in problem and "--base DIR" in problem
    # a config alone, or an index whose shards are not all there, is not a usable base either
    repo = "Qwen/Qwen2.5-Coder-3B-Instruct"
    index = json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    )
    _fake_hub_cache(tmp_path, repo, {"config.json": "{}", "model.safetensors.index.json": index,
                                     "model-00001-of-00002.safetensors": "x"})  # fmt: skip
    assert base.fetch_problem() is not None
    snap = next((tmp_path / "models--Qwen--Qwen2.5-Coder-3B-Instruct" / "snapshots").iterdir())
    (snap / "model-00002-of-00002.safetensors").write_text("x")
    assert base.fetch_problem() is None  # cached whole: nothing to fetch, offline is fine
    assert resolve_base("tiny-encoder").fetch_problem() is None  # local directories never ask the hub


@pytest.mark.slow  # a subprocess (the real CLI), a few seconds
def test_compile_with_an_uncached_hub_base_fails_fast_before_ray(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from compile_helpers import compile_argv

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "KOLM_HOME": str(tmp_path / "k"),
    }
    env.pop("RAY_ADDRESS", None)
    argv = compile_argv(tmp_path, base="qwen2.5-coder-3b")
    proc = subprocess.run([sys.executable, "-m", "kolm_ray.cli", *argv], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: base 'qwen2.5-coder-3b'"), proc.stderr
    assert "Qwen/Qwen2.5-Coder-3B-Instruct" in lines[0] and "hf download" in lines[0]
    assert "ray" not in (proc.stdout + proc.stderr).lower().replace("--base dir", "")  # Ray never started
    assert not (tmp_path / "tagger.kolm").exists()
    # a dry run still validates the rest, and warns
    dry = subprocess.run([sys.executable, "-m", "kolm_ray.cli", *argv, "--dry-run"], capture_output=True,
                         text=True, timeout=120, env=env)  # fmt: skip
    assert (
        dry.returncode == 0
        and "ok dry run" in dry.stdout
        and "warning: base 'qwen2.5-coder-3b'" in dry.stderr
    )
