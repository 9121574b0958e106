"""gdn.data: text → token shards on disk → packed training batches.

    path = builtin_dataset()                          # Python's help texts, byte-tokenised
    path = prepare_dataset(["corpus/"], "/tmp/mine", train_bpe_vocab=4096)
    batches = PackedBatches(TokenDataset(path, "train"), seq_len=256, rows=8, seed=0)
    batch = next(batches)       # input_ids [1, 8·256], cu_seqlens int32, n_targets

Files: tokenizer.py (TextTokenizer, byte/BPE), sources.py (txt/jsonl/parquet), builtin.py
(the built-in corpus), shards.py (the on-disk format, writer and reader), prepare.py (files →
dataset), packing.py (dataset → batches), command.py (`gdn data prepare`).
"""

# Exports load on first use (PEP 562): `gdn check` builds the whole CLI, and the training
# stack's optional packages (tokenizers, tqdm, tensorboard) must not be needed for it.
_EXPORTS = {
    "Batch": "gdn.data.packing",
    "DatasetWriter": "gdn.data.shards",
    "PackedBatches": "gdn.data.packing",
    "TextTokenizer": "gdn.data.tokenizer",
    "TokenDataset": "gdn.data.shards",
    "builtin_dataset": "gdn.data.prepare",
    "builtin_documents": "gdn.data.builtin",
    "byte_tokenizer": "gdn.data.tokenizer",
    "default_cache_root": "gdn.data.prepare",
    "load_tokenizer": "gdn.data.tokenizer",
    "prepare_dataset": "gdn.data.prepare",
    "read_documents": "gdn.data.sources",
    "train_bpe": "gdn.data.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
