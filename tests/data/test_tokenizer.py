"""TextTokenizer: byte ids as gdn.models.hf has them, exact round trips, BPE, save/load."""

from __future__ import annotations

import pytest

from gdn.data import builtin_documents, byte_tokenizer, load_tokenizer, train_bpe

TEXTS = ["", "plain ASCII\n", "héllo wörld — ½ € ✓ 日本語 🙂", "\x00\x01\t\r\n  two  spaces",
         "spells <|eos|> and <|bos|> as text", "ÿ\u00ad\u00a0 Latin-1 edge bytes"]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(builtin_documents(), 1024)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_ids_are_the_utf8_bytes(text):
    tok = byte_tokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # special-token spellings stay bytes too
    assert tok.decode(ids) == text


def test_byte_specials_match_the_models():
    tok = byte_tokenizer()
    assert tok.vocab_size == 260 and tok.eos_id == 257 and tok.name == "bytes"
    assert [tok.decode([i]) for i in range(256, 260)] == ["<|bos|>", "<|eos|>", "<|pad|>",
                                                          "<|unk|>"]


def test_byte_ids_equal_the_hf_tokenizer():
    hf = pytest.importorskip("gdn.models.hf")  # needs transformers (the hf extra)
    theirs = hf.byte_tokenizer()
    assert (hf.BOS_ID, hf.EOS_ID, hf.PAD_ID) == (256, 257, 258)
    for text in TEXTS:
        if "<|" not in text:  # transformers turns special spellings in text into specials
            assert byte_tokenizer().encode(text) == theirs.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_round_trips(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_is_shorter_than_bytes_and_keeps_the_first_260_ids(bpe):
    text = "".join(builtin_documents()[:10])
    assert len(bpe.encode(text)) < 0.5 * len(text.encode("utf-8"))
    assert bpe.vocab_size == 1024 and bpe.eos_id == 257 and bpe.name == "bpe-1024"
    byte = byte_tokenizer()
    assert [bpe.id_to_token(i) for i in range(260)] == [byte.id_to_token(i) for i in range(260)]
    assert bpe.id_to_token(260) is not None and byte.id_to_token(260) is None


def test_save_and_load_give_the_same_ids(bpe, tmp_path):
    bpe.save(tmp_path / "tokenizer.json")
    for loaded in (load_tokenizer(tmp_path / "tokenizer.json"), load_tokenizer(tmp_path)):
        assert loaded.vocab_size == bpe.vocab_size and loaded.eos_id == bpe.eos_id
        assert loaded.encode(TEXTS[2] + TEXTS[4]) == bpe.encode(TEXTS[2] + TEXTS[4])


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_tokenizer(tmp_path / "nothing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="junk.json"):
        load_tokenizer(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="eos_token"):
        byte_tokenizer().save(tmp_path / "t.json")
        load_tokenizer(tmp_path / "t.json", eos_token="<|nope|>")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], 259)
    with pytest.raises(TypeError, match="text"):
        byte_tokenizer().encode(b"bytes")
