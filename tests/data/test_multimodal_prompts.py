import pickle

import pytest
import torch

from dllm_zoo.data import MultimodalPromptDataModule
from dllm_zoo.data.multimodal import mmu_prompt_ids, t2i_prefix
from dllm_zoo.data.prompts import EncodeMultimodalPrompt
from dllm_zoo.data.stream import KeyedChoice, SampleDropped
from dllm_zoo.data.synthetic import ShapesWorld
from dllm_zoo.tokenizers import ByteTokenizer, PaletteTokenizer

TASK = ShapesWorld(num_train=64, num_val=16)


def test_keyed_choice_is_a_pure_function_of_seed_and_key_with_the_given_odds() -> None:
    choice = KeyedChoice({"a": 3.0, "b": 1.0}, seed=5)
    keys = [{"__key__": f"{i:09d}"} for i in range(2000)]
    draws = [choice.choose(k) for k in keys]
    assert draws == [pickle.loads(pickle.dumps(choice)).choose(k) for k in keys]  # workers agree
    assert 0.70 < draws.count("a") / len(draws) < 0.80
    assert draws != [KeyedChoice({"a": 3.0, "b": 1.0}, seed=6).choose(k) for k in keys]
    with pytest.raises(ValueError, match="weights > 0"):
        KeyedChoice({"a": 0.0})


def test_encode_multimodal_prompt_builds_the_mmu_and_t2i_prompts_the_mmada_stages_train_on() -> None:
    tok, img = ByteTokenizer(), PaletteTokenizer()
    sample = TASK.sample("train", 0)
    only_mmu = EncodeMultimodalPrompt(tok, img, 9, {"mmu": 1.0}, text_len=96, max_prompt_len=256)
    item = only_mmu({**sample, "__key__": "000000000"})
    image_ids = [tok.layout.image_offset + c for row in sample["image"] for c in row]
    assert item["prompt_ids"].tolist() == mmu_prompt_ids(tok, image_ids, sample["question"])
    assert item["fields"]["task"] == "mmu"
    assert item["prompt"] == sample["question"]
    only_t2i = pickle.loads(pickle.dumps(EncodeMultimodalPrompt(tok, img, 9, {"t2i": 1.0}, 96, 256)))
    item = only_t2i({**sample, "__key__": "000000000"})
    prefix, pads, _ = t2i_prefix(tok.encode(sample["caption"]), tok.layout, 96)
    assert item["prompt_ids"].tolist() == prefix[pads:]  # <|t2i|> BOS caption EOS; the collate left-pads
    assert item["fields"]["task"] == "t2i"
    assert item["prompt"] == sample["caption"]
    with pytest.raises(SampleDropped, match="--data.max_prompt_len=20"):
        EncodeMultimodalPrompt(tok, img, 9, {"mmu": 1.0}, 96, 20)(sample)
    with pytest.raises(KeyError, match="--data.caption_field"):
        only_t2i({"question": "q"})
    with pytest.raises(ValueError, match="unknown kind"):
        EncodeMultimodalPrompt(tok, img, 9, {"edit": 1.0}, 96, 256)


def test_multimodal_prompt_datamodule_mixes_both_kinds_in_one_left_padded_batch(tmp_path: object) -> None:
    dm = MultimodalPromptDataModule(task=TASK, batch_size=8, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    kinds = batch["fields"]["task"]
    assert set(kinds) == {"mmu", "t2i"}
    lay = dm.tokenizer.layout
    for row, mask, kind in zip(batch["prompt_ids"], batch["prompt_mask"], kinds):
        first = int(mask.float().argmax())  # left-padded: real tokens are a suffix
        assert bool(mask[first:].all())
        head = lay.token_id("<|mmu|>") if kind == "mmu" else lay.token_id("<|t2i|>")
        assert int(row[first]) == head
    assert dm.num_image_tokens == 81
    val = next(iter(dm.val_dataloader()))
    assert val["prompt_ids"].shape[0] == 8
    assert batch["prompt_mask"].dtype == torch.bool
    with pytest.raises(ValueError, match="unknown kind"):
        MultimodalPromptDataModule(task=TASK, tasks={"mmu": 1.0, "edit": 1.0})
