"""TrainConfig: validation (one-line errors naming the field), dict and TOML round trips."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from gdn.train.config import TrainConfig, load_toml

BAD_VALUES = [
    ("seq_len", 1, ValueError),
    ("seq_len", 2.5, TypeError),
    ("batch_size", 0, ValueError),
    ("grad_accum", True, TypeError),
    ("max_steps", -3, ValueError),
    ("lr", 0.0, ValueError),
    ("lr", float("nan"), ValueError),
    ("lr", "fast", TypeError),
    ("min_lr_ratio", 1.5, ValueError),
    ("warmup_steps", -1, ValueError),
    ("weight_decay", -0.1, ValueError),
    ("beta1", 1.0, ValueError),
    ("beta2", -0.5, ValueError),
    ("grad_clip", -1.0, ValueError),
    ("max_bad_steps", 0, ValueError),
    ("seed", -1, ValueError),
    ("stop_at", 121, ValueError),
    ("eval_every", -1, ValueError),
    ("eval_batches", 0, ValueError),
    ("save_every", -5, ValueError),
    ("keep_last", 0, ValueError),
    ("log_every", 0, ValueError),
    ("dtype", "float16", ValueError),
    ("device", "tpu", ValueError),
    ("device", "cuda:x", ValueError),
    ("preset", "gdn-huge", ValueError),
    ("model", {"d_model": -8}, ValueError),
    ("model", {"not_a_field": 1}, ValueError),
    ("model", ["backend=torch"], TypeError),
    ("data", "", TypeError),
    ("out", 3, TypeError),
    ("resume", 1, TypeError),
    ("compile", "yes", TypeError),
    ("peak_flops", 0.0, ValueError),
]


@pytest.mark.parametrize(("name", "value", "error"), BAD_VALUES,
                         ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES])
def test_bad_value_is_a_one_line_error_naming_the_field(name, value, error):
    with pytest.raises(error) as caught:
        TrainConfig(**{name: value})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(name), message


def test_defaults_are_valid_and_round_trip_through_a_dict():
    config = TrainConfig(model={"backend": "torch"}, out="runs/x")
    values = config.to_dict()
    assert set(values) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert TrainConfig.from_dict(values) == config
    assert values["model"] is not config.model  # a copy, not the config's own dict


def test_unknown_field_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown TrainConfig field 'sequence_length'.*seq_len"):
        TrainConfig.from_dict({"sequence_length": 128})


def test_numbers_are_normalised():
    config = TrainConfig(lr=1, peak_flops=10**15, data=__import__("pathlib").Path("/x"))
    assert isinstance(config.lr, float) and isinstance(config.peak_flops, float)
    assert config.data == "/x"


def test_model_config_grows_the_vocab_to_the_dataset():
    config = TrainConfig(model={"d_model": 96})
    assert config.model_config().vocab_size == 260
    grown = config.model_config(min_vocab_size=1024)
    assert (grown.vocab_size, grown.d_model) == (1024, 96)
    with pytest.raises(ValueError, match="vocab_size=300 is smaller"):
        TrainConfig(model={"vocab_size": 300}).model_config(min_vocab_size=1024)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib needs Python 3.11")
def test_toml_fills_the_dataclass(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('max_steps = 40\nlr = 1e-3\nout = "runs/t"\nresume = true\n'
                    '[model]\nbackend = "torch"\nn_layers = 2\n')
    assert load_toml(path)["model"] == {"backend": "torch", "n_layers": 2}
    config = TrainConfig.from_toml(path, seq_len=64)
    assert (config.max_steps, config.lr, config.out, config.resume, config.seq_len) == \
        (40, 1e-3, "runs/t", True, 64)
    assert config.model == {"backend": "torch", "n_layers": 2}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib needs Python 3.11")
def test_toml_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("max_steps = = 3\n")
    with pytest.raises(ValueError, match="not valid TOML") as caught:
        load_toml(broken)
    assert "\n" not in str(caught.value)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('max_steps = "many"\n')
    with pytest.raises(TypeError, match="^max_steps must be an int"):
        TrainConfig.from_toml(wrong)
