import pickle

import pytest
import torch

from dllm_zoo.data import Arithmetic, PromptDataModule
from dllm_zoo.data.prompts import CollatePrompts, EncodePrompt, left_pad, prompt_token_ids
from dllm_zoo.data.stream import SampleDropped
from dllm_zoo.evaluation import encode_prompts
from dllm_zoo.tokenizers.text import ByteTokenizer


def test_left_pad_right_aligns_prompts() -> None:
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_encode_prompt_keeps_fields_and_refuses_long_prompts() -> None:
    tok = ByteTokenizer()
    enc = pickle.loads(pickle.dumps(EncodePrompt(tok, "prompt", chat=True, max_prompt_len=64, task_name="arithmetic")))
    item = enc({"prompt": "1+2=?", "answer": "3", "__key__": "k0"})
    assert item["prompt_ids"].tolist() == prompt_token_ids(tok, "1+2=?", chat=True)
    assert item["fields"] == {"prompt": "1+2=?", "answer": "3", "task": "arithmetic"}  # no stream-internal keys
    with pytest.raises(SampleDropped, match="--data.max_prompt_len=4"):
        EncodePrompt(tok, "prompt", chat=True, max_prompt_len=4)({"prompt": "1+2=?"})
    with pytest.raises(KeyError, match="--data.prompt_field"):
        enc({"question": "1+2=?"})
    batch = CollatePrompts(pad_id=tok.layout.pad_id)([item, enc({"prompt": "10+20=?", "answer": "30"})])
    assert batch["prompts"] == ["1+2=?", "10+20=?"]
    assert batch["fields"]["answer"] == ["3", "30"]
    ids, mask = encode_prompts(tok, ["1+2=?", "10+20=?"])  # the evaluation helper encodes the same way
    assert torch.equal(batch["prompt_ids"], ids)
    assert torch.equal(batch["prompt_mask"], mask)


def test_prompt_datamodule_batches_from_a_synthetic_task() -> None:
    dm = PromptDataModule(task=Arithmetic(num_train=40, num_val=6, max_operand=9), batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompt_ids"].shape[0] == 4
    assert batch["prompt_mask"][:, -1].all()
    assert set(batch["fields"]) >= {"answer", "prompt", "task"}
    assert batch["fields"]["task"] == ["arithmetic"] * 4
    val = [b for b in dm.val_dataloader()]
    assert sum(len(b["prompts"]) for b in val) == 6
    with pytest.raises(ValueError, match="--data.format"):
        PromptDataModule(format="t2i")
