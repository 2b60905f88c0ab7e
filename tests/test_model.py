"""MPT network: config strictness, parameter counts, KV cache, sequence ids, extrapolation, init, generation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmfoundry.models.mpt import KVCache, MPTBlock, MPTConfig, MPTForCausalLM, build_meta
from llmfoundry.utils.config import ConfigError

MPT_7B_CONFIG_JSON = {  # mosaicml/mpt-7b config.json, verbatim
    "architectures": ["MPTForCausalLM"],
    "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                    "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                    "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
    "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig", "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
    "d_model": 4096, "emb_pdrop": 0, "embedding_fraction": 1.0, "expansion_ratio": 4,
    "init_config": {"emb_init_std": None, "emb_init_uniform_lim": None, "fan_mode": "fan_in",
                    "init_div_is_residual": True, "init_gain": 0, "init_nonlinearity": "relu", "init_std": 0.02,
                    "name": "kaiming_normal_", "verbose": 0},
    "init_device": "cpu", "learned_pos_emb": True, "logit_scale": None, "max_seq_len": 2048, "model_type": "mpt",
    "n_heads": 32, "n_layers": 32, "no_bias": True, "norm_type": "low_precision_layernorm", "resid_pdrop": 0,
    "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "bfloat16", "transformers_version": "4.28.1",
    "use_cache": False, "verbose": 0, "vocab_size": 50432,
}


def tiny(**kw) -> MPTConfig:
    attn = kw.pop("attn_config", {})
    base = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=64)
    base.update(kw)
    return MPTConfig.from_dict({**base, "attn_config": attn})


def model(seed=0, **kw) -> MPTForCausalLM:
    torch.manual_seed(seed)
    return MPTForCausalLM(tiny(**kw)).eval()


VARIANTS = {
    "alibi": {},
    "alibi_gqa": {"attn_config": {"kv_n_heads": 2}},
    "mqa_qkln_clip": {"attn_config": {"kv_n_heads": 1, "qk_ln": True, "clip_qkv": 0.5}, "no_bias": False},
    "learned_pos": {"learned_pos_emb": True, "attn_config": {"alibi": False}},
    "flex_alibi_gqa": {"attn_config": {"attn_impl": "flex", "kv_n_heads": 2}},
}


# ----------------------------------------------------------------------------------------------- config

def test_from_dict_is_strict():
    with pytest.raises(ConfigError, match=r"d_modle.*did you mean 'd_model'"):
        MPTConfig.from_dict({"d_modle": 8})
    with pytest.raises(ConfigError, match=r"attn_config.alibi_bias_mx.*alibi_bias_max"):
        MPTConfig.from_dict({"attn_config": {"alibi_bias_mx": 8}})
    with pytest.raises(ConfigError, match="kv_n_heads=3 must divide n_heads=4"):
        tiny(attn_config={"kv_n_heads": 3})
    with pytest.raises(ConfigError, match="attn_impl"):
        tiny(attn_config={"attn_impl": "flex", "attn_pdrop": 0.1})
    with pytest.raises(ConfigError, match="init_gain"):
        tiny(init_config={"name": "xavier_uniform_"})
    assert tiny(logit_scale="inv_sqrt_d_model").logit_scale_value == pytest.approx(1 / math.sqrt(32))


def test_from_hf_dict_reads_mpt_7b_config():
    c = MPTConfig.from_hf_dict(MPT_7B_CONFIG_JSON)
    assert (c.d_model, c.n_heads, c.n_layers, c.vocab_size, c.max_seq_len) == (4096, 32, 32, 50432, 2048)
    assert c.attn_config.alibi and not c.learned_pos_emb and c.no_bias and c.kv_n_heads == 32
    assert c.num_params() == 6_649_286_656
    assert MPTConfig.from_hf_dict(c.to_hf_dict()) == c


@pytest.mark.parametrize("change,match", [
    ({"attn_config": {**MPT_7B_CONFIG_JSON["attn_config"], "prefix_lm": True}}, "prefix_lm"),
    ({"attn_config": {**MPT_7B_CONFIG_JSON["attn_config"], "attn_type": "cross_attention"}}, "attn_type"),
    ({"ffn_config": {"ffn_type": "mptglu"}}, "ffn_config"),
    ({"n_embd": 3}, "n_embd"),
])
def test_from_hf_dict_refuses_unsupported(change, match):
    with pytest.raises(ConfigError, match=match):
        MPTConfig.from_hf_dict({**MPT_7B_CONFIG_JSON, **change})


def test_from_hf_dict_gqa_and_mqa():
    a = {**MPT_7B_CONFIG_JSON["attn_config"], "attn_type": "multiquery_attention"}
    assert MPTConfig.from_hf_dict({**MPT_7B_CONFIG_JSON, "attn_config": a}).kv_n_heads == 1
    a = {**a, "attn_type": "grouped_query_attention", "kv_n_heads": 8}
    assert MPTConfig.from_hf_dict({**MPT_7B_CONFIG_JSON, "attn_config": a}).kv_n_heads == 8
    a = {**a, "attn_type": "multihead_attention", "kv_n_heads": 1}  # llm-foundry's unused default
    assert MPTConfig.from_hf_dict({**MPT_7B_CONFIG_JSON, "attn_config": a}).kv_n_heads == 32


def test_python_api_takes_attn_type_and_use_cache():
    """llm-foundry's and transformers' habits in the constructor: attn_type and use_cache."""
    gqa = MPTConfig(d_model=64, n_heads=8, attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2})
    assert gqa.kv_n_heads == 2
    assert MPTConfig(d_model=64, n_heads=8, attn_config={"attn_type": "multiquery_attention"}).kv_n_heads == 1
    assert MPTConfig(d_model=64, n_heads=8,
                     attn_config={"attn_type": "multihead_attention", "kv_n_heads": 1}).kv_n_heads == 8
    with pytest.raises(ConfigError, match="grouped_query_attention' needs kv_n_heads"):
        MPTConfig(d_model=64, n_heads=8, attn_config={"attn_type": "grouped_query_attention"})
    with pytest.raises(ConfigError, match="'cross_attention' is not one of"):
        MPTConfig(d_model=64, n_heads=8, attn_config={"attn_type": "cross_attention"})
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=1, max_seq_len=32, vocab_size=64, use_cache=False)
    assert cfg.use_cache is False and MPTConfig().use_cache
    torch.manual_seed(0)
    model = MPTForCausalLM(cfg).eval()
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.generate(ids, max_new_tokens=5), model.generate(ids, max_new_tokens=5, use_cache=True))


def test_from_hf_dict_reads_llm_foundry_keys():
    d = {**MPT_7B_CONFIG_JSON, "fc_type": {"name": "torch"}, "ffn_config": {"ffn_type": "mptmlp", "fc_type": "torch"},
         "use_pad_tok_in_ffn": True, "block_overrides": None, "norm_eps": 1e-6, "final_logit_softcapping": None,
         "attn_config": {**MPT_7B_CONFIG_JSON["attn_config"], "rope": False, "rope_theta": 10000,
                         "rope_hf_config": {"type": "no_scaling"}, "sliding_window_size": -1, "qk_gn": False,
                         "fused_qkv": True, "attn_logit_softcapping": None}}
    c = MPTConfig.from_hf_dict(d)
    assert c.norm_eps == 1e-6 and c.kv_n_heads == 32
    with pytest.raises(ConfigError, match="rope"):
        MPTConfig.from_hf_dict({**d, "attn_config": {**d["attn_config"], "rope": True}})


# ------------------------------------------------------------------------------------------ param counts

def test_mpt_7b_param_count_on_meta():
    c = MPTConfig.from_hf_dict(MPT_7B_CONFIG_JSON)
    m = build_meta(c)
    n = sum(p.numel() for p in m.parameters())
    assert n == c.num_params() == 6_649_286_656
    assert round(n / 1e9, 2) == 6.65
    assert all(p.is_meta for p in m.parameters())
    assert c.flops_per_token(2048) == 6 * n + 12 * 32 * 4096 * 2048


@pytest.mark.parametrize("kw", [
    {}, {"no_bias": False}, {"tie_word_embeddings": False}, {"learned_pos_emb": True, "attn_config": {"alibi": False}},
    {"learned_pos_emb": True},
    {"attn_config": {"kv_n_heads": 2, "qk_ln": True}, "no_bias": False}, {"norm_type": "rmsnorm", "no_bias": False},
    {"expansion_ratio": 2.5, "attn_config": {"qk_ln": True}, "norm_type": "low_precision_rmsnorm"},
])
def test_num_params_formula(kw):
    c = tiny(**kw)
    assert build_meta(c).num_params() == c.num_params()


# ---------------------------------------------------------------------------------------- forward paths

@pytest.mark.parametrize("name", list(VARIANTS))
def test_incremental_decode_matches_full_forward(name):
    m = model(**VARIANTS[name])
    x = torch.randint(0, 64, (2, 12))
    full = m(x).logits
    out = m(x[:, :5], use_cache=True)
    steps = [out.logits]
    cache = out.past_key_values
    out = m(x[:, 5:8], past_key_values=cache, use_cache=True)  # several tokens after a cache
    steps.append(out.logits)
    for t in range(8, 12):
        out = m(x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert isinstance(cache, KVCache) and cache.seq_len == 12


@pytest.mark.parametrize("name", ["alibi", "alibi_gqa", "learned_pos", "flex_alibi_gqa"])
def test_left_padding_matches_unpadded(name):
    m = model(**VARIANTS[name])
    a, b = torch.randint(0, 64, (1, 9)), torch.randint(0, 64, (1, 6))
    x = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    full = m(x, attention_mask=mask).logits
    torch.testing.assert_close(full[0], m(a).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[1, 3:], m(b).logits[0], rtol=1e-5, atol=1e-5)
    # incremental with the growing mask equals the full padded forward
    out = m(x[:, :4], attention_mask=mask[:, :4], use_cache=True)
    steps = [out.logits]
    for t in range(4, 9):
        out = m(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    got = torch.cat(steps, 1)
    torch.testing.assert_close(got[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 3:], full[1, 3:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "flex"])
@pytest.mark.parametrize("pos", ["alibi", "learned"])
def test_sequence_id_packed_equals_separate(impl, pos):
    kw = {"learned_pos_emb": True, "attn_config": {"alibi": False}} if pos == "learned" else {"attn_config": {}}
    kw["attn_config"].update(attn_impl=impl, attn_uses_sequence_id=True, kv_n_heads=2)
    m = model(**kw)
    docs = [torch.randint(0, 64, (1, n)) for n in (5, 4, 7)]
    packed = torch.cat(docs, 1)
    sid = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], 1)
    got = m(packed, sequence_id=sid).logits
    want = torch.cat([m(d).logits for d in docs], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(m(packed).logits, want, atol=1e-3)  # without ids documents do see each other
    m.train()
    with pytest.raises(ValueError, match="sequence_id"):
        m(packed)


def test_torch_and_flex_models_agree():
    kw = {"attn_config": {"kv_n_heads": 2}}
    a = model(**kw)
    b = model(**{"attn_config": {"kv_n_heads": 2, "attn_impl": "flex"}})
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(a(x).logits, b(x).logits, rtol=1e-5, atol=1e-5)


def test_alibi_extrapolates_beyond_max_seq_len():
    m = model()
    x = torch.randint(0, 64, (1, 32))  # 2x max_seq_len
    logits = m(x).logits
    assert logits.shape == (1, 32, 64) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:, :16], m(x[:, :16]).logits, rtol=1e-5, atol=1e-5)
    longer = MPTForCausalLM(m.config.replace(max_seq_len=32)).eval()
    longer.load_state_dict(m.state_dict())
    torch.testing.assert_close(longer(x).logits, logits)


def test_learned_pos_emb_refuses_long_sequences():
    m = model(**VARIANTS["learned_pos"])
    m(torch.randint(0, 64, (1, 16)))
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        m(torch.randint(0, 64, (1, 17)))


def test_hidden_states_and_logits_for_chunked_loss():
    m = model(logit_scale=0.5, tie_word_embeddings=False)
    x = torch.randint(0, 64, (2, 10))
    h = m.transformer(x)
    assert h.shape == (2, 10, 32)
    torch.testing.assert_close(m.logits(h), m(x).logits)
    out = m(x, return_hidden=True)
    assert out.logits is None
    torch.testing.assert_close(out.hidden_states, h)
    chunks = torch.cat([m.logits(c) for c in h.split(3, dim=1)], 1)
    torch.testing.assert_close(chunks, m(x).logits)


def test_training_step_and_dropout():
    m = model(resid_pdrop=0.1, emb_pdrop=0.1, attn_config={"attn_pdrop": 0.1, "kv_n_heads": 2}).train()
    x = torch.randint(0, 64, (2, 10))
    logits = m(x).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_low_precision_layernorm_runs_in_autocast_dtype():
    m = model()
    x = torch.randint(0, 64, (1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = m.transformer.norm_f(torch.randn(1, 8, 32))
        logits = m(x).logits
    assert h.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), m(x).logits, rtol=0.1, atol=0.1)


def test_wrap_and_checkpoint_fns():
    m = model()
    assert m.fsdp_wrap_fn(m.transformer.blocks[0]) and m.activation_checkpointing_fn(m.transformer.blocks[1])
    assert not m.fsdp_wrap_fn(m.transformer) and not m.activation_checkpointing_fn(m.transformer.wte)


def test_checkpoint_only_the_first_blocks():
    """fsdp.activation_checkpointing_blocks=1 on 3 blocks, through the function composer's FSDP2 path applies: block 0
    is recomputed in backward, blocks 1-2 are not, and the gradients equal those of the model without it."""
    from composer.distributed.activation_checkpointing import apply_ac, generate_composer_model_check_fn
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from llmfoundry.train.composer_model import ComposerMPT
    cfg = MPTConfig(d_model=32, n_heads=4, n_layers=3, max_seq_len=16, vocab_size=64)
    torch.manual_seed(0)
    plain = ComposerMPT(cfg)
    torch.manual_seed(0)
    ac = ComposerMPT(cfg, checkpoint_blocks=1)
    apply_ac(ac, activation_checkpointing=True, activation_cpu_offload=False,
             check_fn=generate_composer_model_check_fn(ac))
    assert [isinstance(b, CheckpointWrapper) for b in ac.model.transformer.blocks] == [True, False, False]
    batch = {"input_ids": torch.randint(0, 64, (2, 16))}
    batch["labels"] = batch["input_ids"]
    for m in (plain, ac):
        m.train()
        m.loss(m(batch), batch).backward()
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in ac.named_parameters()}
    for n, p in plain.named_parameters():
        torch.testing.assert_close(grads[n], p.grad)


# -------------------------------------------------------------------------------------------------- init

def composer_style_meta_init(meta_model: MPTForCausalLM, device="cpu"):
    """What composer's FSDP1 ``_param_init_fn`` / FSDP2 ``meta_init`` do: children first, then for each module
    with meta params of its own: ``to_empty(recurse=False)`` and ``obj.param_init_fn(module)``."""
    def visit(mod):
        for child in mod.children():
            visit(child)
        if any(p.is_meta for p in mod.parameters(recurse=False)):
            mod.to_empty(device=device, recurse=False)
            meta_model.param_init_fn(mod)
    visit(meta_model)


@pytest.mark.parametrize("kw", [{}, {"no_bias": False, "attn_config": {"kv_n_heads": 2, "qk_ln": True},
                                     "init_config": {"name": "xavier_uniform_", "init_gain": 1.0}},
                                {"tie_word_embeddings": False, "learned_pos_emb": True,
                                 "attn_config": {"alibi": False}, "init_config": {"emb_init_std": 0.02}}])
def test_meta_init_equals_cpu_init(kw):
    c = tiny(**kw)
    torch.manual_seed(1)
    cpu = MPTForCausalLM(c)
    torch.manual_seed(1)
    meta = MPTForCausalLM(c.replace(init_device="meta"))
    assert all(p.is_meta for p in meta.parameters())
    composer_style_meta_init(meta)
    sd_cpu, sd_meta = cpu.state_dict(), meta.state_dict()
    assert sd_cpu.keys() == sd_meta.keys()
    for k in sd_cpu:
        torch.testing.assert_close(sd_meta[k], sd_cpu[k], msg=k)


@pytest.mark.parametrize("name,expect_std", [
    ("kaiming_normal_", lambda fan_in, fan_out, d: math.sqrt(2 / fan_in)),
    ("kaiming_uniform_", lambda fan_in, fan_out, d: math.sqrt(2 / fan_in)),
    ("xavier_normal_", lambda fan_in, fan_out, d: math.sqrt(2 / (fan_in + fan_out))),
    ("xavier_uniform_", lambda fan_in, fan_out, d: math.sqrt(2 / (fan_in + fan_out))),
    ("normal_", lambda fan_in, fan_out, d: 0.02),
    ("small_init_", lambda fan_in, fan_out, d: math.sqrt(2 / (5 * d))),
])
def test_init_schemes_statistics(name, expect_std):
    d, layers = 128, 2
    c = MPTConfig(d_model=d, n_heads=4, n_layers=layers, max_seq_len=8, vocab_size=64, no_bias=False,
                  init_config={"name": name, "init_std": 0.02, "init_gain": 1.0 if "xavier" in name else 0.0})
    torch.manual_seed(0)
    blk = MPTForCausalLM(c).transformer.blocks[0]
    up = blk.ffn.up_proj.weight  # (4d, d): fan_in d, fan_out 4d
    assert up.std().item() == pytest.approx(expect_std(d, 4 * d, d), rel=0.05)
    down = blk.ffn.down_proj.weight  # residual: divided by sqrt(2 * n_layers)
    assert down.std().item() == pytest.approx(expect_std(4 * d, d, d) / math.sqrt(2 * layers), rel=0.05)
    q, k, v = blk.attn.Wqkv.weight.split(d)  # fused: q, k, v each initialized as (d, d)
    for w in (q, k, v):
        assert w.std().item() == pytest.approx(expect_std(d, d, d), rel=0.08)
    assert (blk.attn.Wqkv.bias == 0).all() and (blk.norm_1.weight == 1).all() and (blk.norm_1.bias == 0).all()


def test_embedding_init_options():
    c = tiny(d_model=64, init_config={"emb_init_std": 0.5})
    assert MPTForCausalLM(c).transformer.wte.weight.std().item() == pytest.approx(0.5, rel=0.1)
    c = tiny(init_config={"emb_init_uniform_lim": [-0.1, 0.3]})
    w = MPTForCausalLM(c).transformer.wte.weight
    assert w.min() >= -0.1 and w.max() <= 0.3


@pytest.mark.filterwarnings("ignore:DTensor random operators")
def test_init_on_dtensors():
    """FSDP2 params are DTensors: init must work on them (single-rank gloo mesh on CPU)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        c = tiny(d_model=64, init_config={"name": "xavier_normal_", "init_gain": 1.0},
                 attn_config={"kv_n_heads": 2})
        m = MPTForCausalLM(c)
        for mod in m.modules():
            for n, p in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(n, torch.nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)])))
        for mod in m.modules():
            m.param_init_fn(mod)
        w = m.transformer.blocks[0].attn.Wqkv.weight
        assert isinstance(w, DTensor)
        full = w.full_tensor()
        q, k = full[:64], full[64:80]  # fused rows: q (64, 64) and k (16, 64) get different xavier stds
        assert q.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.1)
        assert k.std().item() == pytest.approx(math.sqrt(2 / 80), rel=0.2)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- generate

def test_generate_greedy_matches_argmax_loop():
    m = model(attn_config={"kv_n_heads": 2})
    x = torch.randint(0, 64, (2, 4))
    out = m.generate(x, max_new_tokens=6)
    seq = x
    for _ in range(6):
        seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_generate_left_padded_batch_matches_single_prompts():
    m = model()
    a, b = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 3))
    x = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    out = m.generate(x, 5, attention_mask=mask)
    assert torch.equal(out[0, 6:], m.generate(a, 5)[0, 6:])
    assert torch.equal(out[1, 6:], m.generate(b, 5)[0, 3:])


def test_generate_eos_sampling_and_mode():
    m = model().train()
    x = torch.randint(0, 64, (3, 4))
    greedy = m.generate(x, 8)
    assert m.training  # restored
    eos = int(greedy[0, 5])
    out = m.generate(x, 8, eos_token_id=eos)
    row = out[0, 4:]
    first = (row == eos).nonzero()[0, 0]
    assert (row[first:] == eos).all() and out.shape[1] <= 12
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = m.generate(x, 8, temperature=1.0, top_k=5, top_p=0.9, generator=g1)
    s2 = m.generate(x, 8, temperature=1.0, top_k=5, top_p=0.9, generator=g2)
    assert torch.equal(s1, s2)
    one = m.generate(x, 4, temperature=1.0, top_k=1, generator=g1)  # top_k=1 is greedy
    assert torch.equal(one, greedy[:, :8])


def test_blocks_are_mpt_blocks():
    m = model()
    assert all(isinstance(b, MPTBlock) for b in m.transformer.blocks)


# ------------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["flex", "flash", "triton"])
@pytest.mark.parametrize("seq_ids", [False, True])
def test_gpu_kernels_match_torch_in_bf16(impl, seq_ids):
    import importlib.util
    if impl == "flash" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn not installed")
    if impl == "triton":
        pytest.importorskip("llmfoundry.kernels.flash_alibi")
    kw = dict(d_model=256, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=128, init_device="cuda")
    attn = {"kv_n_heads": 2, "attn_uses_sequence_id": seq_ids}
    torch.manual_seed(0)
    ref = MPTForCausalLM(MPTConfig.from_dict({**kw, "attn_config": attn}))
    other = MPTForCausalLM(MPTConfig.from_dict({**kw, "attn_config": {**attn, "attn_impl": impl}}))
    other.load_state_dict(ref.state_dict())
    x = torch.randint(0, 128, (2, 256), device="cuda")
    sid = (torch.arange(256, device="cuda") // 100).expand(2, -1) if seq_ids else None
    exact = ref(x, sequence_id=sid).logits.float()  # fp32 reference
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = ref(x, sequence_id=sid).logits.float()
        b = other(x, sequence_id=sid).logits.float()
        b.sum().backward()
    # bf16 rounding differs per kernel: the kernel must be about as close to fp32 as the 'torch' path in bf16
    err_torch, err_impl = (a - exact).abs().max().item(), (b - exact).abs().max().item()
    assert err_impl <= 2 * err_torch + 1e-2, (err_impl, err_torch)
    assert all(p.grad is not None for p in other.parameters())
    with torch.autocast("cuda", dtype=torch.bfloat16):  # decode with a KV cache through the same kernel
        g_ref, g = ref.generate(x[:, :50], 8), other.generate(x[:, :50], 8)
    assert g.shape == g_ref.shape


@pytest.mark.parametrize("tied", [True, False])
def test_forward_with_labels_equals_full_cross_entropy_with_gradients(tied):
    """forward(labels=...) (the fused head + loss) = cross-entropy of the full logits, loss and every gradient."""
    torch.manual_seed(0)
    m = MPTForCausalLM(MPTConfig.from_dict(dict(d_model=32, n_heads=2, n_layers=1, max_seq_len=32,
                                                vocab_size=64, tie_word_embeddings=tied,
                                                logit_scale=None if tied else 0.5)))
    ids = torch.randint(0, 64, (3, 20))
    labels = ids.clone()
    labels[1, 3:11] = -100
    logits = m(ids).logits
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    full_grads = torch.autograd.grad(full, list(m.parameters()))
    out = m(ids, labels=labels)
    assert out.logits is None
    fused_grads = torch.autograd.grad(out.loss, list(m.parameters()))
    torch.testing.assert_close(out.loss, full)
    for a, b in zip(fused_grads, full_grads):
        torch.testing.assert_close(a, b)
