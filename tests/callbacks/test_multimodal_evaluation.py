"""MultimodalEvaluation: prompt layouts, and the scoring path end to end with oracle samplers (must score 1.0)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.callbacks.multimodal import (
    MultimodalEvaluation,
    codes_to_grids,
    image_grid,
    mmu_prompts,
    t2i_prompts,
)
from dllm_zoo.data import DataSource, MultiTaskDataModule, TaskData
from dllm_zoo.data.synthetic import Arithmetic, ShapesWorld
from dllm_zoo.samplers import MaskGITSampler, Sampler, SamplerOutput
from dllm_zoo.tokenizers import ByteTokenizer, PaletteTokenizer

TOK = ByteTokenizer()
LAY = TOK.layout
SHAPES = ShapesWorld(num_train=32, num_val=8)


class OracleImages(MaskGITSampler):
    """Writes the true image of each caption (looked up in the val split) into the canvas."""

    def __init__(self) -> None:
        super().__init__(num_image_tokens=81, steps=1)
        self.truth = {s["caption"]: s["image"] for s in SHAPES.generate("val")}

    def generate(self, model: Any, prompt_ids: torch.Tensor, prompt_mask: Any = None, **kw: Any) -> SamplerOutput:
        rows = []
        for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            text = [t for t, m in zip(ids, mask) if m][2:-1]  # drop <|t2i|> BOS … EOS
            caption = TOK.decode(text)
            codes = torch.tensor(self.truth[caption]).flatten() + LAY.image_offset
            rows.append(
                torch.cat(
                    [
                        torch.tensor(ids),
                        torch.tensor([LAY.token_id("<|soi|>")]),
                        codes,
                        torch.tensor([LAY.token_id("<|eoi|>")]),
                    ]
                )
            )
        tokens = torch.stack(rows)
        return SamplerOutput(tokens, torch.zeros_like(tokens), 1, None, torch.ones_like(tokens, dtype=torch.bool))


class OracleAnswers(Sampler):
    """Answers the prompts with the given answers, in the order the callback decodes them (mmu, then text)."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = list(answers)

    def generate(self, model: Any, prompt_ids: torch.Tensor, prompt_mask: Any = None, **kw: Any) -> SamplerOutput:
        rows = [ids + TOK.encode(self.answers.pop(0).ljust(80)) for ids in prompt_ids.tolist()]
        tokens = torch.tensor(rows)
        return SamplerOutput(tokens, torch.zeros_like(tokens), 1, None, torch.ones_like(tokens, dtype=torch.bool))


def datamodule(tmp_path: Path) -> MultiTaskDataModule:
    arith = Arithmetic(num_train=32, num_val=8)
    return MultiTaskDataModule(
        tasks={
            "t2i": TaskData("t2i", 2, [DataSource(task=SHAPES)]),
            "lm": TaskData("lm_chat", 2, [DataSource(task=arith)]),
            "mmu": TaskData("mmu", 2, [DataSource(task=SHAPES)], response_field="answer"),
        },
        text_len=96,
        cache_dir=str(tmp_path),
    )


def run_callback(cb: MultimodalEvaluation, dm: MultiTaskDataModule) -> dict[str, float]:
    logged: dict[str, float] = {}
    module = SimpleNamespace(net=LLaDABackbone("tiny"), log=lambda k, v, **_: logged.__setitem__(k, v))
    trainer = SimpleNamespace(sanity_checking=False, datamodule=dm, global_rank=0, logger=None, global_step=0)
    cb.on_validation_epoch_end(trainer, module)  # type: ignore[arg-type]
    return logged


def test_oracle_samplers_score_perfectly(tmp_path: Path) -> None:
    dm = datamodule(tmp_path)
    questions = [s["answer"] for s in SHAPES.generate("val")]
    questions += [s["response"] for s in Arithmetic(num_train=32, num_val=8).generate("val")]
    cb = MultimodalEvaluation(t2i_sampler=OracleImages(), text_sampler=OracleAnswers(questions), limit=8)
    logged = run_callback(cb, dm)
    assert logged == {"val/t2i_alignment": 1.0, "val/t2i_f1": 1.0, "val/mmu_accuracy": 1.0, "val/text_accuracy": 1.0}


def test_a_random_model_scores_low_and_the_image_size_must_match(tmp_path: Path) -> None:
    dm = datamodule(tmp_path)
    torch.manual_seed(0)
    cb = MultimodalEvaluation(t2i_sampler=MaskGITSampler(81, steps=2, codebook_size=16), limit=4)
    logged = run_callback(cb, dm)
    assert logged["val/t2i_alignment"] == 0.0
    assert 0.0 <= logged["val/t2i_f1"] < 0.5
    with pytest.raises(ValueError, match="num_image_tokens to 81"):
        run_callback(MultimodalEvaluation(t2i_sampler=MaskGITSampler(64, steps=2), limit=4), dm)


def test_prompt_layouts() -> None:
    ids, mask = t2i_prompts(TOK, ["ab", "abcd"], 8)
    assert ids.shape == (2, 9)
    assert ids[0].tolist() == [LAY.token_id("[iPAD]")] * 4 + [LAY.token_id("<|t2i|>"), LAY.bos_id, 97, 98, LAY.eos_id]
    assert mask.sum(1).tolist() == [5, 7]
    img = torch.tensor([[LAY.image_offset + 1, LAY.image_offset + 2]])
    ids, mask = mmu_prompts(TOK, img, ["q"])
    head = [LAY.token_id("<|mmu|>"), LAY.token_id("<|soi|>"), *img[0].tolist(), LAY.token_id("<|eoi|>")]
    assert ids[0].tolist() == head + TOK.encode_chat([{"role": "user", "content": "q"}], True)


def test_codes_outside_the_tokenizer_are_background_and_grids_tile() -> None:
    pal = PaletteTokenizer()
    grid = codes_to_grids(torch.tensor([[[1, 40], [15, 16]]]), pal)
    assert grid.tolist() == [[[1, 0], [15, 0]]]
    picture = image_grid(torch.rand(5, 3, 9, 9), columns=4, scale=2)
    assert picture.shape == (3, 2 * 19 + 1, 4 * 19 + 1)
