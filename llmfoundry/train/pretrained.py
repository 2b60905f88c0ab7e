"""``load_path: <a Hugging Face MPT folder>``: a run that starts from pretrained weights (finetuning, continued
pretraining).

The folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, as ``save_pretrained`` and
``scripts/convert_composer_to_hf.py`` write it) is converted once per node into a weights-only composer checkpoint
in the local temp folder, which composer then loads like any ``load_path`` with ``load_weights_only`` (so FSDP,
meta-device init and every precision work as for composer's own checkpoints); the copy is removed once loaded. Before that, the YAML's ``model:``
is compared with the folder's ``config.json``: every setting that would compute differently from the pretrained
model (ALiBi, biases, position table, norms, shapes...) is listed in one error, so that pretrained weights are
never run as another architecture. The run's log names the weights it starts from. With ``autoresume`` and a
checkpoint already in the save folder, the run continues from that checkpoint instead, as for any ``load_path``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile

from llmfoundry.checkpoint import convert_hf_to_composer, hf_config, is_hf_dir
from llmfoundry.utils.config import ConfigError, to_dict

log = logging.getLogger(__name__)

# settings that leave the computation unchanged: training knobs, where and how attention runs, initialization
_FREE = {"attn_config.attn_impl", "attn_config.attn_pdrop", "attn_config.attn_uses_sequence_id", "resid_pdrop",
         "emb_pdrop", "init_device", "max_seq_len", "use_cache"}
_FREE_PREFIXES = ("init_config.",)


def is_pretrained_start(load_path: str | None) -> bool:
    return bool(load_path) and is_hf_dir(os.path.expanduser(load_path))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def architecture_differences(model_cfg, pretrained_cfg) -> list[str]:
    """Each setting where the run's model would compute differently from the pretrained one, as
    ``model.KEY: the YAML says A, config.json says B``. ``max_seq_len`` may differ (ALiBi extends; a position table
    of another length is caught by the shape check)."""
    mine, theirs = _flat(to_dict(model_cfg)), _flat(to_dict(pretrained_cfg))
    out = []
    for key in sorted(set(mine) | set(theirs)):
        if key in _FREE or key.startswith(_FREE_PREFIXES):
            continue
        a, b = mine.get(key), theirs.get(key)
        if a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            out.append(f"model.{key}: the YAML says {a!r}, config.json says {b!r}")
    return out


def _init_file(hf_dir: str, run_name: str | None) -> str:
    """Where this node keeps the converted weights: the temp folder, named after the folder and its weights'
    sizes and times (a changed folder is converted again)."""
    stamp = []
    for name in sorted(os.listdir(hf_dir)):
        st = os.stat(os.path.join(hf_dir, name))
        stamp.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    key = hashlib.sha1("|".join([os.path.realpath(hf_dir), *stamp]).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"mpt-forge-pretrained-{run_name or 'run'}-{key}.pt")


def is_init_file(path: str | None) -> bool:
    return bool(path) and os.path.basename(path).startswith("mpt-forge-pretrained-") and \
        os.path.dirname(os.path.abspath(path)) == os.path.abspath(tempfile.gettempdir())


def remove(path: str) -> None:
    """Once every rank has loaded it, the converted copy goes (as large as the model's weights; a relaunch before
    the first checkpoint converts the folder again)."""
    from composer.utils import dist
    if dist.get_world_size() > 1:
        dist.barrier()
    if dist.get_local_rank() == 0:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def prepare(model_cfg, load_path: str, run_name: str | None) -> str:
    """Check the YAML's model against the pretrained folder ``load_path`` and return the composer checkpoint to
    load with ``load_weights_only`` (written by local rank 0 of each node; the others wait)."""
    from composer.utils import dist

    hf_dir = os.path.expanduser(load_path)
    problems = architecture_differences(model_cfg, hf_config(hf_dir))
    if problems:
        raise ConfigError(
            f"load_path {hf_dir} holds a pretrained model of another architecture than the YAML's model: "
            f"{'; '.join(problems)}. Set these model: keys as config.json has them (the weights only mean "
            f"something in the architecture they were trained in)")
    path = _init_file(hf_dir, run_name)
    if dist.get_local_rank() == 0 and not os.path.isfile(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        convert_hf_to_composer(hf_dir, tmp, model_config=model_cfg, overwrite=True)
        os.replace(tmp, path)
    if dist.get_world_size() > 1:
        dist.barrier()
    log.info("starting from the pretrained weights in %s (Hugging Face MPT folder; converted for loading to %s)",
             hf_dir, path)
    return path
