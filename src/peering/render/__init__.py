"""Pictures of explanations, morphs and confused samples, made fast enough to run on the training thread.

One module per kind of picture, all re-exported here (``peering.render.<name>`` is the public path):

- `peering.render.images`: `diverging`, `to_rgb`, `explanation_image`, `confusion_panels`;
- `peering.render.features`: tabular inputs as bar charts (drawn by the two above), `input_kind`;
- `peering.render.tokens`: text: `token_scores`, `token_image`, `token_html`, `token_panels`;
- `peering.render.morphs`: `film_strip`, `save_gif` (ending where each sample stopped), `portrait_row`;
- `peering.render.text_morphs`: `token_strip`, a text morph's frames as sentences, swapped tokens marked;
- `peering.render.datasets`: `class_mean_maps` (a whole dataset's attributions, per class);
- `peering.render.confusion`: the confusion atlas: `confusion_matrix_image`, `confused_pair_panels`;
- `peering.render.found`: `headed_panels`, `map_change` (what `LabelIssues` and `ShortcutAlarm` found);
- `peering.render.layout`: `grid`, `save_png`;
- `peering.render.sanity`: `sanity_curves`, `sanity_maps` (the randomisation sanity check);
- `peering.render._draw`, `_legend`, `_frames`: the shared, private drawing helpers (colour table, font,
  captioned panels; legends and what was differentiated; the frames of a morph).

Everything here is a handful of vectorised array operations (NumPy, single-threaded) plus Pillow text
drawing: no matplotlib figure is created on the way to any picture a training run makes. matplotlib is
imported once, lazily, to build a cached 256-entry colour lookup table (and to find the DejaVu Sans font
it ships); only `sanity_curves`, a line chart drawn once per run, makes a figure.

Conventions:

- An *image* is a float tensor [C, H, W] with C = 1 or 3 and values in [0, 1] (values outside are
  clamped, NaN shows as 0). A *flat* input is a feature vector [D]: it is shown as a near-square grid
  when D is a perfect square (64 -> 8x8, 784 -> 28x28) and as a 1-row strip [1, D] otherwise.
- Pictures come back as uint8 tensors [..., H, W, 3] (RGB, channels last, ready for `PIL.Image.fromarray`
  or TensorBoard's ``dataformats="NHWC"``) or as `PIL.Image.Image`.
- Attributions are shown with a diverging colour map: negative values (the class wants *less* intensity
  there) dark, positive values (it wants *more*) bright, zero the middle of the map. Every attribution
  picture states its scale (the |value| drawn at full colour), the maps that are compared share it, and a
  saturated probability gradient is said so on the picture (see `peering.render.images`).
- ``display=`` (None, ``(mean, std)`` or a function) shows inputs outside [0, 1] as a person would see
  them; without it they are clamped, and the picture says so.
- `Explanation` and `MorphResult` are duck-typed: any object with the documented attributes works.

A new kind of picture goes in its own module here, with its public names in that module's ``__all__``
and re-exported below.
"""

from peering.render._draw import Display
from peering.render.confusion import confused_pair_panels, confusion_matrix_image
from peering.render.datasets import class_mean_maps
from peering.render.features import input_kind
from peering.render.found import headed_panels, map_change
from peering.render.images import confusion_panels, diverging, explanation_image, to_rgb
from peering.render.layout import grid, save_png
from peering.render.morphs import film_strip, portrait_row, save_gif
from peering.render.sanity import sanity_curves, sanity_maps
from peering.render.text_morphs import token_strip
from peering.render.tokens import token_html, token_image, token_panels, token_scores

__all__ = [
    "Display",
    "class_mean_maps",
    "confused_pair_panels",
    "confusion_matrix_image",
    "confusion_panels",
    "diverging",
    "explanation_image",
    "film_strip",
    "grid",
    "headed_panels",
    "input_kind",
    "map_change",
    "portrait_row",
    "save_gif",
    "sanity_curves",
    "sanity_maps",
    "save_png",
    "to_rgb",
    "token_html",
    "token_image",
    "token_panels",
    "token_scores",
    "token_strip",
]
