import math
import pickle

import pytest
import torch

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.rewards import ArithmeticCorrectness, ForTasks, Reward, ThinkFormat
from dllm_zoo.rl.logprobs import masked_token_logprobs
from dllm_zoo.rl.rollout import combine_rewards, repeat_prompts, response_mask, score_rewards


class Raises(Reward):
    name = "broken"

    def __call__(self, prompts, completions, **fields):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("boom")


class WrongLength(Reward):
    name = "short"

    def __call__(self, prompts, completions, **fields):  # type: ignore[no-untyped-def]
        return [1.0]


def test_repeat_prompts_keeps_groups_adjacent() -> None:
    ids = torch.tensor([[0, 5], [6, 7]])
    mask = torch.tensor([[False, True], [True, True]])
    r_ids, r_mask, group = repeat_prompts(ids, mask, 3)
    assert group.tolist() == [0, 0, 0, 1, 1, 1]
    assert r_ids.tolist() == [[0, 5]] * 3 + [[6, 7]] * 3
    assert r_mask[0].tolist() == [False, True]


def test_response_mask_trains_the_answer_and_the_first_post_num_pads() -> None:
    completion = torch.tensor([[5, 6, 0, 0, 0], [0, 0, 0, 0, 0], [5, 6, 7, 8, 9]])
    assert response_mask(completion, pad_id=0).tolist() == [
        [True, True, True, False, False],
        [True, False, False, False, False],
        [True, True, True, True, True],
    ]
    assert response_mask(completion, pad_id=0, post_num=0)[0].tolist() == [True, True, False, False, False]
    assert response_mask(completion, pad_id=0, post_num=2)[0].tolist() == [True, True, True, True, False]


def test_score_rewards_none_is_nan_and_errors_name_the_reward() -> None:
    rewards = [ArithmeticCorrectness(), ThinkFormat()]
    scores = score_rewards(rewards, ["1+1=?", "2+2=?"], ["<think>1+1=2</think> 2", "5"], {"answer": ["2", None]})
    assert scores["correctness"][0].item() == 1.0
    assert math.isnan(scores["correctness"][1].item())
    assert scores["format"].tolist() == [1.0, 0.0]
    with pytest.raises(RuntimeError, match="reward 'broken' \\(Raises\\) raised: ZeroDivisionError"):
        score_rewards([Raises()], ["q"], ["c"], {})
    with pytest.raises(ValueError, match="reward 'short' .* must return a list of 2 scores"):
        score_rewards([WrongLength()], ["q", "q"], ["c", "c"], {})
    with pytest.raises(ValueError, match="distinct"):
        score_rewards([ThinkFormat(), ThinkFormat()], ["q"], ["c"], {})
    with pytest.raises(RuntimeError, match="needs the per-sample field .answer."):
        score_rewards([ArithmeticCorrectness()], ["q"], ["c"], {})


def test_combine_rewards_sum_then_normalize_by_hand() -> None:
    group = torch.tensor([0, 0, 1, 1])
    scores = {"a": torch.tensor([1.0, 0.0, 1.0, 1.0]), "b": torch.tensor([1.0, 1.0, 0.0, math.nan])}
    total, adv = combine_rewards(scores, {"a": 2.0, "b": 0.5}, group)
    assert total.tolist() == [2.5, 0.5, 2.0, 2.0]
    # group 0: mean 1.5, population std 1.0 -> +1, -1; group 1: no spread -> 0
    assert adv.tolist() == [1.0, -1.0, 0.0, 0.0]


def test_combine_rewards_normalize_then_sum_by_hand() -> None:
    group = torch.tensor([0, 0, 0, 0])
    scores = {"a": torch.tensor([1.0, 0.0, 0.0, 0.0]), "b": torch.tensor([4.0, 0.0, math.nan, math.nan])}
    total, adv = combine_rewards(scores, {"a": 1.0, "b": 1.0}, group, aggregation="normalize_then_sum")
    assert total.tolist() == [5.0, 0.0, 0.0, 0.0]
    # a: mean .25, std sqrt(3)/4 -> [sqrt3, -1/sqrt3, …]; b over its two applicable rows: [+1, -1], none elsewhere
    a = [math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)]
    torch.testing.assert_close(adv, torch.tensor([a[0] + 1, a[1] - 1, a[2], a[3]]))


def test_for_tasks_routes_and_pickles() -> None:
    r = ForTasks(ArithmeticCorrectness(score=2.0), tasks=["arithmetic"])
    r2 = pickle.loads(pickle.dumps(r))
    out = r2(["a", "b", "c"], ["3", "red", "4"], answer=["3", "red", "5"], task=["arithmetic", "shapes", "arithmetic"])
    assert out == [2.0, None, 0.0]
    assert r2.name == "correctness"


def test_masked_token_logprobs_match_a_full_forward_and_carry_gradients() -> None:
    torch.manual_seed(0)
    model = LLaDABackbone("tiny")
    labels = torch.randint(0, 200, (2, 10))
    targets = torch.zeros(2, 10, dtype=torch.bool)
    targets[0, [2, 5]] = True
    targets[1, [9]] = True
    noisy = torch.where(targets, model.layout.mask_id, labels)
    logp, ent = masked_token_logprobs(model, noisy, labels, targets, with_entropy=True)
    full = torch.log_softmax(model(noisy).logits.float(), dim=-1)
    expected = full.gather(-1, labels[..., None]).squeeze(-1) * targets
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)
    assert ent is not None
    assert (ent[targets] > 0).all()
    assert (ent[~targets] == 0).all()
    logp.sum().backward()
    assert model.transformer_blocks()[0].q_proj.weight.grad is not None  # type: ignore[union-attr]


def test_kept_selects_every_per_rollout_field_and_keeps_the_rest() -> None:
    from dllm_zoo.stages.tracerl import TraceRollout  # a subclass with its own per-rollout and scalar fields

    t = torch.arange(6).view(3, 2)
    r = TraceRollout(
        tokens=t,
        attention_mask=t > 0,
        prompt_mask=t > 0,
        response_mask=t > 1,
        step_map=t,
        group=torch.tensor([0, 0, 1]),
        rewards={"a": torch.tensor([1.0, 2.0, 3.0])},
        advantages=torch.tensor([0.5, -0.5, 0.0]),
        keep=torch.tensor([True, False, True]),
        completions=["x", "y", "z"],
        nfe=5,
        prompt_width=7,
        chunk_rewards=torch.arange(12.0).view(3, 4),
    )
    k = r.kept()
    assert type(k) is TraceRollout
    assert k.tokens.tolist() == [[0, 1], [4, 5]]
    assert k.group.tolist() == [0, 1]
    assert k.rewards["a"].tolist() == [1.0, 3.0]
    assert k.advantages is not None
    assert k.advantages.tolist() == [0.5, 0.0]
    assert k.completions == ["x", "z"]
    assert (k.nfe, k.prompt_width) == (5, 7)
    assert k.chunk_rewards is not None
    assert k.chunk_rewards[:, 0].tolist() == [0.0, 8.0]
    assert r.tokens.shape[0] == 3  # the original is untouched
