"""``precision: amp_fp8``: FP8 training of the transformer blocks' linear layers through torchao.

What changes against ``amp_bf16``
---------------------------------
Only the ``nn.Linear`` layers inside the transformer blocks (``transformer.blocks.{i}.attn.Wqkv``,
``attn.out_proj``, ``ffn.up_proj``, ``ffn.down_proj``) become torchao ``Float8Linear`` layers
(``torchao.float8.convert_to_float8_training``): their matrix products read FP8 inputs and weights (e4m3; the
gradients of the outputs in e5m2) scaled per tensor (``fp8.recipe: tensorwise``) or per row (``rowwise``). A layer
whose dimensions are not multiples of 16 (the FP8 matrix product needs them) stays as it is. The token embedding,
the output head, the norms, attention itself and our kernels (attention, GELU, the fused loss) are untouched,
and so are the master weights (fp32), the optimizer state and composer's bf16 autocast: composer runs with
``amp_bf16`` (``composer_precision``) and the FP8 layers cast inside it.

With FSDP2 over more than one rank and the tensorwise recipe the sharded weights are all-gathered in FP8
(``fp8.fsdp_float8_all_gather``: torchao's ``enable_fsdp_float8_all_gather``; half the traffic of bf16), and
``PrecomputeFloat8Scales`` computes the next step's weight scales once after each optimizer step
(``precompute_float8_dynamic_scale_for_fsdp``: one all-reduce for all layers instead of one per layer). On one GPU
it is off by default: nothing is gathered there, and the FP8 layer's own cast, compiled, costs less.
``torch.compile`` (``compile_config``) fuses torchao's scaling and casts into few kernels: FP8 is only faster
compiled.

Checkpoints are ordinary: ``Float8Linear`` keeps ``weight`` (and ``bias``) as parameters of the same name and
shape, and its state_dict gives plain tensors (``_plain_weight`` unwraps torchao's FSDP weight wrapper), so a
checkpoint of an FP8 run resumes with ``precision: amp_fp8`` or ``amp_bf16``, exports to Hugging Face and evaluates
like any other.

Before training, ``check_fp8`` refuses in one message each: the CPU, a GPU without FP8 tensor cores (compute
capability below 8.9, e.g. A100: the fix is ``precision: amp_bf16``), torchao missing (``pip install
'mpt-forge[fp8]'``) or a torchao release that does not work with this torch, and a recipe / all-gather setting
that this torchao or FSDP setup cannot do.

torchao and torch: the ``fp8`` extra allows torchao 0.11 to 0.18. Use the line built for your torch: torch 2.7
(composer 0.32.1's pin, the lock): torchao 0.11 or 0.12 (``rowwise`` needs 0.13, whose float8 code runs on torch
2.7 but whose compiled extensions target 2.8); torch 2.11: torchao 0.18.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from llmfoundry.utils.config import ConfigError

log = logging.getLogger(__name__)

RECIPES = ("tensorwise", "rowwise")
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (L4, L40S, RTX 4090) and Hopper (H100, H200) and newer
FP8_GPUS = "compute capability 8.9 or newer: H100, H200, L4, L40S"
INSTALL = "pip install 'mpt-forge[fp8]'"
# the torchao release line built for each torch (for messages; the fp8 extra allows 0.11 to 0.18)
TORCHAO_FOR_TORCH = {"2.7": "torchao>=0.11,<0.13", "2.11": "torchao>=0.18,<0.19"}
ROWWISE_MIN_TORCHAO = (0, 13)  # 0.11/0.12 refuse row-wise scaled products under autocast

_BLOCK_LINEAR = re.compile(r"(^|\.)blocks\.\d+\.")  # transformer.blocks.{i}.<...>
_MPT_INIT_ATTRS = ("_fused", "_is_residual")  # read by models/mpt/init.py when FSDP materializes meta weights


def composer_precision(precision: str) -> str:
    """The precision composer's Trainer gets: ``amp_bf16`` for ``amp_fp8`` (torchao's layers cast to FP8 inside
    bf16 autocast; composer's own ``amp_fp8`` would need Transformer Engine), anything else unchanged."""
    return "amp_bf16" if precision == "amp_fp8" else precision


def _version(text: str) -> tuple[int, int]:
    major, minor = (re.findall(r"\d+", text) + ["0", "0"])[:2]
    return int(major), int(minor)


def _torchao_line_hint() -> str:
    lines = "; ".join(f"torch {t}: pip install '{ao}'" for t, ao in TORCHAO_FOR_TORCH.items())
    return f"install the torchao line built for this torch ({lines})"


def current_gpu() -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of this rank's GPU (``LOCAL_RANK``)."""
    index = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def check_hardware(device: str, gpu: tuple[str, tuple[int, int]] | None = None) -> None:
    """A ``ConfigError`` unless this run's device has FP8 tensor cores. ``gpu``: (name, capability), default the
    rank's GPU (given by tests)."""
    if device != "gpu":
        raise ConfigError(f"precision: amp_fp8 needs an NVIDIA GPU with FP8 tensor cores ({FP8_GPUS}); this run is "
                          "on the CPU. Fix: precision: amp_bf16 on such a GPU (on the CPU: precision: fp32 or auto)")
    name, capability = gpu or current_gpu()
    if tuple(capability) < MIN_CAPABILITY:
        raise ConfigError(f"precision: amp_fp8 needs FP8 tensor cores ({FP8_GPUS}); {name} has compute capability "
                          f"{capability[0]}.{capability[1]}. Fix: precision: amp_bf16")


def check_torchao(recipe: str = "tensorwise") -> str:
    """torchao's version when its float8 training imports and can run ``recipe`` with this torch, else a
    ``ConfigError`` naming the fix. Known-bad pairs are refused before the import: torchao 0.11/0.12 load
    extensions built for torch 2.7, which can abort the process on torch 2.9 and newer."""
    from importlib import metadata
    try:
        version = metadata.version("torchao")
    except metadata.PackageNotFoundError:
        raise ConfigError(f"precision: amp_fp8 trains through torchao's float8 layers, and torchao is not installed. "
                          f"Fix: {INSTALL} (or precision: amp_bf16)") from None
    torch_version = torch.__version__.split("+")[0]
    if _version(version) < (0, 13) and _version(torch_version) >= (2, 9):
        raise ConfigError(f"torchao {version} is built for torch 2.7 and can crash torch {torch_version}. Fix: "
                          f"{_torchao_line_hint()}")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: F401
    except Exception as e:  # an ImportError, or an extension that does not load
        raise ConfigError(f"torchao {version} does not work with torch {torch_version} ({type(e).__name__}: {e}). "
                          f"Fix: {_torchao_line_hint()}, or precision: amp_bf16") from None
    if recipe == "rowwise" and _version(version) < ROWWISE_MIN_TORCHAO:
        raise ConfigError(f"fp8.recipe: rowwise needs torchao 0.13 or newer (torchao {version} refuses row-wise "
                          "scaled matrix products under autocast). Fix: fp8.recipe: tensorwise, or pip install "
                          "'torchao>=0.13,<0.19' (0.18 for torch 2.11)")
    return version


def fsdp_float8_all_gather(fp8_cfg, fsdp_cfg, world_size: int | None = None) -> bool:
    """Whether FSDP all-gathers the FP8 layers' weights in FP8: ``fp8.fsdp_float8_all_gather`` when set, else on
    exactly when it can be and pays: recipe ``tensorwise`` under FSDP2 with more than one rank (``world_size``,
    default the launcher's ``WORLD_SIZE``). On one rank nothing travels, and torchao's cast of each weight shard to
    FP8 before every gather runs eagerly, outside the compiled graph, where the compiled FP8 layer would fuse it.
    ``fp8_cfg``: ``Fp8Config``; ``fsdp_cfg``: ``FSDPConfig`` or None. A ``ConfigError`` when it is asked for where
    torchao cannot do it."""
    fsdp2 = fsdp_cfg is not None and fsdp_cfg.version == 2
    wanted = fp8_cfg.fsdp_float8_all_gather
    if wanted is None:
        ranks = dist.get_world_size() if world_size is None else world_size
        return fp8_cfg.recipe == "tensorwise" and fsdp2 and ranks > 1
    if wanted and fp8_cfg.recipe != "tensorwise":
        raise ConfigError(f"fp8.fsdp_float8_all_gather: true needs fp8.recipe: tensorwise (torchao gathers FP8 "
                          f"weights with one scale per tensor only; this run has {fp8_cfg.recipe}). Fix: "
                          "fp8.fsdp_float8_all_gather: false (or null)")
    if wanted and not fsdp2:
        where = "fsdp: null" if fsdp_cfg is None else f"fsdp.version: {fsdp_cfg.version}"
        raise ConfigError(f"fp8.fsdp_float8_all_gather: true needs FSDP2 (fsdp.version: 2); this run has {where}. "
                          "Fix: fsdp.version: 2, or fp8.fsdp_float8_all_gather: false (or null)")
    return bool(wanted)


def check_fp8(device: str, fp8_cfg, fsdp_cfg=None, gpu: tuple[str, tuple[int, int]] | None = None) -> str:
    """Everything ``precision: amp_fp8`` needs, checked before any work: an FP8 GPU, a torchao that works with this
    torch and recipe, an all-gather setting FSDP can do. Returns torchao's version; raises one ``ConfigError``."""
    check_hardware(device, gpu)
    version = check_torchao(fp8_cfg.recipe)
    fsdp_float8_all_gather(fp8_cfg, fsdp_cfg)
    return version


def is_block_linear(fqn: str, module: nn.Module) -> bool:
    """A plain ``nn.Linear`` inside a transformer block (``...blocks.{i}...``) whose dimensions are multiples of 16:
    the layers ``apply_fp8`` converts. The embedding and the output head (not in a block) never are."""
    return (type(module) is nn.Linear and bool(_BLOCK_LINEAR.search(fqn))
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def _plain_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook of a converted layer: its ``weight`` as a plain tensor (or a DTensor of plain shards)
    instead of torchao's FSDP weight wrapper, so that checkpoints load without torchao. Parameters
    (``keep_vars=True``) are left as they are."""
    key = prefix + "weight"
    value = state_dict.get(key)
    if value is None or isinstance(value, nn.Parameter):
        return
    from torch.distributed.tensor import DTensor
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor as Wrapped
    if isinstance(value, Wrapped):
        state_dict[key] = value._tensor
    elif isinstance(value, DTensor) and isinstance(value._local_tensor, Wrapped):
        state_dict[key] = DTensor.from_local(value._local_tensor._tensor, value.device_mesh, value.placements,
                                             run_check=False, shape=value.shape, stride=value.stride())


def float8_config(recipe: str = "tensorwise", fsdp_float8_all_gather: bool = False, emulate: bool = False):
    """torchao's ``Float8LinearConfig`` for ``recipe`` (``from_recipe_name``), with FSDP float8 all-gather
    (tensorwise only) and ``emulate`` (FP8 products emulated in higher precision: CPU tests) as asked."""
    from torchao.float8 import Float8LinearConfig
    if recipe not in RECIPES:
        raise ConfigError(f"fp8.recipe = {recipe!r} must be one of {list(RECIPES)}")
    config = Float8LinearConfig.from_recipe_name(recipe)
    changes = {k: True for k, on in (("enable_fsdp_float8_all_gather", fsdp_float8_all_gather),
                                     ("emulate", emulate)) if on}
    return dataclasses.replace(config, **changes) if changes else config


def apply_fp8(model: nn.Module, recipe: str = "tensorwise", *, fsdp_float8_all_gather: bool = False,
              emulate: bool = False) -> int:
    """Convert the transformer blocks' linear layers of ``model`` (an ``MPTForCausalLM``; ``is_block_linear``) to
    torchao ``Float8Linear`` in place; returns how many. Call it on the built model before the optimizer is
    created and before FSDP wraps it (the all-gather wrapper makes new weight parameters); meta weights are
    fine (MPT's init attributes are carried over for FSDP's materialization). Linear layers of a block whose
    dimensions are not multiples of 16 stay in bf16 (logged)."""
    from torchao.float8 import convert_to_float8_training
    config = float8_config(recipe, fsdp_float8_all_gather, emulate)
    chosen = {fqn: {a: getattr(m, a) for a in _MPT_INIT_ATTRS if hasattr(m, a)}
              for fqn, m in model.named_modules() if is_block_linear(fqn, m)}
    odd = [fqn for fqn, m in model.named_modules()
           if type(m) is nn.Linear and _BLOCK_LINEAR.search(fqn) and fqn not in chosen]
    if odd:
        log.warning("precision amp_fp8: %d linear layers kept in bf16 (dimensions not multiples of 16): %s",
                    len(odd), ", ".join(odd[:8]) + (" ..." if len(odd) > 8 else ""))
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn in chosen)
    for fqn, attrs in chosen.items():
        layer = model.get_submodule(fqn)
        for name, value in attrs.items():
            setattr(layer, name, value)
        layer.register_state_dict_post_hook(_plain_weight)
    return len(chosen)


class PrecomputeFloat8Scales(Callback):
    """After each optimizer step (``Event.BATCH_END``, before the next forward and before evaluation), torchao's
    ``precompute_float8_dynamic_scale_for_fsdp``: the FP8 scales of all FSDP2 float8-all-gathered weights in one
    all-reduce, instead of one amax reduction per weight inside each all-gather."""

    def batch_end(self, state: State, logger: Logger) -> None:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp
        precompute_float8_dynamic_scale_for_fsdp(state.model)


def prepare(network: nn.Module, cfg) -> list[Callback]:
    """``precision: amp_fp8`` applied to the built network (``ComposerMPT.model``) of run config ``cfg``
    (``TrainConfig``, already through ``check_fp8``): the block linears converted, and the callbacks the run needs
    (``PrecomputeFloat8Scales`` with FSDP float8 all-gather, else none)."""
    all_gather = fsdp_float8_all_gather(cfg.fp8, cfg.fsdp)
    if not any(is_block_linear(fqn, m) for fqn, m in network.named_modules()):
        m = cfg.model
        raise ConfigError(f"precision: amp_fp8 found no linear layer in the transformer blocks with dimensions that "
                          f"are multiples of 16 (d_model={m.d_model}, expansion_ratio={m.expansion_ratio}): FP8 "
                          "would change nothing. Fix: precision: amp_bf16, or d_model and the FFN width multiples of "
                          "16")
    n = apply_fp8(network, cfg.fp8.recipe, fsdp_float8_all_gather=all_gather)
    gather_state = "on" if all_gather else "off"
    if not all_gather and fsdp_float8_all_gather(cfg.fp8, cfg.fsdp, world_size=2):  # off for being on one rank
        gather_state = "off: one GPU gathers nothing (fp8.fsdp_float8_all_gather: true forces it)"
    from importlib import metadata
    log.info("precision amp_fp8: %d linear layers of the transformer blocks train in FP8 (torchao %s, recipe %s, "
             "FSDP float8 all-gather %s); embeddings, output head and norms in bf16 (composer precision amp_bf16; "
             "MFU is against the bf16 peak)", n, metadata.version("torchao"), cfg.fp8.recipe,
             gather_state)
    return [PrecomputeFloat8Scales()] if all_gather else []
