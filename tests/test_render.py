"""`peering.render`: colours, scales, shapes, layouts and atomic files, checked pixel by pixel."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from peering.render import (
    _draw,
    confusion_panels,
    diverging,
    explanation_image,
    film_strip,
    grid,
    morphs,
    portrait_row,
    save_gif,
    save_png,
    to_rgb,
)

PAD = _draw._PAD
GAP = _draw._GAP


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    return rgb.double() @ torch.tensor([0.2126, 0.7152, 0.0722], dtype=torch.float64)


def zoomed(x: torch.Tensor, zoom: int) -> torch.Tensor:
    return x.repeat_interleave(zoom, -3).repeat_interleave(zoom, -2)


def panel_tile(panels: torch.Tensor, t: int, n_tiles: int, h: int, w: int) -> torch.Tensor:
    """Tile t of panels [N, H', W', 3] laid out by render (without notes): tiles at the bottom, centred in
    equal cells ``GAP`` apart, ``PAD`` from the edges."""
    gap = GAP if n_tiles > 1 else PAD
    step = (panels.shape[2] - 2 * PAD + gap) // n_tiles
    cell_w = step - gap
    x0 = PAD + t * step + (cell_w - w) // 2
    y0 = panels.shape[1] - PAD - h
    return panels[:, y0 : y0 + h, x0 : x0 + w]


def confusion_inputs(n=4, shape=(1, 28, 28), seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        images=torch.rand(n, *shape, generator=g),
        grad_a=torch.randn(n, *shape, generator=g),
        grad_b=torch.randn(n, *shape, generator=g) * 0.5,
        class_a=torch.randint(0, 10, (n,), generator=g),
        class_b=torch.randint(0, 10, (n,), generator=g),
        prob_a=torch.rand(n, generator=g) / 2,
        prob_b=torch.rand(n, generator=g) / 2,
        labels=torch.randint(0, 10, (n,), generator=g),
        projection_factor=0.3,
    )


def morph_result(n_frames=20, batch=2, shape=(1, 28, 28)):
    return SimpleNamespace(
        frames=torch.rand(n_frames, batch, *shape),
        frame_steps=torch.arange(n_frames) * 5,
        targets=torch.tensor([3, 8, 1][:batch]),
        probabilities=torch.rand(batch, 10).softmax(1),
    )


# ------------------------------------------------------------------------------------------------- colours


def test_the_written_out_colour_table_is_matplotlibs_cividis():
    import matplotlib
    import numpy as np

    rgba = matplotlib.colormaps["cividis"](np.linspace(0.0, 1.0, 256))
    assert np.array_equal(_draw._lut_np(), np.round(rgba[:, :3] * 255.0).astype(np.uint8))
    assert _draw._font()[1]  # DejaVu Sans found in matplotlib's data folder, without importing it


def test_colour_ordering_and_middle():
    lut = _draw._lut()
    assert lut.shape == (256, 3) and lut.dtype == torch.uint8
    out = diverging(torch.tensor([[-1.0, 0.0, 1.0]]))  # one [H=1, W=3] map
    assert out.shape == (1, 3, 3) and out.dtype == torch.uint8
    lum = luminance(out[0])
    assert lum[0] < lum[1] < lum[2]
    assert torch.equal(out[0, 0], lut[0]) and torch.equal(out[0, 2], lut[255])
    assert torch.equal(out[0, 1], lut[128])  # zero: the middle of the table
    # cividis ends: dark blue for -1 (remove intensity), bright yellow for +1 (add intensity)
    assert out[0, 0, 2] > out[0, 0, 0] and out[0, 2, 0] > out[0, 2, 2]
    mid = (luminance(lut[0]) + luminance(lut[255])) / 2
    assert float(luminance(lut[128])) == pytest.approx(float(mid), rel=0.05)


def test_sign_symmetry():
    lut = _draw._lut()
    k = torch.arange(-128, 128, dtype=torch.float32)
    v = ((k + 0.5) / 128).reshape(16, 16)  # bin centres, away from quantisation edges
    pos, neg = diverging(v, scale=1.0), diverging(-v, scale=1.0)
    idx = (k + 128).long().reshape(16, 16)
    assert torch.equal(pos, lut[idx])
    assert torch.equal(neg, lut[255 - idx])
    # the default scale is the same for a map and its negative, so their colours mirror around the middle
    a = torch.randn(20, 20)
    idx = ((a / a.abs().max() + 1) * 128).floor().long().clamp(max=255)
    assert torch.equal(diverging(a), lut[idx])
    assert torch.equal(diverging(-a), lut[255 - idx])


# --------------------------------------------------------------------------------------------------- scales


def test_all_zero_map_is_neutral_not_nan():
    lut = _draw._lut()
    out = diverging(torch.zeros(2, 1, 5, 5))
    assert torch.equal(out, lut[128].expand(2, 5, 5, 3))
    out = diverging(torch.zeros(5, 5), scale=0.0)
    assert torch.equal(out, lut[128].expand(5, 5, 3))
    # NaN (a sample explain skipped) is neutral too and does not spoil the rest of the map
    a = torch.tensor([[float("nan"), 1.0, -1.0]])
    out = diverging(a)
    assert torch.equal(out[0], torch.stack([lut[128], lut[255], lut[0]]))


def test_default_scale_is_per_map_and_explicit_scale_clips():
    lut = _draw._lut()
    a = torch.zeros(2, 1, 2)
    a[0, 0, 0], a[1, 0, 0] = 1.0, 100.0
    out = diverging(a)
    assert torch.equal(out[0, 0, 0], lut[255]) and torch.equal(out[1, 0, 0], lut[255])  # each to its max
    out = diverging(a, scale=torch.tensor([100.0, 100.0]))  # one scale per map, broadcast
    assert torch.equal(out[0, 0, 0], lut[floor_index(0.01)]) and torch.equal(out[1, 0, 0], lut[255])
    with pytest.raises(ValueError, match="broadcast"):
        diverging(a, scale=torch.ones(2, 1))  # [2, 1] would silently broadcast to [2, 2, H, W]
    out = diverging(torch.tensor([[-5.0, 5.0, 0.5]]), scale=1.0)  # clipped to [-1, 1]
    assert torch.equal(out[0, 0], lut[0]) and torch.equal(out[0, 1], lut[255])
    assert torch.equal(out[0, 2], lut[floor_index(0.5)])


def floor_index(v: float) -> int:
    return min(255, int((v + 1) * 128))


def test_channels_are_summed_with_sign():
    a = torch.randn(2, 3, 8, 8)  # batch of 2 RGB attributions
    assert torch.equal(diverging(a), diverging(a.sum(1)))
    assert torch.equal(diverging(a[0]), diverging(a[0].sum(0)))
    assert torch.equal(diverging(a[:, :1]), diverging(a[:, 0]))
    cancel = torch.stack([torch.ones(8, 8), -torch.ones(8, 8), torch.zeros(8, 8)])  # [3, 8, 8]: sums to 0
    assert torch.equal(diverging(cancel), _draw._lut()[128].expand(8, 8, 3))


# --------------------------------------------------------------------------------------------------- shapes


def test_shapes_batched_and_flat():
    assert diverging(torch.randn(2, 4, 3, 28, 28)).shape == (2, 4, 28, 28, 3)
    assert diverging(torch.randn(5, 1, 28, 28)).shape == (5, 28, 28, 3)
    assert diverging(torch.randn(28, 28)).shape == (28, 28, 3)
    assert diverging(torch.randn(64)).shape == (8, 8, 3)
    assert diverging(torch.randn(784)).shape == (28, 28, 3)
    assert diverging(torch.randn(6, 64), flat=True).shape == (6, 8, 8, 3)
    assert diverging(torch.randn(6, 2, 784), flat=True).shape == (6, 2, 28, 28, 3)
    assert diverging(torch.randn(10)).shape == (1, 10, 3)  # not a square: a strip
    assert to_rgb(torch.rand(5, 3, 28, 28)).shape == (5, 28, 28, 3)
    assert to_rgb(torch.rand(64)).shape == (8, 8, 3)
    assert to_rgb(torch.rand(4, 784), flat=True).shape == (4, 28, 28, 3)
    v = torch.rand(64)
    assert torch.equal(diverging(v), diverging(v.reshape(8, 8)))


def test_to_rgb_values():
    x = torch.tensor([[[0.0, 1.0, 0.5, -3.0, 7.0, float("nan")]]])  # [1, 1, 6]
    out = to_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 6, 3)
    assert out[0, :, 0].tolist() == [0, 255, 128, 0, 255, 0]
    assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 0], out[..., 2])  # grey
    rgb = torch.rand(3, 4, 4)
    assert torch.equal(to_rgb(rgb), (rgb * 255).round().to(torch.uint8).permute(1, 2, 0))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        _draw._rgb(torch.rand(2, 4, 5, 5), sample_ndim=3)


def test_grid_size_arithmetic_and_placement():
    tiles = torch.randint(0, 255, (7, 5, 6, 3), dtype=torch.uint8)
    out = grid(tiles, nrow=3, pad=2, zoom=2, pad_value=17)
    h, w = 10, 12
    assert out.shape == (3 * (h + 2) + 2, 3 * (w + 2) + 2, 3)
    for i in range(7):
        r, c = divmod(i, 3)
        y, x = 2 + r * (h + 2), 2 + c * (w + 2)
        assert torch.equal(out[y : y + h, x : x + w], zoomed(tiles[i], 2))
    assert torch.all(out[:2] == 17) and torch.all(out[:, :2] == 17)
    assert torch.all(out[2 + 2 * (h + 2) :, 2 + 1 * (w + 2) :] == 17)  # the empty cells of the last row
    assert grid(tiles[:2], nrow=8, pad=0).shape == (5, 12, 3)  # fewer tiles than nrow: one short row
    assert grid(tiles, nrow=1, pad=1).shape == (7 * 6 + 1, 8, 3)


# ------------------------------------------------------------------------------------------- confusion panels


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 16, 16), (64,), (784,)])
def test_confusion_panels_shapes_and_input_tile(shape):
    kw = confusion_inputs(n=5, shape=shape)
    panels = confusion_panels(**kw, zoom=3, channels="colour")  # (random channels: "overlay" adds a note)
    assert panels.dtype == torch.uint8 and panels.ndim == 4 and panels.shape[0] == 5 and panels.shape[3] == 3
    h, w = to_rgb(kw["images"][0]).shape[:2]
    x = kw["images"]
    rgb = to_rgb(x) if len(shape) > 1 else to_rgb(x, flat=True)
    assert torch.equal(panel_tile(panels, 0, 5, 3 * h, 3 * w), zoomed(rgb, 3))
    projected = (x + kw["projection_factor"] * kw["grad_a"]).clamp(0, 1)
    projected_rgb = to_rgb(projected) if len(shape) > 1 else to_rgb(projected, flat=True)
    assert torch.equal(panel_tile(panels, 3, 5, 3 * h, 3 * w), zoomed(projected_rgb, 3))
    # without labels the panels keep their size ("label ?") and still stack
    assert confusion_panels(**{**kw, "labels": None}, zoom=3, channels="colour").shape == panels.shape


def test_confusion_panels_captions_are_drawn():
    kw = confusion_inputs(n=2)
    panels = confusion_panels(**kw)
    band = panels[:, PAD : panels.shape[1] - PAD - 28 * 4]
    assert (band < 128).any(dim=(1, 2, 3)).all()  # dark text on the white band of every panel
    assert not torch.equal(panels[0], confusion_panels(**{**kw, "labels": None})[0])


def test_confusion_panels_share_one_scale_per_sample():
    kw = confusion_inputs(n=3)
    kw["grad_b"] = kw["grad_a"].abs().amax() * torch.rand(3, 1, 28, 28) * 0.1  # grad_a dominates
    before = confusion_panels(**kw)
    after = confusion_panels(**{**kw, "grad_a": 2 * kw["grad_a"]})
    tile_a = (panel_tile(before, 1, 5, 112, 112), panel_tile(after, 1, 5, 112, 112))
    tile_b = (panel_tile(before, 2, 5, 112, 112), panel_tile(after, 2, 5, 112, 112))
    assert torch.equal(*tile_a)  # grad_a sets the scale: doubling it looks the same
    assert not torch.equal(*tile_b)  # but grad_b, unchanged, is now drawn fainter
    assert luminance(tile_b[1]).std() < luminance(tile_b[0]).std()
    scale = torch.stack([kw["grad_a"], kw["grad_b"]], 1).abs().amax(dim=(1, 2, 3, 4))
    assert torch.equal(tile_b[0], zoomed(diverging(kw["grad_b"], scale), 4))


# ---------------------------------------------------------------------------------- explanations and morphs


def test_explanation_image_layout():
    b, k = 5, 3
    probs = torch.rand(b, 10).softmax(1)
    targets = probs.topk(k).indices
    targets[4] = -1  # a sample explain skipped
    exp = SimpleNamespace(attributions=torch.randn(b, k, 1, 28, 28), targets=targets, probabilities=probs)
    img = explanation_image(exp, torch.rand(b, 1, 28, 28), zoom=2)
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    row_h = img.height // b
    assert img.height == b * row_h and row_h > 56
    assert explanation_image(exp, torch.rand(b, 1, 28, 28), zoom=2, max_samples=2).height == 2 * row_h
    tiles = torch.from_numpy(np.array(img)).view(b, row_h, img.width, 3)
    maps = exp.attributions[:, :, 0]
    scale = maps.abs().amax(dim=(1, 2, 3))[:, None]
    for j in range(k):  # each map drawn on its row's shared scale
        assert torch.equal(
            panel_tile(tiles, j + 1, k + 1, 56, 56)[:4], zoomed(diverging(maps[:4, j], scale[:4, 0]), 2)
        )
    own = explanation_image(exp, torch.rand(b, 1, 28, 28), zoom=2, shared_scale=False)
    own_tiles = torch.from_numpy(np.array(own)).view(b, row_h, own.width, 3)
    assert torch.equal(panel_tile(own_tiles, 1, k + 1, 56, 56)[:4], zoomed(diverging(maps[:4, 0]), 2))


def test_frame_indices_keep_first_and_last():
    idx = morphs._frame_indices(50, 12)
    assert len(idx) == 12 and idx[0] == 0 and idx[-1] == 49 and idx == sorted(set(idx))
    assert morphs._frame_indices(5, 12) == [0, 1, 2, 3, 4]


def test_film_strip_and_save_png(tmp_path):
    res = morph_result(n_frames=20)
    strip = film_strip(res, 1, zoom=3, max_frames=12)
    assert strip.mode == "RGB"
    assert (strip.width - 2 * PAD + GAP) % 12 == 0 and (strip.width - 2 * PAD + GAP) // 12 - GAP >= 84
    assert strip.height > 84
    path = save_png(strip, tmp_path / "nested" / "dir" / "strip.png")
    assert path == tmp_path / "nested" / "dir" / "strip.png"
    with Image.open(path) as im:
        assert im.size == strip.size and im.format == "PNG"
        assert (torch.from_numpy(np.array(im.convert("RGB"))) == torch.from_numpy(np.array(strip))).all()
    # the last frame of the strip is the sample's final frame
    arr = torch.from_numpy(np.array(strip))[None]
    assert torch.equal(panel_tile(arr, 11, 12, 84, 84)[0], zoomed(to_rgb(res.frames[-1, 1]), 3))
    assert film_strip(res, 0, zoom=3, max_frames=4).width < strip.width


def test_save_gif_frames(tmp_path):
    res = morph_result(n_frames=7)
    path = save_gif(res, 0, tmp_path / "a" / "morph.gif", zoom=4, duration_ms=80)
    with Image.open(path) as im:
        assert im.format == "GIF" and im.n_frames == 7
        assert im.width == 112 + 2 * PAD and im.height > 112  # one tile under its caption
        assert im.info.get("duration") == 80
        assert im.info.get("loop") == 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["morph.gif"]


def test_portrait_row_draws_each_portrait_under_its_class():
    g = torch.Generator().manual_seed(0)
    res = SimpleNamespace(inputs=torch.rand(10, 1, 28, 28, generator=g), targets=torch.arange(10),
                          probabilities=torch.eye(10) * 0.98 + 0.002,
                          success=torch.ones(10, dtype=torch.bool))
    row = portrait_row(res, zoom=2)
    arr = torch.from_numpy(np.array(row))[None]
    for k in (0, 4, 9):  # each tile is that class's portrait, in class order
        assert torch.equal(panel_tile(arr, k, 10, 56, 56)[0], zoomed(to_rgb(res.inputs[k]), 2))
    three = portrait_row(SimpleNamespace(inputs=res.inputs[:3], targets=res.targets[:3]), zoom=2)
    assert three.width < row.width and three.height < row.height  # no probability line
    res.success[4] = False  # a portrait that never reached its class says so, on a third caption line
    assert portrait_row(res, zoom=2).height > row.height
    with pytest.raises(ValueError, match="10 portraits but 3 targets"):
        portrait_row(SimpleNamespace(inputs=res.inputs, targets=res.targets[:3]))


def test_save_png_tensor_roundtrip(tmp_path):
    img = grid(diverging(torch.randn(6, 10, 10)), nrow=3, zoom=2)
    path = save_png(img, tmp_path / "grid.png")
    with Image.open(path) as im:
        assert torch.equal(torch.from_numpy(np.array(im)), img)
    save_png(torch.rand(1, 9, 9), tmp_path / "float.png")  # float [C, H, W] in [0, 1]
    with Image.open(tmp_path / "float.png") as im:
        assert im.size == (9, 9)


def test_save_png_failed_rename_leaves_nothing(tmp_path):
    dest = tmp_path / "out.png"
    dest.mkdir()  # os.replace of a file onto a directory fails
    with pytest.raises(OSError):
        save_png(torch.zeros(4, 4, 3, dtype=torch.uint8), dest)
    assert dest.is_dir() and not any(dest.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temp file left behind
    with pytest.raises(OSError):
        save_gif(morph_result(n_frames=3), 0, dest)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_save_png_replaces_existing_file(tmp_path):
    dest = tmp_path / "x.png"
    save_png(torch.zeros(4, 4, 3, dtype=torch.uint8), dest)
    save_png(torch.full((6, 5, 3), 200, dtype=torch.uint8), dest)
    with Image.open(dest) as im:
        assert im.size == (5, 6)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


# ------------------------------------------------------------------------ pictures that tell the truth


def lut_index(pixels: torch.Tensor) -> torch.Tensor:
    """The colour-table entry nearest to each RGB pixel [..., 3]: the value a map pixel stands for."""
    lut = _draw._lut().double()
    d = ((pixels.double()[..., None, :] - lut) ** 2).sum(-1)
    return d.argmin(-1)


def one_sample(attributions, probabilities, output=None):
    b, k = attributions.shape[:2]
    return SimpleNamespace(
        attributions=attributions,
        targets=torch.arange(k).expand(b, k),
        probabilities=probabilities,
        output=output,
    )


def rows_of(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img))[None]


def test_channel_opposed_colour_evidence_is_visible_by_default():
    a = torch.zeros(1, 1, 3, 16, 16)
    a[0, 0, 0, 4:12, 4:12], a[0, 0, 1, 4:12, 4:12] = 1.0, -1.0  # more red, less green on a patch
    exp = one_sample(a, torch.tensor([[0.7, 0.3]]))
    x = torch.full((1, 3, 16, 16), 0.5)
    tile = panel_tile(rows_of(explanation_image(exp, x, zoom=2, channels="colour")), 1, 2, 32, 32)[0].float()
    patch, around = tile[8:24, 8:24].reshape(-1, 3), tile[:8].reshape(-1, 3)
    assert (patch.mean(0) - around.mean(0)).abs().sum() > 200  # plainly visible
    assert patch[:, 0].mean() > around[:, 0].mean() + 100  # redder
    assert patch[:, 1].mean() < around[:, 1].mean() - 100  # less green
    assert around.std(0).max() == 0  # zero attribution: one flat grey
    # the signed sum (and the default overlay, which adds the channels too) cancels it: the map looks
    # exactly like no attribution at all, and the picture says so in a note under the tiles
    for view in ("sum", "overlay", None):
        summed = np.array(explanation_image(exp, x, zoom=2, channels=view))
        grey = (summed == 128).all(axis=2)  # the input: one flat grey 32 x 32 block
        rows = np.nonzero(grey.sum(axis=1) >= 32)[0]
        top, bottom = rows[0], rows[-1] + 1
        assert bottom - top == 32
        cols = np.nonzero(grey[top])[0]
        right = cols[cols >= cols[0]].max() + 1
        map_tile = summed[top:bottom, right + GAP :]
        first = np.nonzero((map_tile[0] != 255).any(axis=1))[0][0]
        assert (map_tile[:, first : first + 32] == map_tile[0, first]).all()  # one flat colour: nothing
        note = summed[bottom + PAD :]
        assert (note < 100).any() and (note == 255).mean() > 0.8  # dark text on white: the note
    # one map per channel: red bright, green dark, blue neutral
    each = rows_of(explanation_image(exp, x, zoom=2, channels="each"))
    r, g, b = (lut_index(panel_tile(each, t, 4, 32, 32)[0, 8:24, 8:24]) for t in (1, 2, 3))
    assert (r == 255).all() and (g == 0).all() and ((b - 127.5).abs() <= 1).all()
    mag = rows_of(explanation_image(exp, x, zoom=2, channels="magnitude"))
    m = lut_index(panel_tile(mag, 1, 2, 32, 32)[0])
    assert (m[8:24, 8:24] == 255).all() and (m[:8] == 128).all()  # grey (zero) to bright


@pytest.mark.parametrize("weaker", [10.0, 100.0])
def test_a_weaker_class_looks_proportionally_fainter(weaker):
    ramp = torch.linspace(-1, 1, 256).reshape(1, 16, 16)
    a = torch.stack([ramp, ramp / weaker])[None]  # [1, 2, 1, 16, 16]
    exp = one_sample(a, torch.tensor([[0.6, 0.4]]))
    rows = rows_of(explanation_image(exp, torch.rand(1, 1, 16, 16), zoom=1))
    strength = [(lut_index(panel_tile(rows, t, 3, 16, 16)) - 127.5).abs().mean() for t in (1, 2)]
    ratio = float(strength[1] / strength[0])
    # quantisation to 256 entries adds up to one entry of the 64 a full map averages
    assert ratio == pytest.approx(1 / weaker, abs=1.2 / 64)
    own = rows_of(explanation_image(exp, torch.rand(1, 1, 16, 16), zoom=1, shared_scale=False))
    assert torch.equal(panel_tile(own, 1, 3, 16, 16), panel_tile(own, 2, 3, 16, 16))  # each to its own max


def test_the_scale_is_written_on_the_picture():
    a = torch.randn(2, 2, 1, 12, 12)
    probs = torch.tensor([[0.6, 0.3], [0.5, 0.4]])
    x = torch.rand(2, 1, 12, 12)
    one = rows_of(explanation_image(one_sample(a, probs), x, zoom=3))
    two = rows_of(explanation_image(one_sample(2 * a, probs), x, zoom=3))
    assert one.shape == two.shape
    tiles = one.shape[1] - PAD - 36
    assert torch.equal(one[:, tiles:], two[:, tiles:])  # the same maps, to the pixel
    assert not torch.equal(one[:, :tiles], two[:, :tiles])  # but their captions differ: the scale


def test_captions_are_at_least_11_pixels_tall():
    panels = confusion_panels(**confusion_inputs(n=1))
    tiles_top = panels.shape[1] - PAD - 112
    band = panels[0, :tiles_top, : panel_tile(panels, 1, 5, 112, 112).shape[2]]  # "label ..." over tile 0
    dark_rows = (band < 100).any(dim=2).any(dim=1).nonzero().flatten()
    assert int(dark_rows[-1] - dark_rows[0]) + 1 >= 11


def test_saturated_probability_is_said_on_the_picture():
    a = torch.randn(1, 2, 1, 10, 10)
    x = torch.rand(1, 1, 10, 10)
    sure = torch.tensor([[0.995, 0.004]])
    plain = explanation_image(one_sample(a, sure, "logit"), x)
    saturated = explanation_image(one_sample(a, sure, "probability"), x)
    unsure = explanation_image(one_sample(a, torch.tensor([[0.6, 0.3]]), "probability"), x)
    assert plain.size == explanation_image(one_sample(a, torch.tensor([[0.6, 0.3]]), "logit"), x).size
    # the note, in a band of text under the tiles (none when not saturated: the tiles end the picture)
    line = _draw._band_height(_draw._font()[0])
    bottom, unsure_bottom = np.array(saturated)[-PAD - line : -PAD], np.array(unsure)[-PAD - 20 : -PAD]
    assert (bottom < 100).any() and (bottom == 255).mean() > 0.7 > (unsure_bottom == 255).mean()
    kw = confusion_inputs(n=2)
    unsure_kw = {**kw, "prob_a": torch.tensor([0.6, 0.5]), "prob_b": torch.tensor([0.3, 0.4])}
    kw["prob_a"], kw["prob_b"] = torch.tensor([0.999, 0.5]), torch.tensor([0.0005, 0.4])
    assert confusion_panels(**kw, output="probability").shape[1] > confusion_panels(**unsure_kw,
                                                                                    output="probability").shape[1]


def test_display_undoes_a_normalisation():
    x = torch.randint(0, 256, (2, 3, 8, 8)).float() / 255
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    normalised = (x - m) / s
    exp = one_sample(torch.randn(2, 1, 3, 8, 8), torch.tensor([[0.6, 0.3], [0.6, 0.3]]))
    for display in ((mean, std), lambda t: t * s + m):
        img = explanation_image(exp, normalised, zoom=2, display=display, channels="colour")
        rows = torch.from_numpy(np.array(img)).reshape(2, img.height // 2, img.width, 3)
        assert torch.equal(panel_tile(rows, 0, 2, 16, 16), zoomed(to_rgb(x), 2))
    clamped = np.array(explanation_image(exp, normalised, zoom=2, channels="colour"))  # without display:
    line = _draw._band_height(_draw._font()[0])  # clamped, and said so in a note under each row
    note = clamped.reshape(2, -1, clamped.shape[1], 3)[:, -PAD - line : -PAD]
    assert (note < 100).any(axis=(1, 2, 3)).all() and (note == 255).mean() > 0.7
    with pytest.raises(ValueError, match="mean has 2 values"):
        explanation_image(exp, normalised, display=((0.5, 0.5), (0.2,)))


def test_film_strip_and_gif_end_where_the_sample_stopped(tmp_path):
    frames = torch.rand(11, 2, 1, 8, 8) * 0.9
    res = SimpleNamespace(
        frames=frames,
        frame_steps=torch.arange(11),
        steps=torch.tensor([3, -1]),
        targets=torch.tensor([5, 6]),
        probabilities=torch.rand(2, 10).softmax(1),
    )

    def tiles_in(strip: Image.Image) -> int:
        row = np.array(strip)[strip.height - PAD - 1]  # the bottom row of the tiles
        filled = (row < 250).any(axis=1).astype(int)
        return int((np.diff(np.concatenate([[0], filled])) == 1).sum())

    assert tiles_in(film_strip(res, 0, zoom=2)) == 4  # steps 0 to 3, not 11 frames
    assert tiles_in(film_strip(res, 1, zoom=2)) == 11  # never arrived: every frame
    last = panel_tile(rows_of(film_strip(res, 0, zoom=2)), 3, 4, 16, 16)[0]
    assert torch.equal(last, zoomed(to_rgb(frames[3, 0]), 2))
    with Image.open(save_gif(res, 0, tmp_path / "a.gif")) as im:
        assert im.n_frames == 4
    with Image.open(save_gif(res, 1, tmp_path / "b.gif")) as im:
        assert im.n_frames == 11
    # frames kept every 5 steps: the strip ends at the first kept frame after the arrival (step 12 -> 15)
    res.frames, res.frame_steps, res.steps = frames[:5], torch.arange(5) * 5, torch.tensor([12, -1])
    assert tiles_in(film_strip(res, 0, zoom=2)) == 4
    # the last caption says it: the one with the arrival differs from one without
    unknown = SimpleNamespace(**{k: v for k, v in vars(res).items() if k != "steps"})
    captioned, plain = (
        np.array(film_strip(res, 0, zoom=2)),
        np.array(film_strip(unknown, 0, zoom=2, max_frames=4)),
    )
    assert captioned.shape != plain.shape or not np.array_equal(captioned, plain)


def test_an_unreached_morph_says_whether_its_target_leads():
    """A morph that never met the rule: "still not 6" while 6 is not the top class; "5, not yet p ≥ 0.99"
    when 5 is the top class but below the confidence morph asked for (not "still not 5")."""
    from peering.render._frames import _morph_frames

    probabilities = torch.zeros(2, 10)
    probabilities[0, 5], probabilities[0, 6] = 0.98, 0.02
    probabilities[1, 0], probabilities[1, 6] = 0.6, 0.4
    res = SimpleNamespace(
        frames=torch.rand(3, 2, 1, 8, 8),
        frame_steps=torch.arange(3),
        steps=torch.tensor([-1, -1]),
        targets=torch.tensor([5, 6]),
        probabilities=probabilities,
        confidence=0.99,
    )
    assert _morph_frames(res, 0)[2][-1] == "step 2\n5, not yet p ≥ 0.99\np(5)=0.98"
    assert _morph_frames(res, 1)[2][-1] == "step 2\nstill not 6\np(6)=0.40"
    res.confidence = None  # stopping at the top class: a leading target would have arrived
    assert _morph_frames(res, 0)[2][-1] == "step 2\nstill not 5\np(5)=0.98"
