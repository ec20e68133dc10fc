"""The base registry: names, kinds, local directories, tiny config-built models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kolm_ray.bases import QWEN_CODER, resolve_base, weights_digest
from kolm_ray.errors import KolmError


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
