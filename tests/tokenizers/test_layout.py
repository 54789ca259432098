import pytest
import torch

from dllm_zoo.tokenizers import TokenLayout


def test_mmada_preset_ids_match_research_notes() -> None:
    lay = TokenLayout.preset("mmada")
    assert (lay.mask_id, lay.image_offset, lay.vocab_size) == (126336, 126349, 134656)
    assert (lay.bos_id, lay.eos_id, lay.pad_id, lay.image_codebook_size) == (126080, 126081, 126081, 8192)
    expected = {
        "<|soi|>": 126084,
        "<|eoi|>": 126085,
        "<|sov|>": 126086,
        "<|eov|>": 126087,
        "<|t2i|>": 126088,
        "<|mmu|>": 126089,
        "<|t2v|>": 126090,
        "<|v2v|>": 126091,
        "<|lvg|>": 126092,
        "[iPAD]": 126093,
        "<|r2i|>": 126094,
        "<|interleave|>": 126095,
        "<|t2it|>": 126096,
        "<|start_header_id|>": 126346,
        "<|end_header_id|>": 126347,
        "<|eot_id|>": 126348,
    }
    assert dict(lay.special_tokens) == expected
    # last image code is the last used row; rows 134541..134655 are unused padding
    assert int(lay.image_ids(torch.tensor(8191))) == 134540
    assert "<|lm|>" not in lay.special_tokens  # pure-text samples carry no task token


def test_llada_and_sdar_presets() -> None:
    llada = TokenLayout.preset("llada")
    assert (llada.vocab_size, llada.mask_id, llada.eos_id, llada.token_id("<|eot_id|>")) == (
        126464,
        126336,
        126081,
        126348,
    )
    assert not llada.has_images
    sdar = TokenLayout.preset("sdar")
    assert (sdar.vocab_size, sdar.mask_id, sdar.eos_id, sdar.chat_format) == (151936, 151669, 151643, "chatml")


def test_default_layout_is_byte_level_with_image_segment() -> None:
    lay = TokenLayout.preset("default")
    assert min(lay.special_ids()) == 256
    assert lay.vocab_size == 336
    assert lay.image_offset == 272
    assert lay.image_codebook_size == 64
    ids = torch.tensor([5, 272, 335, 336])
    assert lay.is_image(ids).tolist() == [False, True, True, False]
    assert lay.image_codes(lay.image_ids(torch.tensor([0, 63]))).tolist() == [0, 63]


def test_inconsistent_layouts_are_refused_with_the_field_named() -> None:
    base = TokenLayout.preset("default")
    with pytest.raises(ValueError, match="pad_id == mask_id"):
        base.replace(pad_id=base.mask_id)
    with pytest.raises(ValueError, match="do not fit in vocab_size"):
        base.replace(vocab_size=300)
    with pytest.raises(ValueError, match="mask_id=999"):
        base.replace(mask_id=999)
    with pytest.raises(ValueError, match="unknown token layout 'nope'"):
        TokenLayout.preset("nope")
    with pytest.raises(KeyError, match="has no special token"):
        TokenLayout.preset("llada").token_id("<|soi|>")
