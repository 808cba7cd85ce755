"""PEFT LoRA adapters on our models carry the public module names, so public adapters load."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from d2f import masks
from d2f.models import from_pretrained, load_model


@pytest.mark.parametrize("preset,targets", [("tiny-llada", ["q_proj", "k_proj", "v_proj", "attn_out"]),
                                            ("tiny-dream", ["q_proj", "k_proj", "v_proj", "o_proj"])])
def test_lora_adapter_round_trip(tmp_path, preset, targets):
    base = load_model(preset)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(from_pretrained(tmp_path / "base"),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    ids = torch.randint(0, 120, (2, 10))
    pattern = masks.block_causal(4, 3)
    want = model(ids, mask=pattern)
    model.save_pretrained(tmp_path / "adapter")
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model.model.transformer.blocks.0." if preset == "tiny-llada" else \
        "base_model.model.model.layers.0.self_attn."
    assert prefix + "q_proj.lora_A.weight" in keys  # the layout of the public D2F adapters
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(targets)
    loaded = PeftModel.from_pretrained(from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(loaded(ids, mask=pattern), want)
    with loaded.disable_adapter():  # the teacher view used by distillation
        torch.testing.assert_close(loaded(ids), base(ids))
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(ids, mask=pattern), want, atol=1e-5, rtol=1e-5)
