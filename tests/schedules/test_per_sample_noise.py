"""NoiseSchedule.add_noise with ``sample_ids``: one time per packed sample, at least one mask per sample."""

import pytest
import torch

from dllm_zoo.data import packed_sample_ids
from dllm_zoo.schedules import CosineSchedule, LinearSchedule

MASK = 99


def test_one_time_per_sample_and_padding_never_masked() -> None:
    tokens = torch.arange(2 * 8).reshape(2, 8)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0, 1, 1]])
    ids = packed_sample_ids(segments)
    maskable = torch.ones(2, 8, dtype=torch.bool)
    maskable[0, 0] = False  # a prompt token
    t = torch.zeros(16)
    t[1] = 1.0  # row 0, sample 1: everything masked
    t[8] = 1.0  # row 1, sample 0: everything masked
    out = LinearSchedule().add_noise(
        tokens, maskable, MASK, t=t, generator=torch.Generator().manual_seed(0), at_least_one=True, sample_ids=ids
    )
    assert out.masked[0, 3:7].all()
    assert out.masked[1, 0:6].all()
    # t = 0 -> p = eps: exactly the one forced mask in each of the other samples
    assert int(out.masked[0, 0:3].sum()) == 1
    assert not out.masked[0, 0]
    assert int(out.masked[1, 6:8].sum()) == 1
    assert not out.masked[0, 7]  # padding
    assert torch.equal(out.noisy[out.masked], torch.full((int(out.masked.sum()),), MASK))
    assert out.p_mask.tolist() == pytest.approx(LinearSchedule().mask_prob(t).tolist())


def test_drawn_times_cover_every_id_slot_and_are_reproducible() -> None:
    tokens = torch.zeros(3, 5, dtype=torch.long)
    ids = packed_sample_ids(torch.tensor([[0, 0, 1, 1, 2], [0] * 5, [0, 0, 0, -1, -1]]))
    maskable = ids >= 0
    a = LinearSchedule().add_noise(tokens, maskable, MASK, generator=torch.Generator().manual_seed(3), sample_ids=ids)
    b = LinearSchedule().add_noise(tokens, maskable, MASK, generator=torch.Generator().manual_seed(3), sample_ids=ids)
    assert a.t.shape == (15,)
    assert torch.equal(a.masked, b.masked)
    assert torch.equal(a.t, b.t)
    with pytest.raises(ValueError, match="packed rows"):
        CosineSchedule().add_noise(tokens, maskable, MASK, sample_ids=ids)
