"""Hugging Face interop: directories written by transformers' MptForCausalLM load here and vice versa, with the
same logits (fp32, random weights, no hub access)."""
from __future__ import annotations

import json

import pytest
import torch

from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM

transformers = pytest.importorskip("transformers")


def hf_model(seed=0, **kw):
    from transformers import MptConfig, MptForCausalLM
    base = dict(d_model=48, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=80)
    base.update(kw)
    torch.manual_seed(seed)
    m = MptForCausalLM(MptConfig(**base)).eval()
    with torch.no_grad():  # make norm weights non-trivial so they are checked too
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def inputs(vocab=80, b=2, s=12, pad=3):
    torch.manual_seed(1)
    x = torch.randint(0, vocab, (b, s))
    mask = torch.ones_like(x)
    mask[1, :pad] = 0
    return x, mask


def assert_logits_close(ours, theirs, mask=None):
    if mask is not None:  # outputs at padded positions are unspecified
        keep = mask.bool()
        ours, theirs = ours[keep], theirs[keep]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


HF_CONFIGS = {
    "default": {},  # transformers' defaults: learned_pos_emb=true, no_bias=true, alibi
    "heads6_softmax_scale": {"n_heads": 6, "attn_config": {"softmax_scale": 0.3}},
    "clip_qkv": {"attn_config": {"clip_qkv": 0.4}},
    "untied": {"tie_word_embeddings": False},
    "no_bias_false": {"no_bias": False},  # transformers' MPT has no biases whatever no_bias says
    "learned_pos_false_eps": {"learned_pos_emb": False, "layer_norm_epsilon": 1e-3},
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
@pytest.mark.parametrize("safe", [True, False])
def test_load_transformers_checkpoint(tmp_path, name, safe):
    if name not in ("default", "untied") and not safe:
        pytest.skip("pytorch_model.bin covered by the default/untied configs")
    theirs = hf_model(**HF_CONFIGS[name])
    if safe:
        theirs.save_pretrained(tmp_path)
    else:  # the legacy layout (transformers 5 no longer writes it): config.json + pytorch_model.bin
        theirs.config.save_pretrained(tmp_path)
        torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    ours = MPTForCausalLM.from_pretrained(tmp_path).eval()
    x, mask = inputs()
    with torch.no_grad():
        assert_logits_close(ours(x).logits, theirs(x).logits)
        assert_logits_close(ours(x, attention_mask=mask).logits, theirs(x, attention_mask=mask).logits, mask)
    assert ours.config.attn_config.alibi and not ours.config.learned_pos_emb and ours.config.no_bias


OUR_CONFIGS = {
    "default": {},
    "heads6": {"n_heads": 6},
    "heads12_clip_scale": {"n_heads": 12, "attn_config": {"clip_qkv": 0.3, "softmax_scale": 0.25}},
    "untied": {"tie_word_embeddings": False},
    "eps_layernorm": {"norm_eps": 1e-3, "norm_type": "layernorm"},
}


def our_model(seed=0, **kw):
    attn = kw.pop("attn_config", {})
    base = dict(d_model=48, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=80)
    base.update(kw)
    torch.manual_seed(seed)
    m = MPTForCausalLM(MPTConfig.from_dict({**base, "attn_config": attn})).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("name", list(OUR_CONFIGS))
def test_transformers_loads_our_export(tmp_path, name):
    from transformers import MptForCausalLM as HFMpt
    ours = our_model(**OUR_CONFIGS[name])
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "mpt" and cfg["architectures"] == ["MptForCausalLM"]
    theirs = HFMpt.from_pretrained(tmp_path).eval()
    x, mask = inputs()
    with torch.no_grad():
        assert_logits_close(ours(x).logits, theirs(x).logits)
        assert_logits_close(ours(x, attention_mask=mask).logits, theirs(x, attention_mask=mask).logits, mask)
    back = MPTForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config == ours.config
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kw,feature", [
    ({"attn_config": {"kv_n_heads": 2}}, "grouped-query attention"),
    ({"attn_config": {"qk_ln": True}}, "qk_ln"),
    ({"no_bias": False}, "no_bias=false"),
    ({"learned_pos_emb": True, "attn_config": {"alibi": False}}, "learned_pos_emb=true"),
    ({"learned_pos_emb": True}, "learned_pos_emb=true"),  # ALiBi plus a position table (llm-foundry style)
    ({"attn_config": {"alibi_bias_max": 16}}, "alibi_bias_max=16"),
    ({"logit_scale": "inv_sqrt_d_model"}, "logit_scale"),
    ({"expansion_ratio": 2}, "expansion_ratio=2"),
    ({"norm_type": "rmsnorm"}, "rmsnorm"),
])
def test_export_refuses_features_transformers_lacks(tmp_path, kw, feature):
    m = our_model(**kw)
    with pytest.raises(ValueError, match=feature) as e:
        m.save_pretrained(tmp_path)
    assert "strict_hf=False" in str(e.value)
    # our own format still round-trips exactly
    m.save_pretrained(tmp_path, strict_hf=False)
    back = MPTForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config == m.config
    x, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, m(x).logits, rtol=0, atol=0)


def test_load_with_longer_max_seq_len_extrapolates(tmp_path):
    from transformers import MptForCausalLM as HFMpt
    our_model().save_pretrained(tmp_path)  # built for 16 tokens
    ours = MPTForCausalLM.from_pretrained(tmp_path, max_seq_len=32).eval()
    assert ours.config.max_seq_len == 32
    theirs = HFMpt.from_pretrained(tmp_path, max_seq_len=32).eval()
    x = torch.randint(0, 80, (1, 32))
    with torch.no_grad():
        assert_logits_close(ours(x).logits, theirs(x).logits)


def test_override_attn_impl_and_dtype(tmp_path):
    our_model().save_pretrained(tmp_path)
    m = MPTForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_config={"attn_impl": "flex"})
    assert m.config.attn_config.attn_impl == "flex" and m.config.attn_config.alibi
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_sharded_save_loads_both_ways(tmp_path):
    from transformers import MptForCausalLM as HFMpt
    from llmfoundry.models.mpt.hf import save_hf
    ours = our_model()
    save_hf(ours.config, ours.state_dict(), tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    x, _ = inputs()
    with torch.no_grad():
        assert_logits_close(MPTForCausalLM.from_pretrained(tmp_path)(x).logits, ours(x).logits)
        assert_logits_close(HFMpt.from_pretrained(tmp_path).eval()(x).logits, ours(x).logits)


def test_mismatched_weights_are_listed(tmp_path):
    our_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layers"], cfg["d_model"] = 3, 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        MPTForCausalLM.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing from the checkpoint: transformer.blocks.2" in msg
    assert "shape mismatch: transformer.blocks.0.attn.Wqkv.weight: checkpoint (144, 48) vs config (192, 64)" in msg


def test_learned_pos_model_refuses_longer_max_seq_len(tmp_path):
    m = our_model(learned_pos_emb=True, attn_config={"alibi": False})
    m.save_pretrained(tmp_path, strict_hf=False)
    with pytest.raises(ValueError, match=r"transformer.wpe.weight: checkpoint \(16, 48\) vs config \(32, 48\)"):
        MPTForCausalLM.from_pretrained(tmp_path, max_seq_len=32)


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MPTForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(MPTConfig().to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="no weights"):
        MPTForCausalLM.from_pretrained(tmp_path)
