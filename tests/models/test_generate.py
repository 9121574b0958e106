"""generate(): ragged prompts in one batch, greedy and sampled, stop tokens, bad arguments."""

import pytest
import torch

from gdn.models import CausalLM, ModelConfig, generate, sample_next


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # float64 so that greedy choices cannot flip on rounding between batched and single runs.
    config = ModelConfig.from_preset("h2-tiny", window=4, chunk_size=8)
    return CausalLM(config).double().eval()


PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [9, 8, 7, 6, 5]]


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_ragged_batch_equals_each_prompt_alone(model):
    together = generate(model, PROMPTS, max_new_tokens=7, temperature=0)
    for prompt, got in zip(PROMPTS, together, strict=True):
        assert got == generate(model, [prompt], max_new_tokens=7, temperature=0)[0]
        assert got == greedy_without_cache(model, prompt, 7)


def test_stop_tokens_end_only_their_row(model):
    free = generate(model, PROMPTS, max_new_tokens=7, temperature=0)
    stop = free[0][2]
    stopped = generate(model, PROMPTS, max_new_tokens=7, temperature=0, stop_tokens=[stop])
    for row, got in zip(free, stopped, strict=True):
        expected = row[:row.index(stop) + 1] if stop in row else row
        assert got == expected
    assert stopped[0] == free[0][:free[0].index(stop) + 1]


def test_sampling_is_reproducible_with_a_seeded_generator(model):
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate(model, PROMPTS, max_new_tokens=6, temperature=1.5, top_k=50,
                        top_p=0.9, generator=gen)

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_top_k_and_top_p_sample_only_allowed_tokens():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, generator=gen, dtype=torch.float64) * 2
    probs = logits.softmax(-1)
    top3 = logits.topk(3, dim=-1).indices
    sorted_probs, order = probs.sort(-1, descending=True)
    # top_p = 0.5: the smallest prefix of the ranking whose mass reaches 0.5.
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < 0.5
    nucleus = [set(order[r][keep[r]].tolist()) for r in range(4)]
    seen_k, seen_p = [set() for _ in range(4)], [set() for _ in range(4)]
    for _ in range(300):
        k = sample_next(logits, top_k=3, generator=gen)
        p = sample_next(logits, top_p=0.5, generator=gen)
        for r in range(4):
            seen_k[r].add(int(k[r]))
            seen_p[r].add(int(p[r]))
    for r in range(4):
        assert seen_k[r] == set(top3[r].tolist())  # all allowed ones drawn, nothing else
        assert seen_p[r] <= nucleus[r] and len(seen_p[r]) >= 1
    assert (sample_next(logits, top_k=1, generator=gen) == logits.argmax(-1)).all()
    assert (sample_next(logits, temperature=0) == logits.argmax(-1)).all()


def test_zero_new_tokens(model):
    assert generate(model, PROMPTS, max_new_tokens=0) == [[], [], [], []]


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(prompts=[]), "prompts must be a non-empty list"),
    (dict(prompts="hello"), "prompts must be a non-empty list"),
    (dict(prompts=[[1], []]), "prompts\\[1\\] must be a non-empty list"),
    (dict(prompts=[[1, 999]]), "prompts\\[0\\] has token id 999 outside \\[0, 260\\)"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be None or an int >= 1"),
    (dict(top_p=0.0), "top_p must be None or a number in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p must be None or a number in \\(0, 1\\]"),
    (dict(stop_tokens=[-1]), "stop_tokens has -1"),
])
def test_bad_arguments_raise_one_line_errors(model, kwargs, message):
    args = dict(prompts=[[1, 2]], max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, args.pop("prompts"), **args)


def test_top_k_keeps_exactly_k_tokens_when_logits_tie():
    from gdn.models import sample_next

    logits = torch.zeros(1, 10)               # every token ties with the k-th
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, top_k=3, generator=gen)) for _ in range(200)}
    assert len(seen) == 3
