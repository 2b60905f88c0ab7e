"""``precision: amp_fp8`` (llmfoundry/train/fp8.py): torchao's float8 training of the transformer blocks' linears.

Three tiers:

- CPU, always: the refusals before training (the CPU through scripts/train.py, a GPU without FP8, torchao missing
  or of the wrong line for this torch, recipe / all-gather settings), the ``fp8:`` config section, and
  llm-foundry's ``precision: amp_fp8``.
- CPU with torchao installed (skipped without it, as in CI, whose locked environment has no torchao): the
  conversion itself with torchao's emulated FP8 products: exactly the block linears, unchanged state_dict keys of
  plain tensors, MPT's meta-device init, FSDP2 float8 all-gather over gloo.
- GPU (``-m gpu``; skipped without a GPU of compute capability 8.9+ and a working torchao): real runs through
  scripts/train.py: FSDP2 + float8 all-gather + meta init + activation checkpointing + torch.compile + our Triton
  attention train close to bf16; checkpoints have bf16's keys, resume across precisions and export to HF.
  On the GPU hosts: ``../shared/device/wheels.sh torchao==0.18.0`` here, then ``python3 -m pytest -q -m gpu
  tests/test_fp8.py`` there (see bench/bench_fp8.py's docstring for the whole command): 7 tests, 11 compiled runs,
  about 400 s on one H100.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch
from torch import nn

from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM
from llmfoundry.train import fp8, load_config
from llmfoundry.train.config import Fp8Config, TrainConfig
from llmfoundry.train.foundry_dialect import translate
from llmfoundry.utils.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "yamls" / "tiny-cpu.yaml")
PRETRAIN = str(REPO / "tests" / "data" / "foundry" / "mpt-pretrain.yaml")
H100 = ("NVIDIA H100 80GB HBM3", (9, 0))


def run_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RUN_NAME", None)
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _torchao_problem() -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'mpt-forge[fp8]')"
    try:
        fp8.check_torchao()
    except ConfigError as e:
        return str(e)
    return None


TORCHAO_PROBLEM = _torchao_problem()
needs_torchao = pytest.mark.skipif(TORCHAO_PROBLEM is not None, reason=str(TORCHAO_PROBLEM))


def _rowwise_problem() -> str | None:
    try:
        fp8.check_torchao("rowwise")
    except ConfigError as e:
        return str(e)
    return None


# ------------------------------------------------------------------------------- refusals, before training (CPU)
def test_cpu_run_is_refused_before_training_naming_the_cpu_and_the_fix(tmp_path):
    save = tmp_path / "ck"
    r = run_cli([TINY, "precision=amp_fp8", f"save_folder={save}"])
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: precision: amp_fp8 needs an NVIDIA GPU"), r.stderr[-2000:]
    assert "CPU" in err[0] and "precision: amp_bf16" in err[0] and "8.9" in err[0]
    assert "Traceback" not in r.stderr and not save.exists()  # nothing was built or written


def test_gpu_without_fp8_is_refused_naming_it_and_the_fix():
    with pytest.raises(ConfigError) as e:
        fp8.check_hardware("gpu", ("NVIDIA A100-SXM4-80GB", (8, 0)))
    msg = str(e.value)
    assert "NVIDIA A100-SXM4-80GB" in msg and "compute capability 8.0" in msg and msg.endswith("precision: amp_bf16")
    with pytest.raises(ConfigError, match="the CPU"):
        fp8.check_hardware("cpu")
    fp8.check_hardware("gpu", H100)
    fp8.check_hardware("gpu", ("NVIDIA L4", (8, 9)))


def test_missing_torchao_is_one_message_with_the_install_command(monkeypatch):
    def no_torchao(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "version", no_torchao)
    with pytest.raises(ConfigError) as e:
        fp8.check_fp8("gpu", Fp8Config(), None, gpu=H100)  # a good GPU: torchao is what is missing
    assert "torchao is not installed" in str(e.value) and "pip install 'mpt-forge[fp8]'" in str(e.value)


def _fake_torchao(monkeypatch, version: str, torch_version: str, importable: bool = True):
    monkeypatch.setattr(metadata, "version", lambda name: version)
    monkeypatch.setattr(torch, "__version__", torch_version)
    float8 = types.ModuleType("torchao.float8")
    float8.Float8LinearConfig = float8.convert_to_float8_training = object()
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", float8 if importable else None)


def test_torchao_of_another_torch_line_is_refused_with_the_line_to_install(monkeypatch):
    _fake_torchao(monkeypatch, "0.12.0", "2.11.0+cu130")  # 0.12's extensions can abort torch >= 2.9: not imported
    with pytest.raises(ConfigError) as e:
        fp8.check_torchao()
    assert "torchao 0.12.0" in str(e.value) and "torchao>=0.18,<0.19" in str(e.value)
    _fake_torchao(monkeypatch, "0.18.0", "2.7.0+cu126", importable=False)  # 0.18 does not import on torch 2.7
    with pytest.raises(ConfigError) as e:
        fp8.check_torchao()
    assert "does not work with torch 2.7.0" in str(e.value) and "torchao>=0.11,<0.13" in str(e.value)
    assert "precision: amp_bf16" in str(e.value)
    _fake_torchao(monkeypatch, "0.12.0", "2.7.0+cu126")
    assert fp8.check_torchao("tensorwise") == "0.12.0"
    with pytest.raises(ConfigError, match="fp8.recipe: rowwise needs torchao 0.13"):
        fp8.check_torchao("rowwise")
    _fake_torchao(monkeypatch, "0.18.0", "2.11.0+cu130")
    assert fp8.check_torchao("rowwise") == "0.18.0"


# ------------------------------------------------------------------------------------------------ the config
def test_fp8_section_defaults_and_validation():
    cfg = load_config(TINY, ["precision=amp_fp8"])
    assert cfg.precision == "amp_fp8" and cfg.fp8 == Fp8Config("tensorwise", None)
    cfg = load_config(TINY, ["precision=amp_fp8", "fp8.recipe=rowwise", "fp8.fsdp_float8_all_gather=false"])
    assert (cfg.fp8.recipe, cfg.fp8.fsdp_float8_all_gather) == ("rowwise", False)
    with pytest.raises(ConfigError, match=r"'fp8.recipe' = 'rowwize' must be one of \['tensorwise', 'rowwise'\] "
                                          r"\(did you mean 'rowwise'\?\)"):
        load_config(TINY, ["precision=amp_fp8", "fp8.recipe=rowwize"])
    with pytest.raises(ConfigError, match="'fsdp_float8_all_gather: true' needs 'recipe: tensorwise'"):
        load_config(TINY, ["fp8.recipe=rowwise", "fp8.fsdp_float8_all_gather=true"])
    with pytest.raises(ConfigError, match="unknown config key 'fp8.recipes'"):
        load_config(TINY, ["fp8.recipes=rowwise"])
    with pytest.raises(ConfigError, match="precision"):
        load_config(TINY, ["precision=amp_fp4"])


@pytest.mark.parametrize("recipe, wanted, fsdp, ranks, expected", [
    ("tensorwise", None, ["fsdp.version=2"], 2, True),
    ("tensorwise", None, ["fsdp.version=2"], 1, False),  # one GPU gathers nothing: the layer casts, compiled
    ("tensorwise", None, ["fsdp=null"], 2, False),
    ("tensorwise", None, ["fsdp.version=1"], 2, False),
    ("rowwise", None, ["fsdp.version=2"], 2, False),
    ("tensorwise", False, ["fsdp.version=2"], 2, False),
    ("tensorwise", True, ["fsdp.version=2"], 1, True),  # asked for: on, on one GPU too
    ("tensorwise", True, ["fsdp=null"], 2, "needs FSDP2 (fsdp.version: 2); this run has fsdp: null"),
    ("tensorwise", True, ["fsdp.version=1"], 2, "this run has fsdp.version: 1"),
])
def test_fsdp_float8_all_gather_resolution(recipe, wanted, fsdp, ranks, expected, monkeypatch):
    flag = "null" if wanted is None else str(wanted).lower()
    cfg = load_config(TINY, [f"fp8.recipe={recipe}", f"fp8.fsdp_float8_all_gather={flag}", *fsdp])
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            fp8.fsdp_float8_all_gather(cfg.fp8, cfg.fsdp, ranks)
    else:
        assert fp8.fsdp_float8_all_gather(cfg.fp8, cfg.fsdp, ranks) is expected
        monkeypatch.setenv("WORLD_SIZE", str(ranks))  # the launcher's world size is the default
        assert fp8.fsdp_float8_all_gather(cfg.fp8, cfg.fsdp) is expected


def test_composer_runs_amp_bf16_around_the_fp8_layers():
    assert fp8.composer_precision("amp_fp8") == "amp_bf16"
    assert [fp8.composer_precision(p) for p in ("fp32", "amp_bf16", "amp_fp16")] == ["fp32", "amp_bf16", "amp_fp16"]


def _model(**kw) -> MPTForCausalLM:
    base = dict(d_model=64, n_heads=4, n_layers=3, max_seq_len=64, vocab_size=256, init_device="meta")
    return MPTForCausalLM(MPTConfig.from_dict({**base, **kw}))


def test_block_linears_are_the_attention_and_ffn_projections():
    model = _model(tie_word_embeddings=False)
    chosen = [fqn for fqn, m in model.named_modules() if fp8.is_block_linear(fqn, m)]
    assert chosen == [f"transformer.blocks.{i}.{name}" for i in range(3)
                      for name in ("attn.Wqkv", "attn.out_proj", "ffn.up_proj", "ffn.down_proj")]
    assert isinstance(model.lm_head, nn.Linear) and "lm_head" not in chosen  # the head stays bf16
    odd = _model(d_model=72, n_heads=4)  # 72 x 216, 72 x 288: not multiples of 16
    assert not any(fp8.is_block_linear(fqn, m) for fqn, m in odd.named_modules())


def test_a_model_with_no_fp8_able_layer_is_refused_before_conversion():
    cfg = load_config(TINY, ["precision=amp_fp8", "model.d_model=72", "model.n_heads=4"])
    with pytest.raises(ConfigError, match="no linear layer .* multiples of 16 .* precision: amp_bf16"):
        fp8.prepare(_model(d_model=72, n_heads=4), cfg)


# ------------------------------------------------------------------------------------ llm-foundry's amp_fp8
def test_llm_foundry_amp_fp8_translates_to_torchao_fp8():
    t = translate({"model": {"name": "mpt_causal_lm", "d_model": 64, "n_heads": 4, "n_layers": 2},
                   "precision": "amp_fp8", "fsdp_config": {"sharding_strategy": "FULL_SHARD"}}, TrainConfig)
    assert t.problems == [] and t.data["precision"] == "amp_fp8"
    (note,) = [n for n in t.notes if n.startswith("precision:")]
    assert "torchao" in note and "not Transformer Engine" in note and "pip install 'mpt-forge[fp8]'" in note
    t = translate({"model": {"name": "mpt_causal_lm", "d_model": 64, "n_heads": 4, "n_layers": 2, "fc_type": "te"},
                   "precision": "amp_fp8"}, TrainConfig)
    (problem,) = t.problems  # Transformer Engine layers: not needed, one message says why
    assert problem.startswith("model.fc_type: 'te'") and "precision: amp_fp8 alone" in problem


def test_llm_foundry_yaml_with_amp_fp8_on_cpu_is_translated_then_refused(tmp_path):
    r = run_cli([PRETRAIN, "precision=amp_fp8", "tokenizer.name=bundled", f"save_folder={tmp_path}/{{run_name}}",
                 "variables.data_local=${bundled:mds}", "model.attn_config.attn_impl=torch"])
    assert r.returncode == 1, r.stderr[-3000:]
    assert "precision: amp_fp8: FP8 through torchao here" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: precision: amp_fp8 needs an NVIDIA GPU")


# ------------------------------------------------------------------- torchao's emulated FP8 on the CPU (torchao)
@needs_torchao
@pytest.mark.parametrize("all_gather", [False, True])
def test_apply_fp8_converts_exactly_the_block_linears(all_gather):
    from torchao.float8.float8_linear import Float8Linear
    model = _model(tie_word_embeddings=False)
    n = fp8.apply_fp8(model, "tensorwise", fsdp_float8_all_gather=all_gather, emulate=True)
    converted = [fqn for fqn, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert n == 12 and converted == [f"transformer.blocks.{i}.{name}" for i in range(3)
                                     for name in ("attn.Wqkv", "attn.out_proj", "ffn.up_proj", "ffn.down_proj")]
    assert type(model.lm_head) is nn.Linear and type(model.transformer.wte) is nn.Embedding
    block = model.transformer.blocks[1]  # MPT's init attributes are carried over (the init test checks their effect)
    assert block.attn.Wqkv._fused == block.attn.split
    assert block.attn.out_proj._is_residual and block.ffn.down_proj._is_residual


@needs_torchao
@pytest.mark.parametrize("ranks, callbacks, said", [
    (2, ["PrecomputeFloat8Scales"], "FSDP float8 all-gather on)"),
    (1, [], "FSDP float8 all-gather off: one GPU gathers nothing (fp8.fsdp_float8_all_gather: true forces it)"),
])
def test_prepare_gathers_in_fp8_only_with_more_than_one_rank(ranks, callbacks, said, monkeypatch, caplog):
    """The run's FP8 setup under FSDP2 with the default ``fp8.fsdp_float8_all_gather: null``: the launcher's world
    size decides, the callbacks follow, and the log says why it is off on one GPU."""
    monkeypatch.setenv("WORLD_SIZE", str(ranks))
    cfg = load_config(TINY, ["precision=amp_fp8", "fsdp.version=2"])
    with caplog.at_level(logging.INFO, logger="llmfoundry.train.fp8"):
        got = fp8.prepare(_model(), cfg)
    assert [type(c).__name__ for c in got] == callbacks
    assert said in caplog.text


@needs_torchao
@pytest.mark.parametrize("all_gather", [False, True])
def test_meta_init_after_conversion_equals_bf16_init_and_state_dict_is_plain(all_gather):
    """MPT's init needs the attributes the conversion would drop (fused q/k/v, residual scaling): with GQA and
    fan_out the fused Wqkv's three parts get different scales, so any loss shows. The state dict has the same keys
    and plain tensors (no torchao wrapper): checkpoints load without torchao."""
    kw = dict(tie_word_embeddings=False, attn_config={"kv_n_heads": 2}, init_config={"fan_mode": "fan_out"})
    torch.manual_seed(0)
    ref = _model(**kw, init_device="cpu")
    model = _model(**kw)
    assert fp8.apply_fp8(model, "tensorwise", fsdp_float8_all_gather=all_gather, emulate=True) == 12
    torch.manual_seed(0)
    model.to_empty(device="cpu")
    model.apply(model.param_init_fn)  # what FSDP's meta init does, module by module
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    assert {type(v) for v in got.values()} == {torch.Tensor}
    for k in want:
        assert torch.equal(got[k], want[k]), k


@needs_torchao
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_emulated_fp8_forward_backward_close_to_bf16(recipe):
    if recipe == "rowwise" and _rowwise_problem():
        pytest.skip(_rowwise_problem())
    torch.manual_seed(0)
    ref = _model(init_device="cpu")
    model = _model(init_device="cpu")
    model.load_state_dict(ref.state_dict())
    fp8.apply_fp8(model, recipe, emulate=True)
    x = torch.randint(0, 256, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref(x, labels=x).loss, model(x, labels=x).loss
    got.backward()
    assert abs(got.item() - want.item()) < 0.02 * want.item()
    assert all(p.grad is not None for p in model.parameters())


FSDP2_GLOO = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor
    from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM
    from llmfoundry.train import fp8
    dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + sys.argv[1])
    torch.manual_seed(0)
    m = MPTForCausalLM(MPTConfig.from_dict(dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=256)))
    assert fp8.apply_fp8(m, "tensorwise", fsdp_float8_all_gather=True, emulate=True) == 8
    for block in m.transformer.blocks:
        fully_shard(block)
    fully_shard(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 64))
    losses = []
    for _ in range(4):
        loss = m(x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad()
        fp8.PrecomputeFloat8Scales().batch_end(type("S", (), {"model": m})(), None)
        losses.append(loss.item())
    assert m.transformer.blocks[0].attn.Wqkv.weight._local_tensor._precomputed_scale is not None
    sharded = m.state_dict()
    assert all(type(v._local_tensor if isinstance(v, DTensor) else v) is torch.Tensor for v in sharded.values())
    full = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert {type(v) for v in full.values()} == {torch.Tensor}
    print("losses", losses)
    dist.destroy_process_group()
""")


@needs_torchao
def test_fsdp2_float8_all_gather_over_gloo_trains_and_saves_plain_tensors():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-c", FSDP2_GLOO, str(port)], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
                           "PYTHONPATH", "")])})
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [float(x) for x in re.search(r"losses \[(.*)\]", r.stdout).group(1).split(",")]
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------------------- GPU (real FP8)
def _gpu_problem() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    name, cap = fp8.current_gpu()
    if tuple(cap) < fp8.MIN_CAPABILITY:
        return f"{name} (compute capability {cap[0]}.{cap[1]}) has no FP8 tensor cores"
    return TORCHAO_PROBLEM


GPU_PROBLEM = _gpu_problem()
needs_fp8_gpu = pytest.mark.skipif(GPU_PROBLEM is not None, reason=str(GPU_PROBLEM))
B = 30  # batches of the GPU runs
GPU_RUN = ["global_train_batch_size=8", "device_train_microbatch_size=4", "device_eval_batch_size=8",
           f"max_duration={B}ba", f"eval_interval={B}ba", "eval_subset_num_batches=2", f"save_interval={B}ba",
           "console_log_interval=1ba", "scheduler.t_warmup=3ba", "autoresume=false",
           "callbacks.speed_monitor.window_size=2", "model.attn_config.attn_impl=triton"]
# the 7B recipe's FSDP setup on one GPU: FULL_SHARD, PURE bf16, meta init, recomputation, compiled
FSDP2 = ["fsdp.version=2", "fsdp.sharding_strategy=FULL_SHARD", "fsdp.mixed_precision=PURE", "model.init_device=meta",
         "fsdp.activation_checkpointing=true", "fsdp.state_dict_type=full", "compile_config={}"]


def train_losses(r: subprocess.CompletedProcess) -> dict[int, float]:
    blocks = re.findall(r"^\[batch=(\d+)/\d+\]:\n(?:\t .*\n)*?\t Train loss/train/total: ([-\d.]+)$",
                        r.stdout + r.stderr, re.MULTILINE)
    return {int(batch): float(loss) for batch, loss in blocks}


def _ckpt(folder: Path, batch: int) -> dict:
    (path,) = glob.glob(str(folder / f"ep*-ba{batch}-rank0.pt"))
    return torch.load(path, map_location="cpu", weights_only=False)["state"]


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory):
    """The tiny model trained B batches in bf16 and in FP8 (tensorwise, float8 all-gather, asked for: one GPU
    would not use it by default), same seed and data."""
    root = tmp_path_factory.mktemp("fp8gpu")
    runs = {}
    for precision in ("amp_bf16", "amp_fp8"):
        gather = ["fp8.fsdp_float8_all_gather=true"] if precision == "amp_fp8" else []
        r = run_cli([TINY, *GPU_RUN, *FSDP2, f"precision={precision}", f"save_folder={root / precision}",
                     f"run_name={precision}", *gather])
        assert r.returncode == 0, (r.stdout[-3000:] + r.stderr[-3000:])
        runs[precision] = (root / precision, r)
    return runs


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_fp8_trains_close_to_bf16(gpu_runs):
    (_, bf16), (_, f8) = gpu_runs["amp_bf16"], gpu_runs["amp_fp8"]
    out = f8.stdout + f8.stderr
    assert "precision amp_fp8: 8 linear layers of the transformer blocks train in FP8" in out
    assert "recipe tensorwise, FSDP float8 all-gather on" in out
    a, b = train_losses(bf16), train_losses(f8)
    assert sorted(a) == sorted(b) == list(range(1, B + 1))
    assert b[B] < b[1] - 0.5  # it learns
    # same seed, initial weights and data: FP8 rounding moves the loss a little, not the curve
    assert all(abs(a[i] - b[i]) <= 0.05 * a[i] for i in range(1, B + 1)), (a, b)
    assert abs(a[B] - b[B]) <= 0.03 * a[B], (a[B], b[B])


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_fp8_checkpoint_is_ordinary(gpu_runs):
    """The same keys and shapes as bf16's, plain tensors in the model and optimizer state (loadable without
    torchao)."""
    a, b = _ckpt(gpu_runs["amp_bf16"][0], B), _ckpt(gpu_runs["amp_fp8"][0], B)
    assert a["model"].keys() == b["model"].keys()
    assert all(a["model"][k].shape == b["model"][k].shape and a["model"][k].dtype == b["model"][k].dtype
               for k in a["model"])
    assert {type(v) for v in b["model"].values()} == {torch.Tensor}
    (opt,) = b["optimizers"].values()
    assert {type(t) for s in opt["state"].values() for t in s.values() if isinstance(t, torch.Tensor)} == {
        torch.Tensor}


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("source, target", [("amp_fp8", "amp_bf16"), ("amp_bf16", "amp_fp8")])
def test_gpu_checkpoint_resumes_in_the_other_precision(gpu_runs, tmp_path, source, target):
    folder = gpu_runs[source][0]
    (ckpt,) = glob.glob(str(folder / f"ep*-ba{B}-rank0.pt"))
    r = run_cli([TINY, *GPU_RUN, *FSDP2, f"precision={target}", f"load_path={ckpt}", f"max_duration={B + 4}ba",
                 f"save_folder={tmp_path}/ck", "run_name=resumed"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = train_losses(r)
    assert sorted(losses) == list(range(B + 1, B + 5))  # continued from batch B
    assert losses[B + 1] < train_losses(gpu_runs[source][1])[1] - 0.5  # with the trained weights


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_fp8_checkpoint_exports_to_hugging_face(gpu_runs, tmp_path):
    (ckpt,) = glob.glob(str(gpu_runs["amp_fp8"][0] / f"ep*-ba{B}-rank0.pt"))
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_composer_to_hf.py"), ckpt,
                        str(tmp_path / "hf"), "--verify"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "transformers MptForCausalLM vs ours: max |logit diff|" in r.stdout + r.stderr
    from transformers import MptForCausalLM
    assert MptForCausalLM.from_pretrained(tmp_path / "hf").config.n_layers == 2


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_fp8_sharded_checkpoint_resumes_in_bf16(tmp_path):
    """FSDP2 sharded (DCP) checkpoints with float8 all-gather: saved by an FP8 run, continued in bf16."""
    sharded = [a for a in FSDP2 if not a.startswith("fsdp.state_dict_type")] + ["fsdp.state_dict_type=sharded"]
    first = run_cli([TINY, *GPU_RUN, *sharded, "precision=amp_fp8", "fp8.fsdp_float8_all_gather=true",
                     "max_duration=4ba", "save_interval=4ba", f"save_folder={tmp_path}/ck", "run_name=sharded"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_cli([TINY, *GPU_RUN, *sharded, "precision=amp_bf16", "max_duration=6ba",
                      f"save_folder={tmp_path}/ck", "run_name=sharded", "autoresume=true"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert sorted(train_losses(second)) == [5, 6]


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_fp8_rowwise_without_fsdp_trains(tmp_path):
    if _rowwise_problem():
        pytest.skip(_rowwise_problem())
    r = run_cli([TINY, *GPU_RUN, "precision=amp_fp8", "fp8.recipe=rowwise", "fsdp=null", "model.init_device=cuda",
                 "max_duration=10ba", f"save_folder={tmp_path}/ck"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "recipe rowwise, FSDP float8 all-gather off" in out
    losses = train_losses(r)
    assert losses[10] < losses[1] - 0.5


# ------------------------------------------------------------------------------- the benchmarks' own logic (CPU)
def _bench(name: str):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_bench_fp8_runs_are_valid_configs_and_ratios_compare_to_bf16():
    b, bt = _bench("bench_fp8"), _bench("bench_train")
    for model in ("7b", "1b"):
        names = []
        for name, overrides in b.precision_variants(["tensorwise", "rowwise"]):
            extra = [*b.COMMON, *b.MODEL_OVERRIDES.get(model, []), *overrides]
            cfg = load_config(REPO / f"yamls/mpt-{model}.yaml",
                              bt.overrides_for(model, "triton", 1, 8, Path("/tmp/x"), extra, name, 4, None))
            assert cfg.compile_config == {} and cfg.fsdp.activation_checkpointing is False
            names.append((name, cfg.precision, cfg.fp8.recipe))
        assert names == [("bf16", "amp_bf16", "tensorwise"), ("fp8-tensorwise", "amp_fp8", "tensorwise"),
                         ("fp8-rowwise", "amp_fp8", "rowwise")]
    variants = b.precision_variants(["tensorwise"], [["no-gather", "fp8.fsdp_float8_all_gather=false"]])
    assert variants[-1] == ("fp8-no-gather", ["precision=amp_fp8", "fp8.fsdp_float8_all_gather=false"])
    cfg = load_config(REPO / "yamls/mpt-7b.yaml", bt.overrides_for("7b", "triton", 1, 8, Path("/tmp/x"),
                                                                     variants[-1][1], "x", 4, None))
    assert cfg.precision == "amp_fp8" and cfg.fp8.fsdp_float8_all_gather is False
    rows = [{"model": "7b", "variant": "bf16", "ok": True, "tokens_per_sec": 13000.0, "mfu": 0.56,
             "peak_allocated_mem": 116.9, "micro_batch": 4, "accum": 4},
            {"model": "7b", "variant": "fp8-tensorwise", "ok": True, "tokens_per_sec": 16250.0, "mfu": 0.70,
             "peak_allocated_mem": 101.0, "micro_batch": 4, "accum": 4},
            {"model": "7b", "variant": "fp8-rowwise", "ok": False, "error": "boom", "micro_batch": 4, "accum": 4}]
    b.speedups(rows)
    assert rows[1]["vs_bf16"] == pytest.approx(1.25)
    text = b.table(rows, 989.0)
    assert ">= 1.28x: MISSED" in text and "FAILED: boom" in text

    # a bf16 variant is the peer of the FP8 variant of its name: that setting's own ratio
    no_fsdp = ["fsdp=null", "model.init_device=cuda"]
    variants = b.precision_variants([], [["no-fsdp", *no_fsdp], ["no-fsdp", "precision=amp_bf16", *no_fsdp]])
    assert variants[1:] == [("fp8-no-fsdp", ["precision=amp_fp8", *no_fsdp]),
                            ("bf16-no-fsdp", ["precision=amp_bf16", *no_fsdp])]
    rows += [{"model": "7b", "variant": "fp8-no-fsdp", "ok": True, "tokens_per_sec": 15000.0, "mfu": 0.65,
              "peak_allocated_mem": 120.0, "micro_batch": 4, "accum": 4},
             {"model": "7b", "variant": "bf16-no-fsdp", "ok": True, "tokens_per_sec": 12000.0, "mfu": 0.52,
              "peak_allocated_mem": 125.0, "micro_batch": 4, "accum": 4}]
    b.speedups(rows)
    assert rows[3]["vs_bf16"] == pytest.approx(1.25) and rows[3]["bf16_peer"] == "bf16-no-fsdp"
    assert rows[1]["bf16_peer"] == "bf16" and rows[0]["vs_bf16"] == 1.0
    text = b.table(rows, 989.0)
    assert "(against bf16-no-fsdp)" in text


def test_fp8_quality_parses_logs_and_compares_final_eval_losses(tmp_path):
    q = _bench("fp8_quality")
    for precision in q.PRECISIONS:  # both runs: the same config but precision
        cfg = load_config(REPO / "yamls/mpt-125m.yaml", q.run_overrides(tmp_path, precision, 1000, 16, 16, 100,
                                                                         "tensorwise", "triton"))
        assert (cfg.precision, cfg.seed, cfg.train_loader.shuffle_seed) == (precision, 17, 17)
        assert cfg.train_loader.local == f"{tmp_path.resolve()}/mds" and cfg.eval_loader.split == "val"
    log = ("[batch=10/20]:\n\t Train time/batch: 9\n\t Train loss/train/total: 7.5000\n"
           "\t Train throughput/device/tokens_per_sec: 1000.5\n[Eval batch=1/2] Eval on eval data:\n"
           "\t Eval metrics/eval/LanguageCrossEntropy: 7.2500\n[batch=20/20]:\n\t Train loss/train/total: 6.0000\n"
           "[Eval batch=2/2] Eval on eval data:\n\t Eval metrics/eval/LanguageCrossEntropy: 6.1000\n")
    parsed = q.parse_log(log)
    assert parsed == {"train": {10: 7.5, 20: 6.0}, "eval": {10: 7.25, 20: 6.1}, "tokens_per_sec": 1000.5}
    bf16 = {"precision": "amp_bf16", "recipe": None, "steps": 20, "batch": 16, **parsed}
    fp8_run = {**bf16, "precision": "amp_fp8", "recipe": "tensorwise", "eval": {10: 7.3, 20: 6.1 * 1.005}}
    result = q.report(bf16, fp8_run, tmp_path)
    assert result["relative_difference"] == pytest.approx(0.005) and result["within_1_percent"]
    assert (tmp_path / "fp8_quality.json").exists()
    far = {**fp8_run, "eval": {20: 6.1 * 1.02}}
    assert not q.compare(bf16, far)["within_1_percent"]


def test_fp8_quality_reads_fp8_against_the_spread_of_two_bf16_seeds(tmp_path):
    """--bf16_seed: a bf16 run from other initial weights in the same data order; the report compares FP8's
    difference with the two bf16 runs' and takes the JSON files of separate commands. --fp8_seed: FP8 from those
    weights too, a second FP8/bf16 pair."""
    q = _bench("fp8_quality")
    cfg = load_config(REPO / "yamls/mpt-125m.yaml", q.run_overrides(tmp_path, "amp_bf16", 1000, 16, 16, 100,
                                                                     "tensorwise", "triton", seed=43))
    assert (cfg.seed, cfg.train_loader.shuffle_seed, cfg.run_name) == (43, 17, "fp8-quality-amp_bf16-seed43")
    run = {"recipe": None, "steps": 100, "batch": 16, "train": {100: 6.0}, "tokens_per_sec": 1.0}
    bf16 = {**run, "precision": "amp_bf16", "label": "amp_bf16", "seed": None, "eval": {90: 7.0, 100: 6.0}}
    fp8_run = {**run, "precision": "amp_fp8", "label": "amp_fp8", "seed": None, "recipe": "tensorwise",
               "eval": {90: 7.0, 100: 6.0 * 0.985}}  # batch 100 is the last, though "90" > "100" as strings
    other = {**run, "precision": "amp_bf16", "label": "amp_bf16-seed43", "seed": 43, "eval": {90: 7.0, 100: 6.12}}
    summary = q.compare(bf16, fp8_run, [other])
    assert summary["relative_difference"] == pytest.approx(0.015) and not summary["within_1_percent"]
    assert summary["bf16_seed_spread"] == pytest.approx(0.02) and summary["within_bf16_seed_spread"]
    assert summary["final_eval_loss"]["amp_bf16-seed43"] == pytest.approx(6.12)
    files = []
    for r in (bf16, fp8_run, other):
        files.append(tmp_path / f"{r['label']}.json")
        files[-1].write_text(json.dumps(r))
    out = tmp_path / "report"
    assert q.main(["report", "--out", str(out), *map(str, files)]) == 1  # 1.5% is not within 1%
    written = json.loads((out / "fp8_quality.json").read_text())
    assert set(written["runs"]) == {"amp_bf16", "amp_fp8", "amp_bf16-seed43"} and written["within_bf16_seed_spread"]
    assert written["relative_difference"] == pytest.approx(0.015)  # the curves read back keyed by batch numbers
    pair, joined = tmp_path / "pair", tmp_path / "joined"  # a report's JSON stands for its runs: the seed run
    assert q.main(["report", "--out", str(pair), str(files[0]), str(files[1])]) == 1  # joins a published pair
    assert "bf16_seed_spread" not in json.loads((pair / "fp8_quality.json").read_text())
    assert q.main(["report", "--out", str(joined), str(pair / "fp8_quality.json"), str(files[2])]) == 1
    assert json.loads((joined / "fp8_quality.json").read_text())["bf16_seed_spread"] == pytest.approx(0.02)
    with pytest.raises(SystemExit):  # the same run twice
        q.main(["report", "--out", str(out), str(files[0]), str(files[1]), str(files[2]), str(files[2])])
    seed17 = tmp_path / "amp_bf16-seed17.json"  # seed 17 is the YAML's: the bf16 run's weights again
    seed17.write_text(json.dumps({**other, "label": "amp_bf16-seed17", "seed": q.YAML_SEED}))
    with pytest.raises(SystemExit):
        q.main(["report", "--out", str(out), str(files[0]), str(files[1]), str(seed17)])

    # --fp8_seed: FP8 from the other seed's weights, a second pair; it joins the report of the three runs
    fp8_43 = {**fp8_run, "label": "amp_fp8-seed43", "seed": 43, "eval": {90: 7.0, 100: 6.12 * 0.98}}
    files.append(tmp_path / "amp_fp8-seed43.json")
    files[-1].write_text(json.dumps(fp8_43))
    four = tmp_path / "four"
    assert q.main(["report", "--out", str(four), str(joined / "fp8_quality.json"), str(files[3])]) == 1
    written = json.loads((four / "fp8_quality.json").read_text())
    assert set(written["runs"]) == {"amp_bf16", "amp_fp8", "amp_bf16-seed43", "amp_fp8-seed43"}
    assert written["final_eval_loss"]["amp_fp8-seed43"] == pytest.approx(6.12 * 0.98)
    assert written["signed_relative_difference"] == pytest.approx({"seed 17": -0.015, "seed 43": -0.02})
    # with two pairs the verdict is on the means over the seeds: FP8 lower in both, 1.75% lower on average
    assert written["verdict"] == "seed_mean_within_1_percent" and not written["seed_mean_within_1_percent"]
    assert written["seed_mean_relative_difference"] == pytest.approx((6.06 - (5.91 + 6.12 * 0.98) / 2) / 6.06)
    above = tmp_path / "amp_fp8-seed43-above.json"  # FP8 above bf16 in the second pair: the means agree
    above.write_text(json.dumps({**fp8_43, "eval": {90: 7.0, 100: 6.12 * 1.012}}))
    assert q.main(["report", "--out", str(tmp_path / "above"), str(joined / "fp8_quality.json"), str(above)]) == 0
    written = json.loads((tmp_path / "above" / "fp8_quality.json").read_text())
    assert written["seed_mean_within_1_percent"] and not written["within_1_percent"]
    with pytest.raises(SystemExit):  # FP8 from another seed, but no bf16 from it to pair with
        q.main(["report", "--out", str(out), str(files[0]), str(files[1]), str(files[3])])
    fp8_44 = {**fp8_43, "label": "amp_fp8-seed44", "seed": 44}
    files.append(tmp_path / "amp_fp8-seed44.json")
    files[-1].write_text(json.dumps(fp8_44))
    with pytest.raises(SystemExit):  # bf16 and FP8 from two different other seeds: no pair
        q.main(["report", "--out", str(out), *map(str, files[:3]), str(files[4])])

    # a third pair (seed 44) joins the report of the four runs: the means are over three seeds, and the bf16
    # spread is the farthest of the other seeds' bf16 runs from the first
    bf16_44 = {**other, "label": "amp_bf16-seed44", "seed": 44, "eval": {90: 7.0, 100: 5.94}}
    files.append(tmp_path / "amp_bf16-seed44.json")
    files[-1].write_text(json.dumps(bf16_44))
    six = tmp_path / "six"
    assert q.main(["report", "--out", str(six), str(tmp_path / "above" / "fp8_quality.json"), str(files[4]),
                   str(files[5])]) == 0
    written = json.loads((six / "fp8_quality.json").read_text())
    assert list(written["runs"]) == ["amp_bf16", "amp_fp8", "amp_bf16-seed43", "amp_fp8-seed43", "amp_bf16-seed44",
                                     "amp_fp8-seed44"]
    assert written["seeds"] == 3 and written["bf16_seed_spread"] == pytest.approx(0.02)
    assert written["signed_relative_difference"] == pytest.approx(
        {"seed 17": -0.015, "seed 43": 0.012, "seed 44": (6.12 * 0.98 - 5.94) / 5.94})
    means = (6.0 + 6.12 + 5.94) / 3, (5.91 + 6.12 * 1.012 + 6.12 * 0.98) / 3
    assert written["seed_mean_final_eval_loss"] == pytest.approx({"amp_bf16": means[0], "amp_fp8": means[1]})
    assert written["seed_mean_relative_difference"] == pytest.approx(abs(means[1] - means[0]) / means[0])
    assert (six / "fp8_quality.png").exists()
