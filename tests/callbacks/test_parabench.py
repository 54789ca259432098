"""ParaBench: the axes pinned on hand-made samples, the token-row path with oracle samplers, the tables, and a fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.callbacks import ParaBenchEvaluation
from dllm_zoo.data import ParallelDataModule
from dllm_zoo.data.interleave import BuildInterleaveRow
from dllm_zoo.data.synthetic import ShapesWorld
from dllm_zoo.parabench import (
    AXES,
    ParaBenchData,
    ParaBenchReport,
    ParaBenchSample,
    decode_outputs,
    parabench,
    reasoning_caption,
    score_sample,
    text_quality,
)
from dllm_zoo.samplers import SamplerOutput
from dllm_zoo.samplers.parallel import ParallelSampler
from dllm_zoo.stages import OptimConfig, ParallelSFT
from dllm_zoo.tokenizers import ByteTokenizer, PaletteTokenizer

TASK = ShapesWorld(num_train=16, num_val=12)
RED_SQUARE, BLUE_PLUS, GREEN_X = ("red", "square", 0, 0), ("blue", "plus", 1, 1), ("green", "x", 2, 2)
YELLOW_SQUARE = ("yellow", "square", 0, 0)


def edit_sample(objects: list[Any], output: list[Any], kind: str) -> dict[str, Any]:
    """A hand-made editing sample with the fields the scorer reads."""
    return {
        "image": TASK.render(objects),
        "objects": [list(o) for o in objects],
        "caption": TASK.caption(objects),
        "output_image": TASK.render(output),
        "output_objects": [list(o) for o in output],
        "output_caption": TASK.caption(output),
        "edit_reasoning": f"<think>the edit. Result: {TASK.caption(output)}.</think>",
        "r2i_reasoning": f"<think>{TASK.caption(objects)}</think>",
        "edit_kind": kind,
    }


RECOLOR = edit_sample([RED_SQUARE, BLUE_PLUS, GREEN_X], [YELLOW_SQUARE, BLUE_PLUS, GREEN_X], "recolor")


def think(caption: str) -> str:
    return f"<think>step. Result: {caption}.</think>"


# ------------------------------------------------------------------------------------------------ scoring


def test_the_ground_truth_scores_one_on_every_axis() -> None:
    scores = score_sample(TASK, "edit", RECOLOR, RECOLOR["edit_reasoning"], RECOLOR["output_image"])
    assert scores == dict.fromkeys(AXES, 1.0)
    gen = score_sample(TASK, "generate", RECOLOR, RECOLOR["r2i_reasoning"], RECOLOR["image"])
    assert gen == {**dict.fromkeys(AXES, 1.0), "image_consistency": None}  # editing only
    for i, s in enumerate(TASK.generate("val")):  # and every real val sample, both tasks
        assert set(score_sample(TASK, "edit", s, s["edit_reasoning"], s["output_image"]).values()) <= {1.0, None}, i
        assert set(score_sample(TASK, "generate", s, s["r2i_reasoning"], s["image"]).values()) <= {1.0, None}, i


def test_returning_the_input_unchanged_is_consistent_but_not_aligned() -> None:
    scores = score_sample(TASK, "edit", RECOLOR, RECOLOR["edit_reasoning"], RECOLOR["image"])
    assert scores["image_consistency"] == 1.0  # the blue plus and the green x are kept
    assert scores["image_alignment"] == 0.0  # the square is still red
    assert scores["image_quality"] == 1.0
    assert scores["output_alignment"] == 0.0  # the image is not what the reasoning says
    assert scores["output_alignment_f1"] == pytest.approx(2 * 2 / (3 + 3))
    assert (scores["text_quality"], scores["text_alignment"]) == (1.0, 1.0)
    # a reasoning that describes the unchanged image is wrong but consistent with its own image
    own = score_sample(TASK, "edit", RECOLOR, think(RECOLOR["caption"]), RECOLOR["image"])
    assert (own["text_alignment"], own["output_alignment"], own["output_alignment_f1"]) == (0.0, 1.0, 1.0)


def test_a_lost_untouched_object_halves_consistency() -> None:
    image = TASK.render([YELLOW_SQUARE, BLUE_PLUS])  # the edit is right, the green x is gone
    scores = score_sample(TASK, "edit", RECOLOR, RECOLOR["edit_reasoning"], image)
    assert scores["image_consistency"] == 0.5
    assert scores["image_alignment"] == 0.0
    assert scores["output_alignment_f1"] == pytest.approx(2 * 2 / (3 + 2))
    recolored = TASK.render([("green", "square", 0, 0), BLUE_PLUS, GREEN_X])  # wrong colour, both others kept
    assert score_sample(TASK, "edit", RECOLOR, RECOLOR["edit_reasoning"], recolored)["image_consistency"] == 1.0


def test_which_input_objects_an_edit_touches() -> None:
    alone = edit_sample([RED_SQUARE], [YELLOW_SQUARE], "recolor")  # its only object is touched
    scores = score_sample(TASK, "edit", alone, alone["edit_reasoning"], alone["output_image"])
    assert scores["image_consistency"] is None
    moved = edit_sample([RED_SQUARE, BLUE_PLUS], [("red", "square", 0, 1), BLUE_PLUS], "move")
    stay = TASK.render([RED_SQUARE, BLUE_PLUS])  # the source slot still holds the square: the plus is what counts
    assert score_sample(TASK, "edit", moved, moved["edit_reasoning"], stay)["image_consistency"] == 1.0
    added = edit_sample([RED_SQUARE, BLUE_PLUS], [RED_SQUARE, BLUE_PLUS, GREEN_X], "add")  # touches none
    lost = TASK.render([GREEN_X])
    assert score_sample(TASK, "edit", added, added["edit_reasoning"], lost)["image_consistency"] == 0.0


def test_garbage_scores_zero_on_every_axis() -> None:
    noise = torch.randint(1, 16, (9, 9), generator=torch.Generator().manual_seed(0))
    assert score_sample(TASK, "edit", RECOLOR, "zq<think>x", noise) == dict.fromkeys(AXES, 0.0)
    blank = torch.zeros(9, 9, dtype=torch.long)
    assert score_sample(TASK, "edit", RECOLOR, "", blank) == dict.fromkeys(AXES, 0.0)
    # no decodable image (an invalid code): every image axis is 0 even with a perfect reasoning
    scores = score_sample(TASK, "edit", RECOLOR, RECOLOR["edit_reasoning"], None)
    assert scores == {**dict.fromkeys(AXES, 0.0), "text_quality": 1.0, "text_alignment": 1.0}
    gen = score_sample(TASK, "generate", RECOLOR, "", noise)
    assert gen == {**dict.fromkeys(AXES, 0.0), "image_consistency": None}


@pytest.mark.parametrize(
    ("name", "text", "ok"),
    [
        ("edit", "<think>the top is empty. Result: a red x at the top.</think>", True),
        ("edit", "  <think>x. result: nothing.</think>\n", True),
        ("edit", "<think>a red x at the top</think>", False),  # an edit states its Result
        ("edit", "<think>x. Result: a red x at the top.", False),  # unclosed
        ("edit", "<think>x. Result: a red x at the top.</think> and more", False),  # text after the block
        ("edit", "<think>a</think><think>x. Result: a red x at the top.</think>", False),  # two blocks
        ("edit", "<think>x. Result: a red blob at the top.</think>", False),  # not a caption
        ("generate", "<think>a red x at the top and a blue ring at the center</think>", True),
        ("generate", "a red x at the top", False),  # no think block
        ("generate", "<think>x. Result: a red x at the top.</think>", False),  # the whole content is the caption
    ],
)
def test_text_quality(name: str, text: str, ok: bool) -> None:
    assert text_quality(TASK, name, text) is ok


def test_reasoning_caption_reads_like_check_reasoning() -> None:
    assert reasoning_caption("<think>a. Result: b</think> c").strip() == "b"
    assert reasoning_caption("<think>one</think> <think>two</think>").strip() == "two"  # the last block
    assert reasoning_caption("<think>one</think> <think>two").strip() == "one"  # the last closed one
    assert reasoning_caption("<think>unclosed").strip() == "unclosed"
    assert reasoning_caption("plain").strip() == "plain"


# ------------------------------------------------------------------------------------------- token rows

PARTS = ParaBenchData(TASK, ByteTokenizer(), PaletteTokenizer(), text_len=192, image_size=9)
LAY = PARTS.tokenizer.layout


class OracleSampler(ParallelSampler):
    """Returns the ground-truth row of each prompt (``mode="copy"``: edits keep the input image)."""

    def __init__(self, mode: str = "truth") -> None:
        super().__init__(text_len=192, num_image_tokens=81, steps=1)
        self.mode, self.calls = mode, 0
        self.truth: dict[tuple[int, ...], torch.Tensor] = {}
        for name in ("edit", "generate"):
            build = BuildInterleaveRow(name, PARTS.tokenizer, PARTS.image_tokenizer, 192, 9)  # type: ignore[arg-type]
            for s in TASK.generate("val"):
                row = build(s)["input_ids"]
                if mode == "copy" and name == "edit":
                    row[self.spans.output_image] = row[self.spans.input_image]
                self.truth[tuple(row[: self.spans.prompt_len].tolist())] = row

    def generate(self, model: Any, prompt_ids: torch.Tensor, prompt_mask: Any = None, **kw: Any) -> SamplerOutput:
        self.calls += 1
        tokens = torch.stack([self.truth[tuple(p)] for p in prompt_ids.tolist()])
        return SamplerOutput(tokens, torch.zeros_like(tokens), 1, None, torch.ones_like(tokens, dtype=torch.bool))


MODEL = LLaDABackbone("tiny", layout="default")


def test_oracle_rows_score_one_and_copies_score_consistency_only() -> None:
    oracle = OracleSampler()
    report = parabench(MODEL, oracle, PARTS, limit=8, batch_size=6)
    assert oracle.calls == 3  # 16 prompts in batches of 6, edit and generation rows mixed
    assert [(s.task, s.index) for s in report.samples] == [("edit", i) for i in range(8)] + [
        ("generate", i) for i in range(8)
    ]
    for group, means in report.means().items():
        assert set(means.values()) == {1.0}, group
    counts = report.counts()
    assert counts["generate"].keys() == set(AXES) - {"image_consistency"}
    assert counts["overall"]["text_quality"] == 16
    assert counts["overall"]["image_consistency"] == counts["edit"]["image_consistency"] <= 8
    val = list(TASK.generate("val"))[:8]
    assert [s.reasoning for s in report.samples[:8]] == [v["edit_reasoning"] for v in val]
    assert [s.image for s in report.samples[8:]] == [v["image"] for v in val]
    assert [s.edit_kind for s in report.samples[:8]] == [v["edit_kind"] for v in val]

    copied = parabench(MODEL, OracleSampler("copy"), PARTS, limit=8, batch_size=16)
    edit = copied.means()["edit"]
    assert edit["image_consistency"] == 1.0
    assert edit["image_alignment"] == 0.0  # every edit changes something
    assert edit["text_alignment"] == 1.0
    assert copied.means()["generate"]["image_alignment"] == 1.0


def test_decoding_stops_at_the_first_eos_and_flags_foreign_codes() -> None:
    spans = PARTS.spans
    rows = OracleSampler().truth
    row = next(iter(rows.values())).clone()
    start = spans.output_text.start + 1
    row[start : start + 3] = torch.tensor([104, 105, LAY.eos_id])  # "hi" EOS …rest of the reasoning
    row[start + 1 : start + 2] = torch.tensor([LAY.mask_id])  # a special token inside is skipped
    bad = row.clone()
    bad[spans.output_image.start] = LAY.image_offset + 16  # not a palette code (the layout reserves 64)
    texts, grids, valid = decode_outputs(torch.stack([row, bad]), spans, PARTS.tokenizer, PARTS.image_tokenizer)
    assert texts == ["h", "h"]
    assert valid.tolist() == [True, False]
    assert grids.shape == (2, 9, 9)
    assert grids[1, 0, 0] == 0  # shown as background, but scored as no image


def test_sampler_and_data_must_agree() -> None:
    with pytest.raises(ValueError, match="text_len=64"):
        parabench(MODEL, ParallelSampler(64, 81, steps=1), PARTS, limit=1)
    with pytest.raises(ValueError, match="subset"):
        parabench(MODEL, OracleSampler(), PARTS, tasks=["t2i"], limit=1)


# ---------------------------------------------------------------------------------------------- report


def test_pooled_means_tables_and_json() -> None:
    def sample(task: str, kind: str | None, tq: float, cons: float | None) -> ParaBenchSample:
        scores = {**dict.fromkeys(AXES, 0.5), "text_quality": tq, "image_consistency": cons}
        return ParaBenchSample(task, 0, kind, "i", "c", "r", [[0]], True, None, [[0]], scores)

    report = ParaBenchReport(
        [sample("edit", "add", 1.0, 1.0), sample("edit", "move", 0.0, None), sample("generate", None, 1.0, None)],
        seconds=1.25,
        forward_passes=4,
    )
    means = report.means()
    assert means["edit"]["text_quality"] == 0.5
    assert means["overall"]["text_quality"] == pytest.approx(2 / 3)  # pooled over samples, not over tasks
    assert means["edit"]["image_consistency"] == 1.0  # the move that touched everything is left out
    assert report.counts()["edit"]["image_consistency"] == 1
    assert "image_consistency" not in means["generate"]
    assert report.by_edit_kind()["move"]["text_quality"] == 0.0
    assert report.scalars()["parabench/overall/text_quality"] == pytest.approx(2 / 3)
    assert report.scalars()["parabench/generate/mean"] == pytest.approx((1.0 + 0.5 * 4) / 5)
    head = "| N | Text Qual. | Text Align. | Img Qual. | Img Align. | Img Cons. | Out Align. | Out Align. F1 | Mean |"
    assert report.to_markdown().splitlines() == [
        "## ParaBench (ShapesWorld, exact checker)",
        "",
        "| Task " + head,
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| edit | 2 | 50.0 | 50.0 | 50.0 | 50.0 | 100.0 | 50.0 | 50.0 | 58.3 |",
        "| generate | 1 | 100.0 | 50.0 | 50.0 | 50.0 | – | 50.0 | 50.0 | 60.0 |",
        "| overall | 3 | 66.7 | 50.0 | 50.0 | 50.0 | 100.0 | 50.0 | 50.0 | 61.1 |",
        "",
        "### Editing by kind",
        "",
        "| Edit kind " + head,
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| add | 1 | 100.0 | 50.0 | 50.0 | 50.0 | 100.0 | 50.0 | 50.0 | 66.7 |",
        "| move | 1 | 0.0 | 50.0 | 50.0 | 50.0 | – | 50.0 | 50.0 | 40.0 |",
        "",
        "3 prompts, 4 forward passes, 1.2 s.",
    ]
    data = json.loads(report.to_json())
    assert data["num_samples"] == {"edit": 2, "generate": 1, "overall": 3}
    assert data["edit_kind_counts"] == {"add": 1, "move": 1}
    assert data["samples"][1]["scores"]["image_consistency"] is None
    assert data["means"]["overall"]["text_quality"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------------- fit


def fit(root: Path, logger: Any, callback: ParaBenchEvaluation) -> L.Trainer:
    task = ShapesWorld(grid_size=2, num_train=64, num_val=8)  # 6x6 images: 36 image tokens, rows of 141
    dm = ParallelDataModule(
        task=task, text_len=32, image_size=6, batch_size=4, shuffle_buffer=8, cache_dir=str(root / "data")
    )
    st = ParallelSFT(backbone=lambda: LLaDABackbone("tiny", layout="default"), optim=OptimConfig(warmup_steps=1))
    trainer = L.Trainer(
        max_steps=2,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=1,
        val_check_interval=2,
        num_sanity_val_steps=1,
        callbacks=[callback],
        default_root_dir=str(root),
    )
    torch.manual_seed(0)
    trainer.fit(st, dm)
    return trainer


def test_fit_logs_scalars_pictures_and_files_to_tensorboard(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = ParaBenchEvaluation(ParallelSampler(32, 36, steps=2, codebook_size=16), limit=3, batch_size=4, log_images=2)
    trainer = fit(tmp_path, TensorBoardLogger(str(tmp_path), name="tb"), cb)
    assert len(cb.history) == 1  # after the validation (not the sanity check); the end reused it, same step
    log_dir = Path(trainer.log_dir or "")
    data = json.loads((log_dir / "parabench.json").read_text())
    assert data["final"] is True
    assert data["global_step"] == 2
    assert data["num_samples"] == {"edit": 3, "generate": 3, "overall": 6}
    assert len(data["samples"]) == 6
    assert len(data["samples"][0]["image"]) == 6
    md = (log_dir / "parabench.md").read_text()
    assert "| overall | 6 |" in md
    assert "| overall | 6 |" in capsys.readouterr().out  # the final table on the console
    assert "parabench/overall/output_alignment" in trainer.callback_metrics
    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for group in ("edit", "generate", "overall"):
        assert {f"parabench/{group}/text_quality", f"parabench/{group}/output_alignment"} <= scalars
    assert "parabench/edit/image_consistency" in scalars
    assert "parabench/generate/image_consistency" not in scalars
    assert {"parabench/edit/samples", "parabench/generate/samples"} <= set(events.Tags()["images"])
    picture = events.Images("parabench/edit/samples")[0]
    # 2 samples x 3 columns (input | output | target) of 6x6 images upscaled 8x with 1-pixel borders
    assert (picture.height, picture.width) == (2 * 49 + 1, 3 * 49 + 1)


def test_other_loggers_get_scalars_and_the_final_report_runs_at_the_end(tmp_path: Path) -> None:
    cb = ParaBenchEvaluation(ParallelSampler(32, 36, steps=2), limit=2, batch_size=4, every_n_val=0, tasks=["edit"])
    trainer = fit(tmp_path, CSVLogger(str(tmp_path), name="csv"), cb)
    assert [h["global_step"] for h in cb.history] == [2]  # only the final evaluation
    assert cb.report is not None
    assert cb.report.tasks == ["edit"]
    log_dir = Path(trainer.log_dir or "")
    assert json.loads((log_dir / "parabench.json").read_text())["num_samples"]["edit"] == 2
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"parabench/edit/text_quality", "parabench/overall/mean"} <= set(header)
    assert "parabench/generate/text_quality" not in header
