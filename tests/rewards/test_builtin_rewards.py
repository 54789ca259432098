import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from dllm_zoo.data.synthetic import Arithmetic, ShapesWorld
from dllm_zoo.rewards.alignment import ShapesAlignment
from dllm_zoo.rewards.base import Reward
from dllm_zoo.rewards.clip import ClipScore
from dllm_zoo.rewards.correctness import ArithmeticCorrectness, ShapesAnswerCorrectness
from dllm_zoo.rewards.format import ThinkFormat, after_think
from dllm_zoo.tokenizers.image import PaletteTokenizer

# ------------------------------------------------------------------------------------------------- correctness


def test_arithmetic_correctness_pinned() -> None:
    r = ArithmeticCorrectness(score=2.0)
    completions = [
        "<think>7+8=15 carry 1, 4+3+1=8</think> 85",  # right
        "<think>7+8=15</think> 84",  # wrong
        "the answer is 085.",  # no think block: last integer, normalised
        "<think>85</think>",  # nothing after the think block
        "<think>1</think> -9",  # negative, int answer
        "85",  # answer None: not applicable
    ]
    answers = ["85", "85", 85, "85", -9, None]
    assert r(["q"] * 6, completions, answer=answers) == [2.0, 0.0, 2.0, 0.0, 2.0, None]
    assert r.name == "correctness"
    assert ArithmeticCorrectness(name="acc").name == "acc"
    assert ArithmeticCorrectness()(["q"], ["<think></think> 7"], answer=[" 007 "]) == [1.0]


def test_arithmetic_correctness_agrees_with_the_task_checker() -> None:
    task = Arithmetic(num_train=1, num_val=8, seed=3)
    samples = list(task.generate("val"))
    completions = [s["response"] for s in samples] + ["<think></think> 1000"] * len(samples)
    got = ArithmeticCorrectness()(
        [s["prompt"] for s in samples] * 2, completions, answer=[s["answer"] for s in samples] * 2
    )
    assert got == [float(task.check(c, s)) for c, s in zip(completions, samples * 2)]
    assert got == [1.0] * 8 + [0.0] * 8


def test_arithmetic_correctness_errors() -> None:
    r = ArithmeticCorrectness()
    with pytest.raises(KeyError, match="'answer'"):
        r(["q"], ["1"], caption=["x"])
    with pytest.raises(ValueError, match="1 entries for 2 completions"):
        r(["q", "q"], ["1", "2"], answer=["1"])
    with pytest.raises(ValueError, match="compares integers.*'3.5'"):
        r(["q"], ["1"], answer=["3.5"])


def test_shapes_answer_correctness_pinned() -> None:
    r = ShapesAnswerCorrectness(score=2.0, name="vqa")
    completions = [
        "<think>center: red x.</think> Red.",
        "<think>center: red x.</think>   TOP   left  ",
        "<think>a</think> wrong <think>b</think> blue",  # the answer is after the last </think>
        "red",
        "anything",
    ]
    answers = ["red", "top left", "blue", "green", None]
    assert r(["q"] * 5, completions, answer=answers) == [2.0, 2.0, 2.0, 0.0, None]
    assert r.name == "vqa"


def test_shapes_answer_correctness_agrees_with_the_task_checker() -> None:
    task = ShapesWorld(num_train=1, num_val=6)
    samples = list(task.generate("val"))
    completions = [s["response"] for s in samples] + [s["response"] + " no" for s in samples]
    got = ShapesAnswerCorrectness()([""] * 12, completions, answer=[s["answer"] for s in samples] * 2)
    assert got == [float(task.check(c, s)) for c, s in zip(completions, samples * 2)]
    assert got == [1.0] * 6 + [0.0] * 6


# ------------------------------------------------------------------------------------------------------ format


@pytest.mark.parametrize(
    ("completion", "ok", "ok_without_answer"),
    [
        ("<think>7+8=15</think> 15", True, True),
        ("  \n<think>multi\nline</think>\n15\n", True, True),  # leading whitespace, DOTALL
        ("<think></think> 15", True, True),  # an empty reasoning is still one block
        ("<think>7+8=15</think>", False, True),  # no answer
        ("<think>7+8=15</think>  \n ", False, True),  # a blank answer
        ("15", False, False),  # no block
        ("so <think>x</think> 15", False, False),  # text before the block
        ("<think>a</think><think>b</think> 1", False, False),  # two blocks
        ("<think>a<think>b</think> 1", False, False),  # nested opening tag
        ("<think>a</think> 1 </think>", False, False),  # a stray closing tag in the answer
        ("<think>unclosed 15", False, False),
        ("</think> 15", False, False),
    ],
)
def test_think_format_rule(completion: str, ok: bool, ok_without_answer: bool) -> None:
    assert ThinkFormat(score=0.5)([""], [completion]) == [0.5 if ok else 0.0]
    assert ThinkFormat(require_answer=False)([""], [completion]) == [1.0 if ok_without_answer else 0.0]


def test_think_format_batch_and_name() -> None:
    r = ThinkFormat()
    assert r.name == "format"
    assert r(["a", "b"], ["<think>x</think> 1", "1"], answer=["1", "1"]) == [1.0, 0.0]  # other fields ignored
    assert after_think("<think>a</think> b </think> c ") == "c"
    assert after_think(" plain ") == "plain"


# --------------------------------------------------------------------------------------------------- alignment


@pytest.fixture(scope="module")
def shapes() -> tuple[ShapesWorld, list[dict]]:
    task = ShapesWorld(num_train=1, num_val=8)
    return task, list(task.generate("val"))


def _different(samples: list[dict]) -> list[dict]:
    """Each sample's image paired with the next sample (whose objects differ)."""
    shifted = samples[1:] + samples[:1]
    for a, b in zip(samples, shifted):
        assert {tuple(o) for o in a["objects"]} != {tuple(o) for o in b["objects"]}
    return shifted


def test_shapes_alignment_text_to_image_on_real_samples(shapes: tuple[ShapesWorld, list[dict]]) -> None:
    task, samples = shapes
    captions = [s["caption"] for s in samples]
    own = [s["image"] for s in samples]
    other = [s["image"] for s in _different(samples)]
    n = len(samples)
    exact, f1 = ShapesAlignment(task), ShapesAlignment(task, metric="f1", score=0.5, name="f1")
    assert exact([""] * n, [""] * n, images=own, caption=captions) == [1.0] * n
    assert f1([""] * n, [""] * n, images=own, caption=captions) == [0.5] * n
    assert exact([""] * n, [""] * n, images=other, caption=captions) == [0.0] * n
    scores = f1([""] * n, [""] * n, images=other, caption=captions)
    assert all(s is not None and 0.0 <= s < 0.5 for s in scores)
    assert scores == [0.5 * task.alignment_score(c, im) for c, im in zip(captions, other)]
    # Integer tensors [H, W] read the same as nested lists; None entries are not applicable.
    tensors = [torch.tensor(im) for im in own[:2]] + [None]
    assert exact([""] * 3, [""] * 3, images=tensors, caption=captions[:3]) == [1.0, 1.0, None]


def test_shapes_alignment_pinned() -> None:
    task = ShapesWorld()
    image = task.render([("red", "x", 0, 0), ("blue", "plus", 1, 1)])
    captions = [
        "A red x at the top left and a blue plus at the center.",  # exact (case, period)
        "a red x at the top left",  # one of two objects: f1 = 2·1/(1+2)
        "a red x at the top left, a blue plus at the center and a green dot at the bottom",  # f1 = 2·2/(3+2)
        "a red blob",  # does not parse
        None,
    ]
    kwargs = {"images": [image] * 5, "caption": captions}
    assert ShapesAlignment()([""] * 5, [""] * 5, **kwargs) == [1.0, 0.0, 0.0, 0.0, None]
    got = ShapesAlignment(metric="f1")([""] * 5, [""] * 5, **kwargs)
    assert got[:4] == pytest.approx([1.0, 2 / 3, 0.8, 0.0])
    assert got[4] is None
    stray = [row[:] for row in image]
    stray[8][8] = 3  # a stray pixel: an unreadable slot breaks exact alignment
    assert ShapesAlignment()([""], [""], images=[stray], caption=captions[:1]) == [0.0]
    assert ShapesAlignment(metric="f1")([""], [""], images=[stray], caption=captions[:1]) == [pytest.approx(0.8)]


def test_shapes_alignment_captioning(shapes: tuple[ShapesWorld, list[dict]]) -> None:
    task, samples = shapes
    r = ShapesAlignment(task, caption_field=None, image_field="image")
    n = len(samples)
    right = [f"<think>looking</think> {s['caption'].upper()}." for s in samples]
    wrong = [s["caption"] for s in _different(samples)]
    images = [s["image"] for s in samples]
    assert r([""] * n, right, image=images, caption=wrong) == [1.0] * n  # the caption field is not read
    assert r([""] * n, wrong, image=images) == [0.0] * n
    assert r([""], ["nothing"], image=[None]) == [None]


def test_shapes_alignment_errors() -> None:
    with pytest.raises(ValueError, match="metric"):
        ShapesAlignment(metric="iou")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="'images'"):
        ShapesAlignment()([""], [""], caption=["nothing"])
    with pytest.raises(ValueError, match="9x9"):
        ShapesAlignment()([""], [""], images=[[[0] * 4] * 4], caption=["nothing"])


# -------------------------------------------------------------------------------------------------------- CLIP


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet (printable stand-ins for all 256 bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP (1 layer, width 32, 30x30 images, 10x10 patches) with a character-level CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny_clip")
    chars = list(_bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per character
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    eos = vocab["<|endoftext|>"]
    text = dict(
        vocab_size=len(vocab),
        max_position_embeddings=64,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=eos,
        pad_token_id=eos,
    )
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config={**text, **common},
        vision_config={**common, "image_size": 30, "patch_size": 10},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def _hand_cosine(path: Path, image: torch.Tensor, text: str) -> float:
    """The cosine of one pair straight through CLIPModel.get_image_features / get_text_features."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    pixels = processor.image_processor(images=[image], return_tensors="pt", do_rescale=False)["pixel_values"]
    tokens = processor.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        image_out = model.get_image_features(pixel_values=pixels)
        text_out = model.get_text_features(**tokens)
    image_emb = image_out if isinstance(image_out, torch.Tensor) else image_out.pooler_output
    text_emb = text_out if isinstance(text_out, torch.Tensor) else text_out.pooler_output
    return float(torch.nn.functional.cosine_similarity(image_emb, text_emb)[0])


def test_clip_score_values(clip_dir: Path) -> None:
    torch.manual_seed(1)
    images = [torch.rand(3, 30, 30) for _ in range(6)]
    texts = ["a red square at the top left", "a blue x", "nothing", "a green plus at the center", "red", "x"]
    r = ClipScore(str(clip_dir), score=0.1, caption_field="caption")
    assert r._model is None  # lazy: nothing loaded before the first call
    got = r([""] * 6, [""] * 6, images=images, caption=texts)
    assert len(got) == 6
    assert all(isinstance(s, float) and 0.0 <= s <= 0.1 for s in got)
    assert any(s > 0 for s in got)  # the tiny random CLIP gives some positive cosines (not all clamped to 0)
    assert r([""] * 6, [""] * 6, images=images, caption=texts) == got  # deterministic
    cos = r.similarities(images, texts)
    assert got == pytest.approx([0.1 * max(c, 0.0) for c in cos.tolist()], abs=1e-7)
    for i in (0, 1):
        assert cos[i].item() == pytest.approx(_hand_cosine(clip_dir, images[i], texts[i]), abs=1e-5)
    # Batches of 2 give the same scores as one batch of 6 (padding does not leak into the text embedding).
    small = ClipScore(str(clip_dir), score=0.1, caption_field="caption", batch_size=2)
    assert small([""] * 6, [""] * 6, images=images, caption=texts) == pytest.approx(got, abs=1e-6)


def test_clip_score_inputs(clip_dir: Path) -> None:
    task = ShapesWorld()
    grid = task.render([("red", "x", 0, 0), ("blue", "plus", 1, 1)])
    caption = task.caption([("red", "x", 0, 0), ("blue", "plus", 1, 1)])
    r = ClipScore(str(clip_dir), score=2.0)  # caption_field=None: the completion is the text
    rgb = PaletteTokenizer().render(torch.tensor([grid]))[0]  # [3, 9, 9]
    enlarged = rgb.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)  # 9 -> 36 >= 30 (nearest, factor 4)
    got = r(
        [""] * 5,
        [caption, f"<think>two shapes</think> {caption}", caption, caption, caption],
        images=[grid, grid, torch.tensor(grid), enlarged, None],
    )
    assert got[4] is None
    assert got[0] == pytest.approx(got[1], abs=1e-6)  # the text after </think> is the caption
    assert got[0] == pytest.approx(got[2], abs=1e-6)  # list grid == int tensor grid
    assert got[0] == pytest.approx(got[3], abs=1e-6)  # a grid is rendered, then enlarged by nearest neighbours
    assert r([""], [caption], images=[None]) == [None]  # nothing to score: the model is not even needed
    long = " ".join(["a red square at the top left"] * 30)  # longer than the 64-position text context: truncated
    assert len(r([""], [long], images=[rgb])) == 1
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        r([""], ["x"], images=[torch.rand(4, 9, 9)])
    with pytest.raises(KeyError, match="'caption'"):
        ClipScore(str(clip_dir), caption_field="caption")([""], [""], images=[grid])


def test_clip_score_pickles_before_and_after_use(clip_dir: Path) -> None:
    r = ClipScore(str(clip_dir), score=0.5, name="clip_t2i", caption_field="caption")
    batch = {"images": [torch.full((3, 30, 30), 0.7), [[1] * 9] * 9], "caption": ["a white square", "red"]}
    before = pickle.loads(pickle.dumps(r))
    expected = r([""] * 2, [""] * 2, **batch)
    assert r._model is not None
    after = pickle.loads(pickle.dumps(r))
    assert after._model is None
    assert after.name == "clip_t2i"
    assert after.score == 0.5
    assert before([""] * 2, [""] * 2, **batch) == expected
    assert after([""] * 2, [""] * 2, **batch) == expected
    assert len(pickle.dumps(r)) < 10_000  # the weights are not in the pickle


def test_clip_score_bad_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_clip"
    with pytest.raises(FileNotFoundError, match="no_such_clip.*local transformers CLIP directory"):
        ClipScore(str(missing))
    with pytest.raises(FileNotFoundError, match="local transformers CLIP directory"):
        ClipScore(str(tmp_path))  # a directory, but no config.json
    with pytest.raises(ValueError, match="batch_size"):
        ClipScore(str(tmp_path), batch_size=0)


# ------------------------------------------------------------------------------------------------------ pickle


def _cases() -> list[tuple[Reward, list[str], dict]]:
    """``(reward, completions, fields)`` of every built-in reward but CLIP (pickled in its own test)."""
    task, small = ShapesWorld(), ShapesWorld(grid_size=2, cell_size=4)
    image = task.render([("red", "x", 0, 0)])
    return [
        (ArithmeticCorrectness(score=2.0), ["<think>x</think> 85", "1"], {"answer": ["85", None]}),
        (ShapesAnswerCorrectness(name="vqa"), ["<think>x</think> Red.", "blue"], {"answer": ["red", "red"]}),
        (ThinkFormat(score=0.5, require_answer=False), ["<think>x</think>", "x"], {}),
        (ShapesAlignment(metric="f1"), ["", ""], {"images": [image, None], "caption": ["a red x at the top left"] * 2}),
        (
            ShapesAlignment(small, image_field="image", caption_field=None),
            ["<think>x</think> a red x at row 1 column 1", "nothing"],
            {"image": [small.render([("red", "x", 0, 0)])] * 2},
        ),
    ]


@pytest.mark.parametrize(("reward", "completions", "fields"), _cases(), ids=lambda v: repr(v)[:40])
def test_rewards_pickle(reward: Reward, completions: list[str], fields: dict) -> None:
    copy = pickle.loads(pickle.dumps(reward))
    assert type(copy) is type(reward)
    assert copy.name == reward.name
    assert repr(copy) == repr(reward)
    got = copy([""] * 2, completions, **fields)
    assert got == reward([""] * 2, completions, **fields)
    assert len(got) == 2
    assert all(s is None or math.isfinite(s) for s in got)
    assert any(s for s in got)  # not all zero or None: the copy really scores
