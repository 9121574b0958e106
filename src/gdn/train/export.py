"""The end-of-run export: the trained model in the Hugging Face layout (safetensors).

``OUT/hf`` then loads with ``AutoModelForCausalLM.from_pretrained`` once ``gdn.models.hf``
is imported (it registers the ``gdn`` model type), and with lm-eval's ``hf`` model type. The
tokenizer goes beside it: the byte tokenizer in transformers' format for a byte-level
dataset, else the dataset's tokenizer.json. Needs the ``hf`` extra (transformers); without
it the export is skipped with one line saying so.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from gdn.data import TokenDataset
from gdn.train.distributed import Runtime, barrier, unwrap

__all__ = ["export_hf"]


def export_hf(model: nn.Module, *, runtime: Runtime, out: Path, data_path: Path,
              note: Callable[[str], None] = print) -> Path | None:
    """Write ``out`` (config.json, model.safetensors, tokenizer) from rank 0; every rank
    calls it (FSDP2 gathers the full weights collectively). Returns ``out``, or None when
    transformers is missing."""
    try:
        from gdn.models.hf import GDNConfig, GDNForCausalLM, save_byte_tokenizer
    except ImportError as error:
        note(f"export skipped: the Hugging Face export needs the hf extra "
             f"(pip install -e '.[hf]'): {error}")
        return None
    # Full (unsharded) float32 weights on the CPU, without wrapper prefixes.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if runtime.is_main:
        config = unwrap(model).config
        hf_model = GDNForCausalLM(GDNConfig.from_model_config(config))
        hf_model.model.load_state_dict(state)
        hf_model.save_pretrained(out)
        tokenizer = Path(data_path) / "tokenizer.json"
        if TokenDataset(data_path, "train").meta.get("tokenizer") == "bytes":
            save_byte_tokenizer(out)
        elif tokenizer.is_file():
            shutil.copyfile(tokenizer, out / "tokenizer.json")
        note(f"exported {out} (Hugging Face layout, safetensors)")
    barrier()
    return out
