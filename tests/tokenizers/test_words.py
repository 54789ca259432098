import re

import pytest
import torch

from dllm_zoo.data.parallel import ParallelDataModule
from dllm_zoo.data.synthetic import ShapesWorld
from dllm_zoo.data.synthetic.shapes import COLOR_NAMES, SHAPE_NAMES
from dllm_zoo.tokenizers import ByteTokenizer, TokenLayout, WordTokenizer


def test_words_layout_is_the_default_with_a_larger_text_segment() -> None:
    words, default = TokenLayout.preset("words"), TokenLayout.preset("default")
    assert (words.text_vocab_size, words.vocab_size, words.image_offset) == (512, 576, 512)
    assert (words.mask_id, words.bos_id, words.eos_id, words.pad_id) == (
        default.mask_id,
        default.bos_id,
        default.eos_id,
        default.pad_id,
    )
    assert words.special_tokens == default.special_tokens
    assert words.image_codebook_size == default.image_codebook_size


def test_ids_are_fixed_by_the_vocabulary_not_its_order() -> None:
    tok = WordTokenizer(["top", "red", "the"])
    assert tok.word_ids == {"red": 270, "the": 271, "top": 272, " red": 273, " the": 274, " top": 275}
    assert WordTokenizer(["the", "top", "red", "red"]).word_ids == tok.word_ids


def test_whole_words_only_with_the_leading_space_folded_in() -> None:
    tok = WordTokenizer(["the", "there", "red", "<think>"])
    ids = tok.word_ids
    assert tok.encode("the red") == [ids["the"], ids[" red"]]
    assert tok.encode("there") == [ids["there"]]  # longest entry, not "the" + "re"
    assert tok.encode("thereby") == list(b"thereby")  # not inside a longer word
    assert tok.encode("ab red") == [*b"ab", ids[" red"]]
    assert tok.encode("  red") == [ord(" "), ids[" red"]]
    assert tok.encode("red3") == list(b"red3")
    assert tok.encode("x<think>red") == [ord("x"), ids["<think>"], ids["red"]]  # a non-letter entry needs no gap
    assert tok.encode("the<|eot_id|>") == [ids["the"], tok.layout.token_id("<|eot_id|>")]


def test_round_trips_any_text_and_drops_specials_on_request() -> None:
    tok = WordTokenizer(tasks=[ShapesWorld()])
    for text in ["héllo wörld", "2+3=5 <think>a red x</think>", "", " the  the ", "the\nred"]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|startoftext|>a red x<|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "a red x"
    image_code = int(tok.layout.image_ids(torch.tensor(3)))
    assert tok.decode([*tok.encode("red"), image_code]) == "red"  # image codes are dropped


@pytest.mark.parametrize(
    "settings",
    [{}, {"max_objects": 1}, {"colors": COLOR_NAMES[1:], "shapes": SHAPE_NAMES}, {"grid_size": 4, "max_objects": 5}],
)
def test_shapes_world_text_is_all_whole_words(settings: dict) -> None:
    """Every letter run of every text field is one id: ShapesWorld.vocabulary covers its generator."""
    task = ShapesWorld(**settings)
    tok, byte = WordTokenizer(tasks=[task]), ByteTokenizer()
    letters = set(range(ord("a"), ord("z") + 1)) | set(range(ord("A"), ord("Z") + 1))
    total_words = total_bytes = 0
    for index in range(400):
        sample = task.sample("train", index)
        for key, value in sample.items():
            if not isinstance(value, str):
                continue
            ids = tok.encode(value)
            assert tok.decode(ids) == value
            assert not letters & set(ids), f"{key}={value!r} has a word outside ShapesWorld.vocabulary"
            total_words += len(ids)
            total_bytes += len(byte.encode(value))
    assert total_words * 3 < total_bytes  # several times shorter than bytes


def test_shapes_world_vocabulary_fits_the_words_layout_and_not_the_default() -> None:
    vocab = ShapesWorld().vocabulary
    assert len(set(vocab)) == len(vocab) == 80
    assert re.fullmatch(r"[A-Za-z</>]+", "".join(vocab))
    with pytest.raises(ValueError, match=r"80 words need 160 ids.*layout 'default' has 2 spare"):
        WordTokenizer(tasks=[ShapesWorld()], layout="default")


def test_bad_vocabularies_are_refused() -> None:
    with pytest.raises(ValueError, match="needs words"):
        WordTokenizer()
    with pytest.raises(ValueError, match="hold no spaces"):
        WordTokenizer(["top left"])
    with pytest.raises(ValueError, match="non-empty"):
        WordTokenizer(["", "red"])


def test_parallel_rows_with_words_fit_a_short_text_part(tmp_path) -> None:
    task = ShapesWorld(max_objects=1, num_train=64, num_val=32)
    dm = ParallelDataModule(
        task=task,
        tokenizer=WordTokenizer(tasks=[task]),
        text_len=24,
        batch_size=16,
        cache_dir=str(tmp_path),
        fields={"edit": {"reasoning_field": "edit_brief"}},
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (16, 2 * 81 + 2 * 24 + 5)
    assert int(batch["truncated"].sum()) == 0
    assert int(batch["input_ids"].max()) < dm.layout.vocab_size
