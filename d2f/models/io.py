"""Load and save checkpoints in the public layout: config.json + safetensors (sharded with
`model.safetensors.index.json` above `max_shard_size`), from a local directory or a hub id.

Loading is strict: a missing, unexpected or mis-shaped tensor is an error naming it, never a
silent random init. Models are built on the meta device and filled from the files, so an 8B
checkpoint never exists twice in memory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from d2f.errors import UserError
from d2f.models.config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(UserError):
    pass


def model_class(cfg: ModelConfig):
    from d2f.models.dream import DreamModel
    from d2f.models.llada import LLaDAModelLM
    return {"llada": LLaDAModelLM, "dream": DreamModel}[cfg.arch]


def build_model(cfg: ModelConfig, dtype=torch.float32, device=None, seed: int | None = 0):
    """A randomly initialised model (tests, the testbed before training)."""
    model = model_class(cfg)(cfg).to(dtype=dtype)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    model.init_weights(generator=g)
    return model.to(device) if device is not None else model


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local directory, or a hub repo id downloaded (config + safetensors only) to the HF cache."""
    from d2f.models import refs
    s = str(name_or_path)
    refs.check("checkpoint", s, CheckpointError)
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(s, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # offline, unknown repo, gated repo...
        raise CheckpointError(f"could not fetch checkpoint {s!r} from the hub ({type(e).__name__}: {e}). "
                              "Pass a local directory with config.json and *.safetensors instead.") from e
    return Path(local)


def read_json(path: Path, what: str = "file") -> dict:
    """A JSON object from `path`, or a CheckpointError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {str(path)!r} is not valid JSON ({e}); fix or replace the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {str(path)!r} holds a JSON {type(data).__name__}, expected an object")
    return data


def read_config(path: Path) -> ModelConfig:
    return ModelConfig.from_hf_dict(read_json(path / CONFIG_NAME, "config"))


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX_NAME).is_file():
        index = read_json(path / INDEX_NAME, "shard index")
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{str(path / INDEX_NAME)!r} has no weight_map; fix or replace the file")
        files = sorted(set(index["weight_map"].values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{INDEX_NAME} in {str(path)!r} lists shard(s) that are missing: {missing}")
        return [path / f for f in files]
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {str(path)!r}")


def _unreadable(f: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read weights file {str(f)!r} ({type(e).__name__}: {e}); it is truncated or "
                           "corrupt: download or copy it again")


def open_weights(f: Path, device: torch.device):
    try:
        return safe_open(str(f), framework="pt", device=str(device))
    except SafetensorError as e:
        raise _unreadable(f, e) from None


def _read_tensor(fh, key: str, f: Path) -> torch.Tensor:
    try:
        return fh.get_tensor(key)
    except SafetensorError as e:
        raise _unreadable(f, e) from None


def check_load_args(name_or_path, dtype, device) -> tuple[torch.dtype | None, object]:
    """(dtype, device) for loading name_or_path, or a UserError naming the bad argument: no checkpoint
    reference, a dtype that is not a float dtype (or its name), a device this machine does not have."""
    from d2f.device import check_device, parse_dtype
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise CheckpointError(f"name_or_path {name_or_path!r} is not a model: pass a checkpoint directory "
                              "(config.json + *.safetensors), a hub id (owner/name) or a preset name")
    if dtype is not None:
        dtype = parse_dtype(dtype)
    if device is not None:
        check_device(device, use_cpu="device='cpu'")
    return dtype, device


def from_pretrained(name_or_path, dtype: torch.dtype | None = None, device=None,
                    config: ModelConfig | None = None):
    """Load our model class for a LLaDA / Dream checkpoint (no trust_remote_code). dtype: a torch float
    dtype or its name ("float32", "bf16", ...; None = the checkpoint's); device: checked against this
    machine before anything is read."""
    dtype, device = check_load_args(name_or_path, dtype, device)
    path = resolve_checkpoint(name_or_path)
    cfg = config or read_config(path)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings and cfg.arch == "dream":
        expected.pop("lm_head.weight", None)  # shares the embedding's storage
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":
        device = torch.device("cpu")  # accelerate names it "cpu:0" in multi-process runs; safetensors wants "cpu"
    state, seen_dtype = {}, None
    for f in _weight_files(path):
        with open_weights(f, device) as fh:
            for key in fh.keys():
                if key not in expected:
                    raise CheckpointError(f"unexpected tensor {key!r} in {f.name}: the {cfg.arch} architecture "
                                          "has no such parameter (wrong model_type or a different model?)")
                t = _read_tensor(fh, key, f)
                if tuple(t.shape) != tuple(expected[key]):
                    raise CheckpointError(f"tensor {key!r} in {f.name} has shape {tuple(t.shape)}, "
                                          f"expected {tuple(expected[key])} from config.json")
                seen_dtype = seen_dtype or t.dtype
                state[key] = t
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is missing tensor(s) {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    dtype = dtype or seen_dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.name_or_path = str(name_or_path)
    return model.eval()


def save_pretrained(model, save_directory, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None):
    """Write config.json + safetensors (sharded with an index above max_shard_size)."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(max_shard_size, str):
        units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
        max_shard_size = int(float(max_shard_size[:-2]) * units[max_shard_size[-2:].upper()])
    cfg: ModelConfig = model.config
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings and cfg.arch == "dream":
        state.pop("lm_head.weight", None)
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_shard_size:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += n
    shards.append(cur)
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_NAME), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    (out / CONFIG_NAME).write_text(json.dumps(hf, indent=2))


# ---- adapters: which base they belong to --------------------------------------------------------

BASE_FINGERPRINT_NAME = "d2f_base.json"  # written beside adapter_config.json by train/distill.py


def base_fingerprint(model, n_tensors: int = 8, n_values: int = 16) -> dict[str, list[float]]:
    """A few values of a few of the base model's weights: enough to tell two models apart (the AR
    baseline from the teacher it was adapted into, a base from its fine-tune), and compared with a
    tolerance, so the same weights loaded in bfloat16 or float32 match. LoRA layers are left out and
    PEFT's `.base_layer` is dropped from the names, so a wrapped model gives its base's fingerprint."""
    params = {k.replace(".base_layer", ""): p for k, p in model.named_parameters() if "lora_" not in k}
    names = sorted(params)
    picked = names[::max(1, len(names) // n_tensors)][:n_tensors]
    out = {}
    for k in picked:
        flat = params[k].detach().reshape(-1)
        out[k] = flat[::max(1, flat.numel() // n_values)][:n_values].float().cpu().tolist()
    return out


def write_base_fingerprint(model, adapter_dir, base_name: str) -> None:
    data = {"base_model_name_or_path": base_name, "fingerprint": base_fingerprint(model)}
    (Path(adapter_dir) / BASE_FINGERPRINT_NAME).write_text(json.dumps(data, indent=1))


def check_adapter_base(model, adapter_dir, model_name: str) -> None:
    """Refuse to put an adapter on a model other than the one it was trained on (its recorded
    fingerprint differs); adapters without a record (other tools) are not checked here."""
    f = Path(adapter_dir) / BASE_FINGERPRINT_NAME
    if not f.is_file():
        rec = _fingerprint_of_recorded_base(adapter_dir, model)
        if rec is None:
            return
    else:
        rec = read_json(f, "adapter base record")
    params = {k.replace(".base_layer", ""): p for k, p in model.named_parameters() if "lora_" not in k}
    for k, values in rec["fingerprint"].items():
        p = params.get(k)
        ok = p is not None
        if ok:
            flat = p.detach().reshape(-1)
            got = flat[::max(1, flat.numel() // len(values))][:len(values)].float().cpu()
            ok = got.shape[0] == len(values) and torch.allclose(got, torch.tensor(values), rtol=2e-2, atol=1e-3)
        if not ok:
            raise CheckpointError(f"adapter {str(adapter_dir)!r} was trained on {rec['base_model_name_or_path']!r}, "
                                  f"and {model_name!r} is a different model (its weight {k!r} "
                                  f"{'is missing' if p is None else 'differs'}); load the adapter on the model it "
                                  "was distilled from")


def _fingerprint_of_recorded_base(adapter_dir, model) -> dict | None:
    """For an adapter without d2f_base.json (made by another tool): when adapter_config.json names a base
    that is a local directory here, the fingerprint of that base's weights, read from its files (only
    the few tensors compared); None when there is nothing local to compare with."""
    cfg = Path(adapter_dir) / "adapter_config.json"
    if not cfg.is_file():
        return None
    base = read_json(cfg, "adapter config").get("base_model_name_or_path")
    path = Path(str(base)).expanduser() if base else None
    if path is None or not path.is_dir() or not list(path.glob("*.safetensors")):
        return None
    ours = base_fingerprint(model)
    values = {}
    for f in sorted(path.glob("*.safetensors")):
        with open_weights(f, torch.device("cpu")) as fh:
            for k in set(fh.keys()) & set(ours):
                flat = _read_tensor(fh, k, f).reshape(-1)
                values[k] = flat[::max(1, flat.numel() // len(ours[k]))][:len(ours[k])].float().tolist()
    if not values:
        return None
    return {"base_model_name_or_path": str(base), "fingerprint": values}
