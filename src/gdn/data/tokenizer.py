"""``TextTokenizer``: text ↔ token ids, over a ``tokenizers.Tokenizer``.

Two vocabularies are built here, both byte-level (every UTF-8 text round-trips exactly):

- ``byte_tokenizer()``: id = byte value (0–255), then the specials <|bos|> 256, <|eos|> 257,
  <|pad|> 258, <|unk|> 259 — the ids of ``gdn.models.hf`` and of the ``*-tiny`` presets
  (vocab 260).
- ``train_bpe(texts, vocab_size)``: byte-level BPE learned from ``texts``. Its first 260 ids
  are the byte tokenizer's (bytes, then the same 4 specials); merged tokens follow from 260.

The special tokens are never produced from text: a document that contains the characters
"<|eos|>" is encoded as those bytes, so no document can end itself early.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["SPECIAL_TOKENS", "TextTokenizer", "byte_tokenizer", "load_tokenizer", "train_bpe"]

# In id order from 256: the same strings and ids as gdn.models.hf (which needs transformers,
# so it is not imported here).
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>")
N_BYTES = 256
# End-of-document names tried, in order, for a tokenizer.json made elsewhere.
_EOS_CANDIDATES = ("<|eos|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]")


def _byte_symbols() -> list[str]:
    """The printable character that stands for each byte (index = byte value), as the
    ByteLevel pre-tokenizer writes them: bytes that are visible Latin-1 characters stand for
    themselves; the other 68 (controls, space, soft hyphen, …) take 256, 257, … in byte
    order. A BPE vocabulary is a map from such strings to ids."""
    visible = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, next_free = [], N_BYTES
    for byte in range(N_BYTES):
        if byte in visible:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(next_free))
            next_free += 1
    return symbols


def _assemble(vocab: dict[str, int], merges: list[tuple[str, str]], *,
              split_words: bool) -> Tokenizer:
    """A byte-level BPE ``Tokenizer`` from a vocabulary and merge list (ranked by order).
    ``split_words``: pre-split on GPT-2's word pattern (letters, digits, punctuation, spaces)
    so no merge crosses a word; the byte tokenizer has no merges and skips it."""
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                       use_regex=split_words)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


class TextTokenizer:
    """Encode text to ids and back.

    ``encode(text) -> list[int]``, ``encode_batch(texts) -> list[list[int]]`` (threads inside
    the tokenizers library), ``decode(ids) -> str``; ``vocab_size`` (incl. special tokens),
    ``eos_id`` (appended after every document by ``prepare_dataset``), ``name`` (a short
    description, stored in a dataset's meta.json), ``id_to_token(i)``, ``save(path)`` (a
    tokenizer.json).
    """

    def __init__(self, tokenizer: Tokenizer, *, name: str, eos_token: str | None = None) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got "
                            f"{type(tokenizer).__name__}")
        candidates = (eos_token,) if eos_token is not None else _EOS_CANDIDATES
        eos_id = next((tokenizer.token_to_id(t) for t in candidates
                       if tokenizer.token_to_id(t) is not None), None)
        if eos_id is None:
            raise ValueError(f"eos_token: the tokenizer has none of {list(candidates)}")
        # Text that spells a special token stays text (see the module docstring).
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.name = name
        self.eos_id = int(eos_id)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"texts must hold str, got a {type(bad).__name__}")
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of ``token_id`` (byte-level symbols, e.g. "Ġthe"), or None."""
        return self._tokenizer.id_to_token(int(token_id))

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one tokenizer.json file at ``path``."""
        self._tokenizer.save(str(path))

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def byte_tokenizer() -> TextTokenizer:
    """Bytes 0–255 as ids 0–255, specials 256–259 (vocab 260): the ``*-tiny`` presets'."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    vocab.update({token: N_BYTES + i for i, token in enumerate(SPECIAL_TOKENS)})
    return TextTokenizer(_assemble(vocab, [], split_words=False), name="bytes")


def load_tokenizer(path: str | os.PathLike, *, eos_token: str | None = None,
                   name: str | None = None) -> TextTokenizer:
    """A ``TextTokenizer`` from a tokenizer.json file (or a directory holding one).
    ``eos_token``: the end-of-document token; by default the first of <|eos|>, <|endoftext|>,
    </s>, <eos>, [SEP] that the vocabulary has. ``name``: its description (default: the
    file's path)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: no tokenizer.json at {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"tokenizer: {path} is not a tokenizer.json ({message})") from None
    return TextTokenizer(tokenizer, name=name or f"tokenizer.json ({path})", eos_token=eos_token)


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Learn a byte-level BPE vocabulary of ``vocab_size`` ids (≥ 260) from ``texts``.

    The trainer sees the 256 byte symbols as its alphabet and no special tokens; the result is
    then renumbered so that bytes are ids 0–255 and the specials 256–259, as in
    ``byte_tokenizer()``, with the merged tokens after them in the order they were learned.
    Fewer than ``vocab_size`` ids come out when the texts have fewer distinct pairs to merge.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or vocab_size < N_BYTES + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int ≥ {N_BYTES + len(SPECIAL_TOKENS)}, "
                         f"got {vocab_size!r}")
    symbols = _byte_symbols()
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS),
                                  initial_alphabet=symbols, show_progress=False)
    learner.train_from_iterator(texts, trainer=trainer)

    learned = json.loads(learner.to_str())["model"]
    # Merges are ["a", "b"] pairs (or "a b" strings in older files).
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
              for m in learned["merges"]]
    vocab = {symbol: byte for byte, symbol in enumerate(symbols)}
    vocab.update({token: N_BYTES + i for i, token in enumerate(SPECIAL_TOKENS)})
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    name = f"bpe-{len(vocab)}"
    return TextTokenizer(_assemble(vocab, merges, split_words=True), name=name)
