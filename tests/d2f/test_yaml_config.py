from dataclasses import dataclass, field

import pytest

from d2f.yaml_config import ConfigError, load_config, save_config


@dataclass
class Lora:
    r: int = 32
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj"])


@dataclass
class Exp:
    lr: float = 1e-5
    max_steps: int = 100
    bf16: bool = False
    output_dir: str = "out"
    teacher: str | None = None
    lora: Lora = field(default_factory=Lora)


def test_yaml_then_overrides_typed(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("lr: 3.0e-4\nlora:\n  r: 8\n")
    cfg = load_config(Exp, p, ["max_steps=7", "bf16=true", "lora.alpha=16", "lora.targets=q_proj,v_proj",
                               "teacher=none", "output_dir=runs/x"])
    assert cfg.lr == 3e-4 and cfg.max_steps == 7 and cfg.bf16 is True
    assert cfg.lora.r == 8 and cfg.lora.alpha == 16.0 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.teacher is None and cfg.output_dir == "runs/x"
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Exp, tmp_path / "resolved.yaml") == cfg


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'max_step'.*Did you mean 'max_steps'"):
        load_config(Exp, None, ["max_step=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'rank' in lora"):
        load_config(Exp, None, ["lora.rank=3"])


def test_bad_values():
    with pytest.raises(ConfigError, match=r"'max_steps': expected int, got '1.5'"):
        load_config(Exp, None, ["max_steps=1.5"])
    with pytest.raises(ConfigError, match=r"'bf16': expected true/false, got 'maybe'"):
        load_config(Exp, None, ["bf16=maybe"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(Exp, None, ["lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Exp, "/nonexistent.yaml")
