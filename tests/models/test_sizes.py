"""Preset sizes: within 10% of the paper's 0.4B / 1.3B, and the README table says the same."""

import re
from pathlib import Path

import pytest
import torch

from gdn.models import CausalLM, ModelConfig, preset_names

README = Path(__file__).resolve().parents[2] / "README.md"
FULL_SIZE = [name for name in preset_names() if not name.endswith("-tiny")]


def on_meta(name):
    """The preset's model with no memory behind it (parameters on the meta device)."""
    config = ModelConfig.from_preset(name)
    with torch.device("meta"):
        return config, CausalLM(config)


@pytest.mark.parametrize("name", FULL_SIZE)
def test_parameter_count_within_10_percent_of_the_paper(name):
    _, model = on_meta(name)
    nominal = {"0.4b": 0.4e9, "1.3b": 1.3e9}[name.rsplit("-", 1)[1]]
    assert abs(model.num_parameters() / nominal - 1) <= 0.10


@pytest.mark.parametrize("name", [n for n in preset_names() if n.endswith("-tiny")])
def test_tiny_presets_have_a_few_million_parameters(name):
    _, model = on_meta(name)
    assert 1e6 <= model.num_parameters() <= 10e6


def readme_rows():
    text = README.read_text()
    section = text[text.index("## Models"):text.index("## Tests")]
    return {row[0]: row for row in (
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in section.splitlines() if re.match(r"\| *[a-z0-9]+-\d", line))}


def test_readme_table_matches_the_code():
    rows = readme_rows()
    assert sorted(rows) == sorted(FULL_SIZE)
    for name in FULL_SIZE:
        config, model = on_meta(name)
        expected = [name, config.pattern, f"{config.n_layers} × {config.d_model}",
                    f"{model.num_parameters() / 1e6:.1f}",
                    f"{model.num_parameters(include_embeddings=False) / 1e6:.1f}"]
        assert rows[name] == expected, f"README row for {name} is stale"
