"""gdn.train: the training loop, its config, optimizer, checkpoints and distributed runtime.

    from gdn.train import TrainConfig, train
    result = train(TrainConfig(max_steps=100, seq_len=256))   # gdn-tiny, built-in corpus
    result.losses, result.eval_loss, result.run_dir

Files: config.py (TrainConfig), command.py (`gdn train`), loop.py (train), optim.py (AdamW
groups), schedule.py (lr), guard.py (non-finite steps), metrics.py / progress.py (logging,
MFU, plot), resume.py (loop state in checkpoints), export.py (Hugging Face export),
checkpoint.py (crash-safe checkpoints), distributed.py (torchrun, DDP / FSDP2).
"""

# Exports load on first use (PEP 562): `gdn check` builds the whole CLI, and the training
# stack's optional packages (tokenizers, tqdm, tensorboard) must not be needed for it.
_EXPORTS = {
    "TrainConfig": "gdn.train.config",
    "TrainResult": "gdn.train.loop",
    "TrainingDiverged": "gdn.train.guard",
    "build_optimizer": "gdn.train.optim",
    "load_toml": "gdn.train.config",
    "lr_at": "gdn.train.schedule",
    "parameter_groups": "gdn.train.optim",
    "train": "gdn.train.loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
