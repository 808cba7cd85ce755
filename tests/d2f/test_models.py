"""Our LLaDA / Dream models against an independent naive implementation written from the
state dict alone, checkpoint round trips in the public layout, and the KV-cache equivalences."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2f import masks
from d2f.cache import KVCache
from d2f.models import CheckpointError, ModelConfig, ModelConfigError, from_pretrained, load_model, shift_logits
from d2f.models.io import INDEX_NAME


# ---- an independent reference: plain math over the public parameter names -------------------

def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):  # x (B, H, T, D)
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos[:, None, :, None].double() * inv  # (B, 1, T, D/2)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    c, s = ang.cos(), ang.sin()
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def naive_forward(sd, cfg: ModelConfig, ids, mask=None, pos=None):
    """Einsum attention in float64 from the raw state dict (names per the public checkpoints)."""
    sd = {k: v.double() for k, v in sd.items()}
    B, T = ids.shape
    H, Hk, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pos = torch.arange(T).expand(B, T) if pos is None else pos
    if cfg.arch == "llada":
        p = "model.transformer."
        x = sd[p + "wte.weight"][ids]
        names = dict(n1="attn_norm", q="q_proj", k="k_proj", v="v_proj", o="attn_out", n2="ff_norm",
                     g="ff_proj", u="up_proj", d="ff_out")
        layer = lambda i, n: f"{p}blocks.{i}.{names[n]}"
    else:
        x = sd["model.embed_tokens.weight"][ids]
        names = dict(n1="input_layernorm", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                     o="self_attn.o_proj", n2="post_attention_layernorm", g="mlp.gate_proj", u="mlp.up_proj",
                     d="mlp.down_proj")
        layer = lambda i, n: f"model.layers.{i}.{names[n]}"
    lin = lambda h, name: h @ sd[name + ".weight"].T + (sd[name + ".bias"] if name + ".bias" in sd else 0)
    for i in range(cfg.num_layers):
        h = _rms(x, sd[layer(i, "n1") + ".weight"], cfg.rms_norm_eps)
        q = lin(h, layer(i, "q")).view(B, T, H, D).transpose(1, 2)
        k = lin(h, layer(i, "k")).view(B, T, Hk, D).transpose(1, 2)
        v = lin(h, layer(i, "v")).view(B, T, Hk, D).transpose(1, 2)
        q, k = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
        k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
        s = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(D)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        y = torch.einsum("bhts,bhsd->bhtd", s.softmax(-1), v).transpose(1, 2).reshape(B, T, H * D)
        x = x + lin(y, layer(i, "o"))
        h = _rms(x, sd[layer(i, "n2") + ".weight"], cfg.rms_norm_eps)
        x = x + lin(torch.nn.functional.silu(lin(h, layer(i, "g"))) * lin(h, layer(i, "u")), layer(i, "d"))
    if cfg.arch == "llada":
        x = _rms(x, sd["model.transformer.ln_f.weight"], cfg.rms_norm_eps)
        return x @ sd["model.transformer.ff_out.weight"].T
    x = _rms(x, sd["model.norm.weight"], cfg.rms_norm_eps)
    return x @ sd["lm_head.weight"].T


def randomise_norms(model):
    """Norm weights of 1 and biases of 0 would hide naming mistakes; perturb them."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("preset", ["tiny-llada", "tiny-llada-gqa", "tiny-dream"])
def test_full_attention_matches_naive_reference(preset):
    model = randomise_norms(load_model(preset))
    ids = torch.randint(0, 120, (2, 13))
    ours = model(ids)
    ref = naive_forward(model.state_dict(), model.config, ids)
    torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=1e-4)


def test_dream_has_qkv_biases_and_shift():
    model = load_model("tiny-dream")
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.bias" in names and "model.layers.0.self_attn.o_proj.bias" not in names
    assert model.config.logits_shift == 1 and load_model("tiny-llada").config.logits_shift == 0
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    shifted = shift_logits(logits)
    torch.testing.assert_close(shifted[:, 0], logits[:, 0])  # the first position reuses its own row
    torch.testing.assert_close(shifted[:, 1:], logits[:, :-1])  # position i gets row i-1


def test_public_parameter_names():
    llada = set(load_model("tiny-llada").state_dict())
    assert {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight",
            "model.transformer.blocks.1.attn_out.weight", "model.transformer.blocks.0.ff_proj.weight",
            "model.transformer.blocks.0.up_proj.weight", "model.transformer.blocks.0.ff_out.weight",
            "model.transformer.blocks.0.attn_norm.weight", "model.transformer.blocks.0.ff_norm.weight"} <= llada
    assert not any(k.endswith(".bias") for k in llada)  # LLaDA-8B has no biases at all
    dream = set(load_model("tiny-dream").state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.k_proj.bias"} <= dream


@pytest.mark.parametrize("preset", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("sharded", [False, True])
def test_checkpoint_round_trip(tmp_path, preset, sharded):
    model = randomise_norms(load_model(preset))
    model.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "5GB")
    files = sorted(p.name for p in tmp_path.iterdir())
    if sharded:
        index = json.loads((tmp_path / INDEX_NAME).read_text())
        assert len(set(index["weight_map"].values())) > 1 and "model.safetensors" not in files
    else:
        assert "model.safetensors" in files and INDEX_NAME not in files
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == ("llada" if preset == "tiny-llada" else "Dream")
    key = "d_model" if preset == "tiny-llada" else "hidden_size"
    assert hf[key] == 64 and hf["mask_token_id"] == 127
    loaded = from_pretrained(tmp_path)
    ids = torch.randint(0, 120, (2, 9))
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def test_public_llada_config_keys_load(tmp_path):
    """A config.json written with the keys of GSAI-ML/LLaDA-8B-Instruct (shrunk) loads; extra keys survive."""
    model = load_model("tiny-llada")
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf.update({"auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM"}, "mlp_ratio": 4, "flash_attention": False,
               "rope_full_precision": True, "embedding_size": 128, "vocab_size": 128})
    (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded = from_pretrained(tmp_path)
    assert loaded.config.intermediate_size == 128  # mlp_hidden_size wins over mlp_ratio
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["auto_map"] == hf["auto_map"] and again["rope_full_precision"] is True


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    load_model("tiny-llada").save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    good = dict(sd)
    del sd["model.transformer.blocks.1.q_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.transformer\.blocks\.1\.q_proj\.weight"):
        from_pretrained(tmp_path)
    bad = dict(good)
    bad["model.transformer.blocks.0.up_proj.weight"] = torch.zeros(3, 64)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.up_proj\.weight.*\(3, 64\)"):
        from_pretrained(tmp_path)
    extra = dict(good, **{"model.transformer.blocks.0.q_proj.bias": torch.zeros(64)})
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.transformer\.blocks\.0\.q_proj\.bias'"):
        from_pretrained(tmp_path)


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="neither a local directory nor a hub id"):
        from_pretrained(tmp_path / "nope" / "deeper")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        from_pretrained(tmp_path / "empty")
    with pytest.raises(KeyError, match="unknown model preset"):
        from d2f.models import preset_config
        preset_config("llada-9b")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"could not fetch checkpoint 'GSAI-ML/LLaDA-8B-Instruct'.*local directory"):
        load_model("llada-8b")


def test_bad_model_configs():
    with pytest.raises(ModelConfigError, match="mask_token_id 500 is outside the vocabulary"):
        ModelConfig(arch="llada", vocab_size=128, hidden_size=64, num_heads=4, mask_token_id=500)
    with pytest.raises(ModelConfigError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        ModelConfig(arch="dream", vocab_size=128, hidden_size=64, num_heads=4, num_kv_heads=3, mask_token_id=1)
    with pytest.raises(ModelConfigError, match="model_type 'gpt2' is not supported"):
        ModelConfig.from_hf_dict({"model_type": "gpt2"})


@pytest.mark.parametrize("preset", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("prompt_len,block", [(5, 4), (8, 4), (3, 7), (1, 2)])
def test_block_causal_cache_equals_whole_sequence(preset, prompt_len, block):
    """Block-causal: forwarding block by block against the cache of finished blocks == one forward."""
    model = load_model(preset, dtype=torch.float64)
    n_blocks = 3
    L = prompt_len + n_blocks * block
    ids = torch.randint(0, 120, (2, L))
    pattern = masks.block_causal(prompt_len, block)
    whole = model(ids, mask=pattern)
    ref = naive_forward(model.state_dict(), model.config, ids, mask=masks.dense_mask(pattern, L))
    torch.testing.assert_close(whole, ref, atol=1e-9, rtol=1e-9)
    cache = KVCache.for_model(model, batch=2, max_len=L)
    pieces = [model(ids[:, :prompt_len], mask=pattern, cache=cache, offset=0)]
    for k in range(n_blocks):
        s = prompt_len + k * block
        pieces.append(model(ids[:, s:s + block], mask=pattern, cache=cache, offset=s))
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=1e-10, rtol=1e-10)
    # Re-forwarding a window of two blocks (one in flight, one being written) is also exact.
    cache.truncate(prompt_len + block)
    again = model(ids[:, prompt_len + block:], mask=pattern, cache=cache, offset=prompt_len + block)
    torch.testing.assert_close(again, whole[:, prompt_len + block:], atol=1e-10, rtol=1e-10)


def test_causal_cache_equals_recompute():
    model = load_model("tiny-ar", dtype=torch.float64)
    ids = torch.randint(0, 120, (3, 12))
    full = model(ids)  # is_causal model: causal by default
    ref = naive_forward(model.state_dict(), model.config, ids, mask=masks.dense_mask(masks.causal(), 12))
    torch.testing.assert_close(full, ref, atol=1e-9, rtol=1e-9)
    cache = KVCache.for_model(model, batch=3, max_len=12)
    steps = [model(ids[:, :5], cache=cache, offset=0)]
    for t in range(5, 12):
        steps.append(model(ids[:, t:t + 1], cache=cache, offset=t))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=1e-10)


def test_left_padding_with_positions_is_invisible():
    """A left-padded row with per-sample positions and key padding gives the unpadded logits."""
    model = load_model("tiny-dream", dtype=torch.float64)
    ids = torch.randint(2, 120, (1, 7))
    alone = model(ids, mask=masks.block_causal(3, 2))
    pad = 4
    padded = torch.cat([torch.full((1, pad), 1), ids], 1)
    key_valid = torch.arange(pad + 7)[None] >= pad
    pos = (torch.arange(pad + 7) - pad).clamp(min=0)[None]
    out = model(padded, position_ids=pos, mask=masks.block_causal(pad + 3, 2, key_valid=key_valid))
    torch.testing.assert_close(out[:, pad:], alone, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype):
    model = randomise_norms(load_model("tiny-llada-gqa"))
    ids = torch.randint(0, 120, (2, 11))
    ref = model(ids, mask=masks.block_causal(3, 4))
    out = model.to(dtype)(ids, mask=masks.block_causal(3, 4))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("preset", ["tiny-llada", "tiny-dream", "tiny-ar"])
def test_random_init_norms_are_one_and_logits_nonzero(preset):
    from d2f.models.common import RMSNorm
    model = load_model(preset)
    for name, m in model.named_modules():
        if isinstance(m, RMSNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
    assert model(torch.randint(0, 120, (1, 6))).abs().max() > 0.01


def test_load_onto_cpu_with_index(tmp_path):
    """accelerate calls the CPU "cpu:0" in multi-process runs."""
    load_model("tiny-llada").save_pretrained(tmp_path)
    assert from_pretrained(tmp_path, device="cpu:0").device == torch.device("cpu")


def test_dream_forward_equals_transformers_qwen2():
    """Our Dream is Qwen2 without the causal mask: with the same weights (the same parameter names) and a
    causal pattern, its logits equal transformers' Qwen2ForCausalLM (RoPE, GQA, q/k/v biases, norms),
    which runs offline, so our forward is checked against an implementation we did not write."""
    import transformers

    from d2f.masks import causal
    from d2f.models import build_model, preset_config
    cfg = preset_config("tiny-dream")
    ours = build_model(cfg, dtype=torch.float64, seed=3).eval()
    with torch.no_grad():
        for p in ours.parameters():  # away from the init's zeros and ones, so biases and norms matter
            p.add_(torch.randn_like(p) * 0.2)
    ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False, attn_implementation="eager")).double().eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(ids, mask=causal())
        want = ref(input_ids=ids).logits
        # RoPE tables are computed in float32 (docs/design.md §1), so float64 agrees to ~1e-6, not 1e-15
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
        assert not torch.allclose(ours(ids), want, atol=1e-3)  # full attention (Dream's own) differs
