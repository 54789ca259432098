import math

import pytest
import torch

from dllm_zoo.losses import MaskedDiffusionLoss


@pytest.fixture
def case() -> dict:
    # B=2, L=3. Row 0 masks positions 0,2 (p=0.5, t=0.4); row 1 masks position 1 (p=0.25, t=0.2).
    masked = torch.tensor([[True, False, True], [False, True, False]])
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])  # 3 masked tokens, V=2
    targets = torch.tensor([0, 0, 1])
    # CE: ln 2, ln(4/3), ln 2
    return {
        "logits": logits,
        "targets": targets,
        "masked": masked,
        "p_mask": torch.tensor([0.5, 0.25]),
        "t": torch.tensor([0.4, 0.2]),
        "answer_length": torch.tensor([3, 2]),
    }


def test_pretraining_loss_hand_computed(case: dict) -> None:
    out = MaskedDiffusionLoss.pretraining()(
        **{k: case[k] for k in ("logits", "targets", "masked")}, p_mask=case["p_mask"]
    )
    ln2, ln43 = math.log(2), math.log(4 / 3)
    # masked positions in row-major order: (0,0) ln2, (0,2) ln(4/3), (1,1) ln2; divide by B·L = 6
    expected = (ln2 / 0.5 + ln43 / 0.5 + ln2 / 0.25) / 6
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.ce.item() == pytest.approx((2 * ln2 + ln43) / 3, rel=1e-6)
    assert int(out.num_masked) == 3


def test_sft_loss_hand_computed(case: dict) -> None:
    out = MaskedDiffusionLoss.sft()(**case)
    ln2, ln43 = math.log(2), math.log(4 / 3)
    expected = ((ln2 + ln43) / 0.5 / 3 + (ln2 / 0.25) / 2) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_inverse_t_and_maskgit(case: dict) -> None:
    ln2, ln43 = math.log(2), math.log(4 / 3)
    out = MaskedDiffusionLoss("inverse_t", "masked_mean")(**case)
    assert out.loss.item() == pytest.approx(((ln2 + ln43) / 0.4 + ln2 / 0.2) / 3, rel=1e-6)
    out = MaskedDiffusionLoss.maskgit()(case["logits"], case["targets"], case["masked"])
    assert out.loss.item() == pytest.approx((2 * ln2 + ln43) / 3, rel=1e-6)


def test_gradient_flows_and_errors(case: dict) -> None:
    logits = case["logits"].clone().requires_grad_(True)
    MaskedDiffusionLoss.pretraining()(logits, case["targets"], case["masked"], p_mask=case["p_mask"]).loss.backward()
    assert logits.grad is not None
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs `p_mask`"):
        MaskedDiffusionLoss.pretraining()(case["logits"], case["targets"], case["masked"])
    with pytest.raises(ValueError, match="needs answer_length"):
        MaskedDiffusionLoss.sft()(case["logits"], case["targets"], case["masked"], p_mask=case["p_mask"])
    with pytest.raises(ValueError, match="weighting must be"):
        MaskedDiffusionLoss("bogus")  # type: ignore[arg-type]
