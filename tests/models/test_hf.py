"""Hugging Face glue: save → load is bit-exact, Auto classes load it, .generate() and lm-eval
run on it — all offline, from a temporary directory."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from gdn.models import ModelConfig, generate  # noqa: E402
from gdn.models.hf import (  # noqa: E402
    GDNConfig,
    GDNForCausalLM,
    byte_tokenizer,
    save_byte_tokenizer,
)


def hf_model(family="h2", **overrides):
    torch.manual_seed(0)
    config = ModelConfig.from_preset(f"{family}-tiny", d_model=64, gdn_num_heads=2,
                                     attn_num_heads=2, window=4, **overrides)
    return GDNForCausalLM(GDNConfig.from_model_config(config)).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_is_bit_exact(tmp_path, tie):
    model = hf_model(tie_embeddings=tie)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GDNForCausalLM)
    assert loaded.config.to_model_config() == model.config.to_model_config()
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    if tie:
        assert loaded.model.head_weight is loaded.model.embed.weight
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_weights_missing_from_a_checkpoint_get_the_models_init(tmp_path):
    """from_pretrained re-initialises what the checkpoint lacks as CausalLM would (A_log,
    dt_bias by Mamba2's rule, D ones, the residual out_proj scaled) and keeps the rest."""
    from safetensors.torch import load_file, save_file

    model = hf_model(tie_embeddings=False)  # pattern MGS: block 0 is Mamba2, block 1 GDN
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    missing = ["model.blocks.0.mixer.D", "model.blocks.1.mixer.A_log",
               "model.blocks.1.mixer.dt_bias", "model.blocks.1.mixer.out_proj.weight",
               "model.lm_head.weight"]
    for name in missing:
        del weights[name]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = GDNForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        if name not in missing:
            assert torch.equal(loaded.state_dict()[name], tensor), name
    mamba, gdn = loaded.model.blocks[0].mixer, loaded.model.blocks[1].mixer
    assert torch.equal(mamba.D, torch.ones_like(mamba.D))
    A, dt = gdn.A_log.exp(), torch.nn.functional.softplus(gdn.dt_bias)
    assert ((A >= 1) & (A <= 16)).all() and ((dt > 0.9e-3) & (dt < 0.11)).all()
    std = loaded.config.initializer_range
    head = loaded.model.lm_head.weight
    assert abs(head.std().item() / std - 1) < 0.1 and abs(head.mean().item()) < 0.1 * std
    out = gdn.out_proj.weight  # 1/√(2·n_layers) of σ: a residual-stream output
    assert abs(out.std().item() / (std / (2 * loaded.config.n_layers) ** 0.5) - 1) < 0.1


def test_auto_config_reads_the_model_type(tmp_path):
    hf_model().config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gdn"
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, GDNConfig) and config.pattern == "MGS"


def test_bad_config_json_fails_at_load_with_the_field(tmp_path):
    hf_model().config.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    values = json.loads(path.read_text()) | {"pattern": "GQ"}
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="pattern: unknown mixer letter 'Q'"):
        AutoConfig.from_pretrained(tmp_path)


def test_loss_and_logits_match_causal_lm():
    model = hf_model()
    ids = torch.randint(0, 256, (2, 9))
    out = model(ids, labels=ids)
    assert torch.equal(out.loss, model.model(ids, labels=ids).loss)
    assert torch.equal(model(ids).logits, model.model(ids).logits)
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, 260)


def test_padding_in_attention_mask_never_enters_the_state():
    model = hf_model().double()
    row = torch.randint(0, 256, (1, 5))
    padded = torch.cat([torch.full((1, 3), 258), row], dim=1)  # left padding
    mask = (torch.arange(8) >= 3).long()[None]
    with torch.no_grad():
        alone = model(row).logits
        got = model(padded, attention_mask=mask).logits
    assert torch.allclose(got[:, 3:], alone, rtol=0, atol=1e-12)


def test_trainer_gradient_accumulation_scales_the_loss_once(tmp_path):
    """forward returns the mean loss of its batch: with gradient accumulation over 2 batches
    the Trainer must halve it, not take it for a sum already divided by num_items_in_batch
    (what it assumes of a forward that accepts **kwargs)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = hf_model("gdn", n_layers=2).train()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                             gradient_accumulation_steps=2)
    trainer = Trainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 2
    ids = torch.randint(0, 256, (2, 9))
    trainer.training_step(model, {"input_ids": ids, "labels": ids},
                          num_items_in_batch=torch.tensor(2 * 2 * 8))
    got = model.model.embed.weight.grad.clone()
    model.zero_grad()
    (model(ids, labels=ids).loss / 2).backward()
    assert torch.allclose(got, model.model.embed.weight.grad, rtol=1e-5, atol=0)


def test_hf_generate_equals_our_generate():
    model = hf_model().double()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    ours = generate(model.model, prompts, max_new_tokens=6, temperature=0)
    ids = torch.tensor([[1, 2, 3, 4, 5], [258, 258, 258, 7, 8]])
    out = model.generate(ids, attention_mask=(ids != 258).long(), max_new_tokens=6,
                         do_sample=False, pad_token_id=258, eos_token_id=None)
    assert out[:, 5:].tolist() == ours


def test_hf_generate_refuses_beam_search():
    model = hf_model()
    with pytest.raises(ValueError, match="num_beams=2: beam search is not supported"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, num_beams=2,
                       pad_token_id=258)


def test_byte_tokenizer_round_trips_and_loads_with_auto(tmp_path):
    text = "Gated DeltaNet — ünïcödé ✓\n\ttabs"
    tokenizer = byte_tokenizer()
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    save_byte_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (256, 257, 258)


LM_EVAL_SCRIPT = textwrap.dedent("""
    import json, sys
    import gdn.models.hf  # registers the "gdn" model type with the Auto classes
    import lm_eval
    from lm_eval.tasks import TaskManager

    checkpoint, task_dir = sys.argv[1], sys.argv[2]
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={checkpoint},dtype=float32,backend=causal",
        tasks=["gdn_tiny_mc"], task_manager=TaskManager(include_path=task_dir),
        device="cpu", batch_size=2)
    print("RESULT " + json.dumps(results["results"]["gdn_tiny_mc"]))
""")

TASK_YAML = """\
task: gdn_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_hf_model_type_evaluates_a_local_checkpoint(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    checkpoint, task_dir = tmp_path / "checkpoint", tmp_path / "tasks"
    task_dir.mkdir()
    hf_model("gdn", n_layers=2).save_pretrained(checkpoint)
    save_byte_tokenizer(checkpoint)
    examples = [("The sky is", ["blue", "green"], 0), ("Two plus two is", ["five", "four"], 1),
                ("Cats say", ["meow", "moo"], 0), ("Water is", ["dry", "wet"], 1)]
    data = task_dir / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n"
                            for q, c, y in examples))
    (task_dir / "gdn_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds"),
                        "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", LM_EVAL_SCRIPT, str(checkpoint), str(task_dir)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    accuracy = result["acc,none"]
    assert 0.0 <= accuracy <= 1.0 and result["sample_len"] == 4


def test_padded_batch_loss_equals_the_loss_over_the_unpadded_rows():
    model = hf_model().double()
    long, short = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 4))
    pad = torch.full((1, 3), 258)
    for ids, mask in (  # left padding, then right padding
        (torch.cat([long, torch.cat([pad, short], 1)]), torch.tensor([[1] * 7, [0] * 3 + [1] * 4])),
        (torch.cat([long, torch.cat([short, pad], 1)]), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])),
    ):
        got = model(ids, attention_mask=mask, labels=ids).loss
        per_row = [model(row, labels=row).loss * (row.shape[1] - 1) for row in (long, short)]
        assert torch.allclose(got, sum(per_row) / (6 + 3), rtol=1e-12, atol=0)
