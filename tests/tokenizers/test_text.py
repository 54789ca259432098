from pathlib import Path

import pytest

from dllm_zoo.tokenizers import ByteTokenizer, HFTextTokenizer, TokenLayout


def test_byte_tokenizer_round_trip_and_specials() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo<|eot_id|>x")
    assert ids == [104, 195, 169, 108, 108, 111, tok.layout.token_id("<|eot_id|>"), 120]
    assert tok.decode(ids) == "héllo<|eot_id|>x"
    assert tok.decode(ids, skip_special_tokens=True) == "héllox"
    # image codes never decode to text
    assert tok.decode([104, tok.layout.image_offset or 0, 105]) == "hi"


def test_chat_template_llama3() -> None:
    tok = ByteTokenizer()
    lay = tok.layout
    ids = tok.encode_chat([{"role": "user", "content": "1+1"}], add_generation_prompt=True)
    sh, eh, eot = lay.token_id("<|start_header_id|>"), lay.token_id("<|end_header_id|>"), lay.token_id("<|eot_id|>")
    expected = [lay.bos_id, sh, *b"user", eh, 10, *b"1+1", eot, sh, *b"assistant", eh, 10]
    assert ids == expected


@pytest.fixture(scope="module")
def local_hf_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WordLevel tokenizer trained here with `tokenizers` and saved as a transformers directory."""
    from transformers import PreTrainedTokenizerFast

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<|eot_id|>"])
    raw.train_from_iterator(["one plus one is two", "two plus two is four"] * 10, trainer)
    path = tmp_path_factory.mktemp("hf_tok")
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(str(path))
    return path


def test_hf_tokenizer_wrapper_over_local_directory(local_hf_tokenizer: Path) -> None:
    tok = HFTextTokenizer(local_hf_tokenizer, layout="default")
    ids = tok.encode("one plus two")
    assert len(ids) == 3
    assert all(i < tok.layout.text_vocab_size for i in ids)
    assert tok.decode(ids) == "one plus two"
    # the mask id and image codes are dropped when decoding a canvas
    assert tok.decode([*ids, tok.layout.mask_id, tok.layout.image_offset or 0]) == "one plus two"


def test_hf_tokenizer_errors(local_hf_tokenizer: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTextTokenizer(tmp_path / "missing", layout="default")
    tiny = TokenLayout.preset("default").replace(
        text_vocab_size=4,
        vocab_size=4,
        mask_id=3,
        bos_id=0,
        eos_id=1,
        pad_id=1,
        special_tokens={},
        image_offset=None,
        image_codebook_size=0,
    )
    with pytest.raises(ValueError, match="reserves only"):
        HFTextTokenizer(local_hf_tokenizer, layout=tiny)
