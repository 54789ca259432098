import pytest
import torch

from dllm_zoo.callbacks.multimodal import codes_to_grids
from dllm_zoo.data.multimodal import load_image_codes
from dllm_zoo.data.synthetic import ShapesWorld
from dllm_zoo.tokenizers import ImageTokenizer, PaletteTokenizer, PatchCodebookTokenizer, ShapeSlotTokenizer


def test_shape_slot_codebook_layout() -> None:
    tok = ShapeSlotTokenizer()
    assert isinstance(tok, ImageTokenizer)
    assert (tok.codebook_size, tok.downsample) == (17, 3)
    assert tok.patches[0].sum() == 0  # code 0: the empty slot
    # code 1 + i * len(shapes) + j: shapes[j] in colors[i]; red (palette 1) square, then red ring ...
    assert tok.patches[1].tolist() == [[1, 1, 1]] * 3
    assert tok.patches[2].tolist() == [[1, 1, 1], [1, 0, 1], [1, 1, 1]]
    assert tok.patches[1 + 3 * 4 + 2].tolist() == [[0, 4, 0], [4, 4, 4], [0, 4, 0]]  # yellow (4) plus
    assert dict(tok.state_dict()) == {}  # nothing to load


def test_shapes_world_images_round_trip_through_one_code_per_slot() -> None:
    task, tok = ShapesWorld(), ShapeSlotTokenizer()
    samples = [task.sample("val", i) for i in range(64)]
    grids = torch.tensor([s["image"] for s in samples])
    codes = tok.encode_indices(grids)
    assert codes.shape == (64, 3, 3)
    assert torch.equal(tok.decode_indices(codes), grids)
    # the RGB path agrees with the index path, and with the pipeline's readers
    assert torch.equal(tok.encode(PaletteTokenizer().render(grids)), codes)
    assert torch.equal(codes_to_grids(codes, tok), grids)
    assert torch.equal(load_image_codes(samples[5], tok, "image", 9), codes[5])
    # one non-zero code per object, at its slot
    first = samples[0]["objects"]
    assert int((codes[0] > 0).sum()) == len(first)
    for color, shape, row, col in first:
        assert int(codes[0, row, col]) == 1 + task.colors.index(color) * 4 + task.shapes.index(shape)


def test_every_code_grid_decodes_to_an_image_that_encodes_back() -> None:
    tok = ShapeSlotTokenizer(colors=("blue", "teal"), shapes=("x", "dot", "vbar"), cell_size=4)
    assert (tok.codebook_size, tok.downsample) == (7, 4)
    torch.manual_seed(0)
    codes = torch.randint(0, 7, (5, 2, 3))
    images = tok.decode(codes)
    assert images.shape == (5, 3, 8, 12)
    assert torch.equal(tok.encode(images), codes)


def test_an_image_off_the_codebook_is_refused_with_the_block() -> None:
    tok = ShapeSlotTokenizer()
    grid = torch.zeros(1, 9, 9, dtype=torch.long)
    grid[0, 4, 7] = 1  # a stray red pixel in slot (1, 2)
    with pytest.raises(ValueError, match=r"block \(row 1, col 2\).*ShapeSlotTokenizer"):
        tok.encode_indices(grid)
    with pytest.raises(ValueError, match="not a multiple of the tokenizer's patch 3"):
        tok.encode_indices(torch.zeros(1, 8, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 17\)"):
        tok.decode(torch.full((1, 3, 3), 17))


def test_bad_codebooks_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        PatchCodebookTokenizer([[[0, 0], [0, 0]], [[0, 0], [0, 0]]])
    with pytest.raises(ValueError, match=r"\[K, patch, patch\]"):
        PatchCodebookTokenizer([[[0, 0, 0], [0, 0, 0]]])
    with pytest.raises(ValueError, match="palette indices"):
        PatchCodebookTokenizer([[[0]], [[16]]])
    with pytest.raises(ValueError, match="colors must be names"):
        ShapeSlotTokenizer(colors=("black",))
    with pytest.raises(ValueError, match="unknown shape"):
        ShapeSlotTokenizer(shapes=("star",))
