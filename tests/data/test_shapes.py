from __future__ import annotations

import itertools
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dllm_zoo.data.shards import expand_shards
from dllm_zoo.data.synthetic import (
    COLOR_NAMES,
    SHAPE_NAMES,
    ImageReading,
    ShapesWorld,
    SyntheticTask,
    caption_of,
    draw,
    parse_caption,
    parse_r2i_prompt,
    parse_slot,
    read_image,
    render_pattern,
    slot_name,
)

FIELDS = {
    "image",
    "caption",
    "objects",
    "question",
    "answer",
    "cot",
    "prompt",
    "response",
    "text",
    "r2i_prompt",
    "r2i_reasoning",
    "edit_instruction",
    "edit_reasoning",
    "edit_brief",
    "output_image",
    "output_caption",
    "output_objects",
    "question_kind",
    "edit_kind",
}


def objs(sample: dict, field: str = "objects") -> list[tuple]:
    return [tuple(o) for o in sample[field]]


@pytest.fixture(scope="module")
def task() -> ShapesWorld:
    return ShapesWorld(num_train=300, num_val=100)


@pytest.fixture(scope="module")
def samples(task: ShapesWorld) -> list[dict]:
    return list(task.generate("train")) + list(task.generate("val"))


def test_palette_names_match_the_image_tokenizer() -> None:
    try:
        from dllm_zoo.tokenizers.image import DEFAULT_PALETTE
    except ImportError:
        pytest.skip("dllm_zoo.tokenizers.image is not importable")
    assert tuple(name for name, _ in DEFAULT_PALETTE) == COLOR_NAMES


def test_is_a_synthetic_task_with_every_field(task: ShapesWorld, samples: list[dict]) -> None:
    assert isinstance(task, SyntheticTask)
    assert task.name == "shapes"
    assert task.num_samples("train") == 300
    assert task.num_samples("val") == 100
    assert len(samples) == 400
    for s in samples:
        assert set(s) == FIELDS
        assert s["prompt"] == s["question"]
        assert s["response"] == s["cot"]
        assert s["text"] == f"{s['question']} {s['cot']}"
        assert json.loads(json.dumps(s)) == s
    assert task.num_image_tokens == 81
    assert all(len(s["image"]) == 9 and all(len(row) == 9 for row in s["image"]) for s in samples)


def test_first_sample_is_pinned() -> None:
    first = next(ShapesWorld().generate("train"))
    assert first["caption"] == "a blue ring at the top left and a blue square at the bottom right"
    assert first["cot"] == "<think>top left: blue ring; bottom right: blue square.</think> ring"


def test_generation_is_seeded(task: ShapesWorld, samples: list[dict]) -> None:
    again = ShapesWorld(num_train=300, num_val=100)
    assert list(again.generate("train")) + list(again.generate("val")) == samples
    assert task.sample("val", 7) == samples[307]  # random access
    other = list(ShapesWorld(num_train=300, num_val=100, seed=1).generate("train"))
    assert [s["caption"] for s in other] != [s["caption"] for s in samples[:300]]
    assert task.fingerprint() != ShapesWorld(num_train=300, num_val=100, seed=1).fingerprint()
    assert (
        task.fingerprint()
        == ShapesWorld(num_train=300, num_val=100, colors=["red", "green", "blue", "yellow"]).fingerprint()
    )


def test_train_and_val_never_share_an_image() -> None:
    task = ShapesWorld(num_train=3000, num_val=300, seed=4)
    train = {tuple(map(tuple, s["objects"])) for s in task.generate("train")}
    val = {tuple(map(tuple, s["objects"])) for s in task.generate("val")}
    assert not train & val
    assert {len(o) for o in val} == {1, 2}


def test_distributions_cover_every_kind(samples: list[dict]) -> None:
    assert {s["question_kind"] for s in samples} == {"color", "shape", "count", "where"}
    assert {s["edit_kind"] for s in samples} == {"move", "recolor", "reshape", "remove", "add"}
    assert {len(s["objects"]) for s in samples} == {1, 2}
    assert {o[0] for s in samples for o in s["objects"]} == {"red", "green", "blue", "yellow"}
    assert {o[1] for s in samples for o in s["objects"]} == {"square", "ring", "plus", "x"}


@pytest.mark.parametrize("cell_size", [3, 4, 5, 6, 7, 8])
def test_patterns_are_distinct_and_symmetric(cell_size: int) -> None:
    patterns = {shape: render_pattern(shape, cell_size) for shape in SHAPE_NAMES}
    frozen = {tuple(map(tuple, p)) for p in patterns.values()}
    assert len(frozen) == len(SHAPE_NAMES)
    for p in patterns.values():
        assert len(p) == cell_size
        assert all(len(row) == cell_size for row in p)
        assert any(any(row) for row in p)
        assert p == p[::-1]  # symmetric top to bottom …
        assert p == [row[::-1] for row in p]  # … and left to right


def test_pattern_pictures() -> None:
    def art(shape: str, n: int) -> list[str]:
        return ["".join("#" if v else "." for v in row) for row in render_pattern(shape, n)]

    assert art("square", 3) == ["###", "###", "###"]
    assert art("ring", 3) == ["###", "#.#", "###"]
    assert art("plus", 3) == [".#.", "###", ".#."]
    assert art("x", 3) == ["#.#", ".#.", "#.#"]
    assert art("plus", 4) == [".##.", "####", "####", ".##."]
    assert art("x", 4) == ["#..#", ".##.", ".##.", "#..#"]
    with pytest.raises(ValueError, match="unknown shape"):
        render_pattern("circle", 3)
    with pytest.raises(ValueError, match="cell_size"):
        render_pattern("ring", 2)


def test_slot_names() -> None:
    assert [slot_name(r, c, 3) for r in range(3) for c in range(3)] == [
        "top left",
        "top",
        "top right",
        "left",
        "center",
        "right",
        "bottom left",
        "bottom",
        "bottom right",
    ]
    assert slot_name(3, 0, 4) == "row 4 column 1"
    for g in (2, 3, 4, 5):
        for r, c in itertools.product(range(g), repeat=2):
            assert parse_slot(slot_name(r, c, g), g) == (r, c)
    assert parse_slot(" Top  Left ", 3) == (0, 0)
    assert parse_slot("row 2 column 3", 3) == (1, 2)
    for bad, g in [("top left", 4), ("row 5 column 1", 4), ("row 0 column 1", 4), ("middle", 3)]:
        with pytest.raises(ValueError, match="names no slot"):
            parse_slot(bad, g)
    with pytest.raises(ValueError, match="off the"):
        slot_name(3, 0, 3)


def test_draw_and_read_round_trip() -> None:
    rng = random.Random(0)
    for _ in range(200):
        g, n = rng.randint(2, 5), rng.randint(3, 6)
        k = rng.randint(0, g * g)
        slots = sorted(rng.sample(range(g * g), k))
        objects = [(rng.choice(COLOR_NAMES[1:]), rng.choice(SHAPE_NAMES), *divmod(s, g)) for s in slots]
        image = draw(objects, g, n)
        assert len(image) == g * n
        assert read_image(image, g, n) == ImageReading(objects, 0)
    objects = [("red", "square", 0, 0), ("blue", "plus", 1, 1)]
    image = draw(objects)
    assert read_image(torch.tensor(image)).objects == objects
    assert read_image(np.array(image, dtype=np.int64)).objects == objects


def test_read_image_flags_broken_slots() -> None:
    image = draw([("red", "square", 0, 0), ("blue", "plus", 1, 1), ("green", "x", 2, 2)])
    image[0][0] = 2  # two colours in one slot
    image[3][3] = 3  # a plus with a stray pixel
    image[0][8] = 5  # a lone pixel in an empty slot
    reading = read_image(image)
    assert reading.objects == [("green", "x", 2, 2)]
    assert reading.unreadable == 3
    assert not reading.clean
    image = draw([("red", "ring", 0, 0)])
    image[1][1] = 99  # outside the palette
    assert read_image(image) == ImageReading([], 1)
    only_squares = read_image(draw([("red", "ring", 0, 0), ("red", "square", 0, 1)]), shapes=("square",))
    assert only_squares == ImageReading([("red", "square", 0, 1)], 1)
    with pytest.raises(ValueError, match="9x9"):
        read_image([[0] * 8] * 9)


def test_draw_rejects_invalid_objects() -> None:
    with pytest.raises(ValueError, match="colour"):
        draw([("black", "ring", 0, 0)])
    with pytest.raises(ValueError, match="unknown shape"):
        draw([("red", "circle", 0, 0)])
    with pytest.raises(ValueError, match="off the"):
        draw([("red", "ring", 3, 0)])
    with pytest.raises(ValueError, match="two objects"):
        draw([("red", "ring", 1, 1), ("blue", "x", 1, 1)])


def test_captions() -> None:
    assert caption_of([("green", "x", 2, 1)]) == "a green x at the bottom"
    two = [("blue", "plus", 1, 1), ("red", "square", 0, 0)]
    assert caption_of(two) == "a red square at the top left and a blue plus at the center"
    three = [*two, ("orange", "ring", 2, 2)]
    assert caption_of(three) == (
        "a red square at the top left, a blue plus at the center and an orange ring at the bottom right"
    )
    assert caption_of([("red", "dot", 0, 1)], grid_size=4) == "a red dot at row 1 column 2"
    assert caption_of([]) == "nothing"
    assert parse_caption("nothing") == []
    assert parse_caption("  A Red Square at the TOP LEFT  and a blue plus at the center. ") == sorted(
        two, key=lambda o: (o[2], o[3])
    )
    assert parse_caption("a red square at the top left, and a blue plus at the center") is not None
    assert parse_caption("a blue plus at the center and a red square at the top left") == parse_caption(caption_of(two))
    for bad in [
        "",
        "a red circle at the top",
        "a black square at the top",
        "a red square at the middle",
        "a red square",
        "red square at the top",
        "a red square at the top and a blue x at the top",  # two shapes in one slot
        "a red square at the top and",
        "a red square at row 1 column 4",
    ]:
        assert parse_caption(bad) is None, bad
    assert parse_caption("a red square at row 1 column 4", grid_size=4) == [("red", "square", 0, 3)]


def test_caption_round_trip(samples: list[dict]) -> None:
    for s in samples:
        assert parse_caption(s["caption"]) == objs(s)
        assert parse_caption(s["output_caption"]) == objs(s, "output_objects")
        assert caption_of(objs(s)) == s["caption"]
    rng = random.Random(1)
    for _ in range(100):
        g = rng.randint(2, 5)
        slots = rng.sample(range(g * g), rng.randint(1, g * g))
        objects = sorted((rng.choice(COLOR_NAMES[1:]), rng.choice(SHAPE_NAMES), *divmod(s, g)) for s in slots)
        assert parse_caption(caption_of(objects, g), g) == sorted(objects, key=lambda o: (o[2], o[3]))


def test_alignment(task: ShapesWorld, samples: list[dict]) -> None:
    for s in samples[:50]:
        assert task.alignment(s["caption"], s["image"])
        assert task.alignment_score(s["caption"], s["image"]) == 1.0
        assert task.alignment(s["output_caption"], s["output_image"])
        assert task.check_image(s["image"], s)
        assert task.check_image(s["output_image"], s, target="output_image")
        assert not task.check_image(s["output_image"], s)  # every edit changes the image
        assert not task.alignment(s["caption"], s["output_image"])
    s = samples[0]
    assert task.alignment(s["caption"].upper() + ".", torch.tensor(s["image"]))
    broken = [row[:] for row in s["image"]]
    broken[4][4] = 7 if broken[4][4] == 0 else 0
    assert not task.alignment(s["caption"], broken)
    assert not task.alignment("gibberish", s["image"])
    assert task.alignment_score("gibberish", s["image"]) == 0.0
    with pytest.raises(ValueError, match="target"):
        task.check_image(s["image"], s, target="caption")


def test_alignment_score_is_f1() -> None:
    task = ShapesWorld()
    caption = "a red square at the top left and a blue plus at the center"
    image = draw([("red", "square", 0, 0), ("green", "plus", 1, 1)])
    assert task.alignment_score(caption, image) == pytest.approx(0.5)  # 1 hit of 2 and 2
    image[8][8] = 3  # an unreadable slot counts as a wrong object
    assert task.alignment_score(caption, image) == pytest.approx(2 / 5)
    image = draw([("red", "square", 0, 0), ("blue", "plus", 1, 1), ("red", "x", 2, 2)])
    assert task.alignment_score(caption, image) == pytest.approx(4 / 5)  # precision 2/3, recall 1
    assert task.alignment_score(caption, draw([])) == 0.0
    assert task.alignment_score("nothing", draw([])) == 1.0
    assert task.alignment("nothing", draw([]))


def test_check(task: ShapesWorld, samples: list[dict]) -> None:
    for s in samples:
        assert task.check(s["cot"], s)
        assert task.check(s["answer"], s)
        assert task.check(f"<think>whatever</think>  {s['answer'].upper()}.", s)
        assert not task.check(f"{s['answer']} or not", s)
        assert not task.check(f"<think>{s['answer']}</think>", s)
    by_kind = {s["question_kind"]: s for s in samples}
    color = by_kind["color"]
    wrong = next(c for c in ("red", "green") if c != color["answer"])
    assert not task.check(f"<think>x</think> {wrong}", color)
    count = by_kind["count"]
    assert count["answer"] == str(len(count["objects"]))
    assert count["question"] == "How many shapes are there?"
    where = by_kind["where"]
    assert where["question"].startswith("Where is the ")
    assert task.check("<think>a</think> b </think> " + where["answer"], where)


def test_question_answers_are_right(samples: list[dict]) -> None:
    for s in samples:
        objects = objs(s)
        listing = "; ".join(f"{slot_name(r, c, 3)}: {color} {shape}" for color, shape, r, c in objects) + "."
        assert s["cot"] == f"<think>{listing}</think> {s['answer']}"
        kind, q = s["question_kind"], s["question"]
        if kind == "count":
            assert s["answer"] == str(len(objects))
        elif kind == "where":
            color, shape = q.removeprefix("Where is the ").removesuffix("?").split()
            matches = [o for o in objects if o[:2] == (color, shape)]
            assert len(matches) == 1  # the question has one answer
            assert s["answer"] == slot_name(matches[0][2], matches[0][3], 3)
        else:
            slot = parse_slot(q.split(" at the ")[1].removesuffix("?"), 3)
            (obj,) = [o for o in objects if o[2:] == slot]
            assert s["answer"] == (obj[0] if kind == "color" else obj[1])


def test_r2i_prompts_resolve_uniquely(task: ShapesWorld, samples: list[dict]) -> None:
    for s in samples:
        assert s["r2i_prompt"].startswith("Draw ")
        assert parse_r2i_prompt(s["r2i_prompt"]) == objs(s)
        assert s["r2i_reasoning"] == f"<think>{s['caption']}</think>"
        assert task.check_reasoning(s["r2i_reasoning"], s)
        assert not task.check_reasoning(s["r2i_reasoning"], s, target="output_image")
    prompts = " ".join(s["r2i_prompt"] for s in samples)
    for template in ("corner opposite", "directly below", "directly above", "left of", "right of", "left to right"):
        assert template in prompts
    assert parse_r2i_prompt(
        "Draw a red square in the corner opposite the bottom right and a blue plus directly below the top."
    ) == [
        ("red", "square", 0, 0),
        ("blue", "plus", 1, 1),
    ]
    assert parse_r2i_prompt("Draw a red x mirroring the top left top to bottom.") == [("red", "x", 2, 0)]
    assert parse_r2i_prompt("Draw a red x directly left of the top right.") == [("red", "x", 0, 1)]
    for bad in [
        "Draw a red x in the corner opposite the top.",  # not a corner
        "Draw a red x directly above the top.",  # off the grid
        "Draw a red x mirroring the center left to right.",  # the middle column mirrors onto itself
        "Draw a red x at the top.",
        "Paint a red x directly above the center.",
        "Draw a red x directly above the center and a blue x directly right of the top left.",  # one slot twice
    ]:
        assert parse_r2i_prompt(bad) is None, bad


def test_check_reasoning(task: ShapesWorld, samples: list[dict]) -> None:
    s = samples[0]
    assert task.check_reasoning(s["caption"], s)  # no think block: the whole text
    assert task.check_reasoning(f"<think>{s['caption']}", s)  # unclosed
    assert task.check_reasoning(f"<think>blah. Result: {s['caption'].upper()}.</think> trailing", s)
    assert not task.check_reasoning("<think>Result: a red square at the top.</think>", s)
    assert not task.check_reasoning("<think></think>", s)


def test_edits_are_valid(task: ShapesWorld, samples: list[dict]) -> None:
    for s in samples:
        before, after = objs(s), objs(s, "output_objects")
        assert s["output_image"] == draw(after)
        assert s["image"] == draw(before)
        assert read_image(s["output_image"]).objects == after
        assert s["output_caption"] == caption_of(after)
        assert after
        assert after != before
        reasoning = s["edit_reasoning"]
        assert reasoning.startswith("<think>")
        assert reasoning.endswith(f" Result: {s['output_caption']}.</think>")
        assert task.check_reasoning(reasoning, s, target="output_image")
        assert task.check_image(s["output_image"], s, target="output_image")


def _named(ref: str, objects: list[tuple]) -> tuple:
    """The object an edit instruction's reference names (``"the red square"`` or ``"the red square at the top"``)."""
    color, shape, *rest = ref.removeprefix("the ").split(" ", 2)
    found = [o for o in objects if o[:2] == (color, shape)]
    if rest:
        found = [o for o in found if o[2:] == parse_slot(rest[0].removeprefix("at the "), 3)]
    (obj,) = found  # the reference is unique
    return obj


def test_edit_instructions_mean_what_they_say(samples: list[dict]) -> None:
    moves = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
    seen = set()
    for s in samples:
        before, after = objs(s), objs(s, "output_objects")
        kind, words = s["edit_kind"], s["edit_instruction"]
        seen.add(kind)
        rest = [o for o in before]
        if kind == "add":
            color, shape, where = words.removeprefix("add a ").removeprefix("add an ").split(" ", 2)
            added = (color, shape, *parse_slot(where.removeprefix("at the "), 3))
            assert added[2:] not in {o[2:] for o in before}  # onto an empty slot
            expected = [*before, added]
        elif kind == "move":
            ref, direction = words.removeprefix("move ").rsplit(" ", 1)
            obj = _named(ref, before)
            rest.remove(obj)
            dr, dc = moves[direction]
            moved = (obj[0], obj[1], obj[2] + dr, obj[3] + dc)
            assert 0 <= moved[2] < 3
            assert 0 <= moved[3] < 3
            assert moved[2:] not in {o[2:] for o in rest}
            expected = [*rest, moved]
        elif kind == "recolor":
            ref, color = words.removeprefix("make ").rsplit(" ", 1)
            obj = _named(ref, before)
            assert color != obj[0]
            rest.remove(obj)
            expected = [*rest, (color, *obj[1:])]
        elif kind == "reshape":
            ref, shape = words.removeprefix("turn ").split(" into ")
            shape = shape.split(" ")[1]
            obj = _named(ref, before)
            assert shape != obj[1]
            rest.remove(obj)
            expected = [*rest, (obj[0], shape, *obj[2:])]
        else:
            assert kind == "remove"
            obj = _named(words.removeprefix("remove "), before)
            rest.remove(obj)
            expected = rest
        assert sorted(expected, key=lambda o: o[2:]) == after, s
    assert seen == {"move", "recolor", "reshape", "remove", "add"}


def test_ambiguous_references_name_the_slot() -> None:
    task = ShapesWorld(colors=("red",), shapes=("x",), max_objects=9)
    rng = random.Random(0)
    kinds = set()
    for _ in range(50):
        objects = [("red", "x", 0, 0), ("red", "x", 1, 1)]
        s = task.make_sample(objects, rng)
        kinds.add(s["edit_kind"])
        assert s["edit_kind"] in ("move", "remove", "add")  # one colour and one shape: no recolor or reshape
        if s["edit_kind"] != "add":
            assert " at the " in s["edit_instruction"]
        assert s["question_kind"] != "where"  # no colour-shape pair is unique
    assert kinds == {"move", "remove", "add"}
    full = task.make_sample([("red", "x", r, c) for r in range(3) for c in range(3)], rng)
    assert full["edit_kind"] == "remove"  # nothing can move or be added


def test_other_grid_and_cell_sizes() -> None:
    task = ShapesWorld(grid_size=4, cell_size=4, max_objects=5, colors=COLOR_NAMES[1:], shapes=SHAPE_NAMES, seed=3)
    assert task.image_side == 16
    for i in range(100):
        s = task.sample("train", i)
        assert len(s["image"]) == 16
        assert read_image(s["image"], 4, 4).objects == objs(s)
        assert parse_caption(s["caption"], 4) == objs(s)
        assert parse_r2i_prompt(s["r2i_prompt"], 4) == objs(s)
        assert task.check(s["cot"], s)
        assert task.check_image(s["image"], s)
        assert task.check_image(s["output_image"], s, target="output_image")
        assert task.check_reasoning(s["edit_reasoning"], s, target="output_image")
        assert s["edit_brief"] == f"<think>Result: {s['output_caption']}.</think>"
        assert task.check_reasoning(s["edit_brief"], s, target="output_image")
        assert "top" not in s["caption"]
        assert "row " in s["caption"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid_size": 1}, "grid_size"),
        ({"cell_size": 2}, "cell_size"),
        ({"max_objects": 0}, "max_objects"),
        ({"max_objects": 10}, "max_objects"),
        ({"colors": ()}, "colors"),
        ({"colors": ("red", "red")}, "colors"),
        ({"colors": ("black", "red")}, "colors"),
        ({"colors": ("crimson",)}, "colors"),
        ({"shapes": ()}, "shapes"),
        ({"shapes": ("circle",)}, "shapes"),
        ({"shapes": ("x", "x")}, "shapes"),
        ({"num_train": 0}, "num_train"),
        ({"num_val": 0}, "num_val"),
    ],
)
def test_knob_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ShapesWorld(**kwargs)


def test_bad_split() -> None:
    task = ShapesWorld(num_train=2, num_val=2)
    with pytest.raises(ValueError, match="split"):
        task.num_samples("test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split"):
        task.sample("test", 0)  # type: ignore[arg-type]


def test_ensure_shards_round_trip(tmp_path: Path) -> None:
    task = ShapesWorld(num_train=64, num_val=16)
    specs = task.ensure_shards(tmp_path)
    assert task.ensure_shards(tmp_path) == specs
    assert task.cache_path(tmp_path).name == f"shapes-{task.fingerprint()}"
    manifest = json.loads((task.cache_path(tmp_path) / "manifest.json").read_text())
    assert manifest["settings"] == task.settings()
    for split in ("train", "val"):
        read = []
        for path in expand_shards(specs[split]):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    assert member.name.endswith(".json")
                    read.append(json.loads(tar.extractfile(member).read()))  # type: ignore[union-attr]
        assert read == list(task.generate(split))
        assert len(read) == task.num_samples(split)


def test_pixel_alignment_score_is_one_exactly_when_aligned(task: ShapesWorld, samples: list[dict]) -> None:
    for s in samples[:50]:
        assert task.pixel_alignment_score(s["caption"], s["image"]) == 1.0
        moved = task.pixel_alignment_score(s["caption"], s["output_image"])
        assert (moved == 1.0) == task.alignment(s["caption"], s["output_image"])
    square = draw([("red", "square", 0, 0)])  # 9 drawn pixels
    caption = "a red square at the top left"
    assert task.pixel_alignment_score(caption, draw([("blue", "square", 0, 0)])) == 0.0  # every pixel off-colour
    half = [row[:] for row in square]
    half[0] = [0] * 9  # the top row of the square (3 pixels) not drawn: 2·6 / (6 + 9)
    assert task.pixel_alignment_score(caption, half) == pytest.approx(12 / 15)
    unknown = [row[:] for row in square]
    unknown[0][:3] = [-1, -1, 99]  # values outside the palette (a still-masked code, a stray id) are not drawn
    assert task.pixel_alignment_score(caption, unknown) == pytest.approx(12 / 15)
    assert task.pixel_alignment_score(caption, torch.tensor(square)) == 1.0
    assert task.pixel_alignment_score("nothing", draw([])) == 1.0
    assert task.pixel_alignment_score("gibberish", square) == 0.0
