"""Monte-Carlo ELBO of LLaDA's get_log_likelihood: stratified counts, exactness for one token, unbiasedness."""

from __future__ import annotations

import itertools

import pytest
import torch
from sampler_helpers import left_pad, prompts

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.samplers import elbo_log_likelihood, stratified_mask_counts


@pytest.mark.parametrize(
    ("k", "b", "length", "expected"),
    [
        (3, 4, 10, [3, 6, 8, 10]),  # 3, 5.5, 8, 10.5 -> round half to even: 3, 6, 8, 10
        (7, 4, 10, [7, 10, 2, 4]),  # 7, 9.5, 12, 14.5 -> 7, 10, 12, 14 -> wrap: 7, 10, 2, 4
        (5, 5, 5, [5, 1, 2, 3, 4]),
        (1, 3, 1, [1, 1, 1]),
        (2, 1, 7, [2]),
        (16, 16, 16, [16, *range(1, 16)]),
    ],
)
def test_stratified_counts_pinned(k: int, b: int, length: int, expected: list[int]):
    assert stratified_mask_counts(torch.tensor([k]), b, length)[0].tolist() == expected


def test_stratified_counts_match_the_linspace_formula():
    for length, b in itertools.product((1, 2, 5, 7, 16, 33), (1, 2, 4, 8, 16, 32)):
        ks = torch.arange(1, length + 1)
        got = stratified_mask_counts(ks, b, length)
        for k in ks.tolist():
            lin = torch.round(torch.linspace(float(k), k + (b - 1) * (length / b), steps=b)).long()
            assert got[k - 1].tolist() == (((lin - 1) % length) + 1).tolist(), (k, b, length)
        assert bool(((got >= 1) & (got <= length)).all())


def _exact_one_token(model: LLaDABackbone, prompt: torch.Tensor, answer: int, cfg: float = 0.0) -> float:
    x = torch.cat([prompt, torch.tensor([model.layout.mask_id])])[None]
    logits = model(x).logits[0, -1]
    if cfg:
        un = x.clone()
        un[:, :-1] = model.layout.mask_id
        u = model(un).logits[0, -1]
        logits = u + (cfg + 1) * (logits - u)
    return torch.log_softmax(logits.float(), -1)[answer].item()


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_one_token_answer_is_exact_and_batched_with_padding(model: LLaDABackbone, cfg_scale: float):
    rows = [prompts(1, n, seed=n)[0] for n in (3, 6, 4)]
    answers = torch.tensor([[17], [250], [42]])
    ids, mask = left_pad(rows, model.layout.pad_id)
    got = elbo_log_likelihood(model, ids, answers, prompt_mask=mask, mc_num=4, batch_size=2, cfg_scale=cfg_scale)
    assert got.shape == (3,)
    for i, r in enumerate(rows):
        assert got[i].item() == pytest.approx(_exact_one_token(model, r, int(answers[i, 0]), cfg_scale), abs=1e-4)


def _exact_elbo(model: LLaDABackbone, prompt: torch.Tensor, answer: torch.Tensor) -> float:
    """E[estimator] by enumeration: each row's count is uniform on 1..A and the masked set uniform of that size."""
    a, p, mask_id = len(answer), len(prompt), model.layout.mask_id
    total = 0.0
    for x in range(1, a + 1):
        subsets = list(itertools.combinations(range(a), x))
        acc = 0.0
        for sub in subsets:
            seq = torch.cat([prompt, answer]).clone()
            seq[[p + i for i in sub]] = mask_id
            logp = torch.log_softmax(model(seq[None]).logits[0, p:].float(), -1)
            acc += -sum(logp[i, answer[i]].item() for i in sub) / (x / a)
        total += acc / len(subsets) / a
    return -total


def test_estimator_is_unbiased_for_the_exact_elbo(model: LLaDABackbone):
    prompt, answer = prompts(1, 5, seed=4)[0], torch.tensor([12, 200, 7])
    exact = _exact_elbo(model, prompt, answer)
    est = elbo_log_likelihood(
        model, prompt[None], answer[None], mc_num=1024, batch_size=32, generator=torch.Generator().manual_seed(0)
    )
    assert est.item() == pytest.approx(exact, rel=0.02)


def test_deterministic_under_generator(model: LLaDABackbone):
    x, a = prompts(2, 5, seed=8), torch.tensor([[1, 2, 3, 4], [9, 8, 7, 6]])
    run = lambda seed: elbo_log_likelihood(  # noqa: E731
        model, x, a, mc_num=32, batch_size=8, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_argument_checks(model: LLaDABackbone):
    with pytest.raises(ValueError, match="mc_num"):
        elbo_log_likelihood(model, prompts(1, 3), torch.tensor([[1, 2]]), mc_num=10, batch_size=4)
    with pytest.raises(ValueError, match="share B"):
        elbo_log_likelihood(model, prompts(2, 3), torch.tensor([[1, 2]]))
