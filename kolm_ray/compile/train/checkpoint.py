"""Training checkpoints, without pickle: the trainable weights only (encoder layers that were not frozen +
heads, or the LoRA adapter) as safetensors, the optimizer state as safetensors + JSON, state.json (epoch,
step, losses), and under DeepSpeed its own sharded checkpoint beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "model.safetensors"
OPTIM = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
STATE = "state.json"
DS_DIR = "deepspeed"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights training changes (names as in the unwrapped model)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, path: str | Path) -> None:
    """Load trainable weights saved by trainable_state into a freshly built model."""
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint has weights the model lacks: {unexpected[:3]}")


def _save_optimizer(opt: torch.optim.Optimizer, directory: Path) -> None:
    """Optimizer state without pickle: tensors to safetensors, the rest to JSON."""
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta["state"].setdefault(str(pid), {})[k] = v
    save_file(tensors, str(directory / OPTIM))
    (directory / OPTIM_META).write_text(json.dumps(meta))


def load_optimizer(opt: torch.optim.Optimizer, directory: Path) -> None:
    meta = json.loads((directory / OPTIM_META).read_text())
    state: dict[int, dict] = {}
    for key, v in load_file(str(directory / OPTIM)).items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["state"].items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_checkpoint(directory: Path, model: nn.Module, opt, state: dict, rank: int, engine=None) -> None:
    if engine is not None:
        engine.save_checkpoint(str(directory / DS_DIR), tag="state")  # every rank writes its shard
        from deepspeed import zero

        params = [p for p in engine.module.parameters() if p.requires_grad]
        with zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")):
            if rank == 0:
                save_file(trainable_state(engine.module), str(directory / WEIGHTS))
    elif rank == 0:
        save_file(trainable_state(model), str(directory / WEIGHTS))
        _save_optimizer(opt, directory)
    if rank == 0:
        (directory / STATE).write_text(json.dumps(state))
