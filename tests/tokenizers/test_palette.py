import pytest
import torch

from dllm_zoo.tokenizers import DEFAULT_PALETTE, ImageTokenizer, PaletteTokenizer


def test_default_palette_attributes() -> None:
    tok = PaletteTokenizer()
    assert isinstance(tok, ImageTokenizer)
    assert (tok.codebook_size, tok.downsample) == (len(DEFAULT_PALETTE), 1) == (16, 1)
    assert tok.colors.shape == (16, 3)
    assert tok.colors[1].tolist() == pytest.approx([230 / 255, 25 / 255, 25 / 255])
    # the palette is not part of the state dict (nothing to load)
    assert dict(tok.state_dict()) == {}


@pytest.mark.parametrize("patch", [1, 2])
def test_round_trip_codes_image_codes(patch: int) -> None:
    tok = PaletteTokenizer(patch=patch)
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (3, 4, 5))
    images = tok.decode(codes)
    assert images.shape == (3, 3, 4 * patch, 5 * patch)
    assert float(images.min()) >= 0.0
    assert float(images.max()) <= 1.0
    again = tok.encode(images)
    assert again.dtype == torch.int64
    assert torch.equal(again, codes)
    # every pixel of a block carries its code's colour
    assert torch.equal(images[0, :, :patch, :patch], tok.colors[codes[0, 0, 0]].view(3, 1, 1).expand(3, patch, patch))


def test_encode_tolerates_small_noise_only() -> None:
    tok = PaletteTokenizer(tolerance=2.0)
    codes = torch.tensor([[[1, 2], [3, 0]]])
    images = tok.decode(codes)
    assert torch.equal(tok.encode(images + 1.5 / 255), codes)
    with pytest.raises(ValueError, match="not one palette colour"):
        tok.encode(images + 3.0 / 255)


def test_encode_indices_matches_encode_of_render() -> None:
    grids = [[[0, 1, 1, 0], [2, 2, 3, 3]]]
    tok1 = PaletteTokenizer()
    assert tok1.encode_indices(grids).tolist() == grids
    tok2 = PaletteTokenizer(patch=2)
    grid2 = torch.tensor([[[5, 5, 7, 7], [5, 5, 7, 7]]])
    assert tok2.encode_indices(grid2).tolist() == [[[5, 7]]]
    assert torch.equal(tok2.encode_indices(grid2), tok2.encode(tok2.render(grid2)))
    with pytest.raises(ValueError, match=r"palette grids must be \[B, H, W\]"):
        tok1.encode_indices([[0, 1]])
    with pytest.raises(ValueError, match=r"palette indices must lie in \[0, 16\)"):
        tok1.encode_indices([[[0, 16]]])


def test_non_palette_pixel_names_the_block() -> None:
    tok = PaletteTokenizer(patch=2)
    images = tok.decode(torch.zeros(2, 3, 3, dtype=torch.long))
    images[1, :, 3, 4] = torch.tensor([0.5, 0.5, 0.5])  # pixel (3, 4) -> block (1, 2) of image 1
    with pytest.raises(ValueError, match=r"image 1, block \(row 1, col 2\) of 2x2 pixels is not one palette colour"):
        tok.encode(images)


def test_mixed_palette_colours_in_one_block_are_refused() -> None:
    tok = PaletteTokenizer(patch=2)
    grid = torch.tensor([[[1, 1], [1, 2]]])  # two palette colours in the single 2x2 block
    with pytest.raises(ValueError, match=r"image 0, block \(row 0, col 0\)"):
        tok.encode(tok.render(grid))


def test_bad_inputs() -> None:
    tok = PaletteTokenizer(patch=2)
    with pytest.raises(ValueError, match="not a multiple of the tokenizer's downsample 2"):
        tok.encode(torch.zeros(1, 3, 3, 4))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tok.encode(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        tok.decode(torch.tensor([[[16]]]))
    with pytest.raises(ValueError, match=r"\[B, h, w\] grid"):
        tok.decode(torch.tensor([[1, 2]]))


def test_custom_palettes_and_bad_palette_args() -> None:
    named = PaletteTokenizer([("a", (0, 0, 0)), ("b", (255, 255, 255))])
    plain = PaletteTokenizer([(0, 0, 0), (255, 255, 255)])
    assert named.codebook_size == plain.codebook_size == 2
    assert torch.equal(named.colors, plain.colors)
    assert plain.decode(torch.tensor([[[1]]])).flatten().tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="at least one palette colour"):
        PaletteTokenizer([])
    with pytest.raises(ValueError, match="RGB triples in 0..255"):
        PaletteTokenizer([(0, 0, 256)])
    with pytest.raises(ValueError, match="RGB triples in 0..255"):
        PaletteTokenizer([(0, -1, 0)])
    with pytest.raises(ValueError, match="RGB triples in 0..255"):
        PaletteTokenizer([(0, 0)])
    with pytest.raises(ValueError, match="patch must be >= 1"):
        PaletteTokenizer(patch=0)
