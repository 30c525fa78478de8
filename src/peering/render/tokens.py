"""Pictures of attributions on text: one score per token, drawn as the tokens on coloured backgrounds.

Text models are explained at a layer (the token embeddings, ``layer=`` in `peering.explain`), so their
attributions are [B, K, L, H]: per sample, class, token and hidden unit. `token_scores` reduces them to
one score per token; `token_image` draws the tokens as coloured text (a PNG, e.g. for TensorBoard) and
`token_html` as HTML (for a report). Colours are those of the image maps: dark blue where the token
speaks against the class, bright yellow where it speaks for it, grey for nothing, on one scale per sample
(shared by its K classes and stated in the caption: "scale ±0.52").

Tokens come as strings (``tokens=[["the", "movie", ...], ...]``) or as ids with a Hugging Face tokenizer
(its ``convert_ids_to_tokens``), or with a ``mask``; padding is left out wherever it is, each token drawn
with its own score. WordPiece continuations ("##ing") are drawn joined to
the token before them, and the word-start marks of SentencePiece ("▁") and byte-level BPE ("Ġ") are
dropped.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from peering.errors import PeeringTypeError, PeeringValueError
from peering.render._draw import (
    _BACKGROUND,
    PYTHON_HINT,
    _band_height,
    _font,
    _lut_np,
    _wrap,
    saturation_note,
    scale_caption,
)
from peering.render._legend import below, differentiated, legend_band, value_caption

__all__ = [
    "token_html",
    "token_image",
    "token_panels",
    "token_panels_of",
    "token_positions",
    "token_scores",
    "two_class_probabilities",
    "unpadded_tokens",
]

_TOKEN_PAD = 3  # pixels of colour around a token's text
_TOKEN_GAP = 4  # pixels between words (none between the pieces of one word)
_MEANING = "dark blue: the token speaks against the class, bright yellow: for it, grey: neither"


def token_scores(attributions: Tensor, *, reduce: Literal["sum", "norm"] = "sum") -> Tensor:
    """One score per token from layer attributions [..., L, H]: [..., L].

    ``reduce="sum"`` (the default) adds the hidden units with their signs. With input x gradient (or
    integrated gradients) at the embedding layer, that sum is the first-order estimate (for integrated
    gradients, the exact share) of how much the token's embedding adds to the class's output compared
    with a zero embedding: a signed, additive contribution, so tokens for and against the class are told
    apart and the scores of a sentence add up. ``"norm"`` is the L2 norm over the hidden units: how
    sensitive the output is to the token at all, without a sign; use it for plain gradients, whose sum
    over hidden units means nothing in particular.

    >>> import torch
    >>> from peering.render import token_scores
    >>> token_scores(torch.ones(2, 1, 5, 8)).shape, float(token_scores(torch.ones(5, 8))[0])
    (torch.Size([2, 1, 5]), 8.0)
    """
    if attributions.ndim < 2:
        raise PeeringValueError(f"attributions must be [..., L, H], got shape {tuple(attributions.shape)}")
    a = attributions.detach().float()
    if reduce == "sum":
        return a.sum(dim=-1)
    if reduce == "norm":
        return a.norm(dim=-1)
    raise PeeringValueError(f"reduce must be 'sum' or 'norm', got {reduce!r}")


def token_positions(
    tokens: Sequence[Sequence[str]] | Tensor,
    length: int,
    *,
    tokenizer: Any = None,
    mask: Tensor | None = None,
    batch: int | None = None,
) -> tuple[list[list[str]], list[list[int]]]:
    """Per sample, its token strings and the positions (of ``length``) their scores are read from: padding
    left out wherever it is (left, right or both).

    - ``mask`` [B, L] (nonzero at the real tokens, an attention mask) says where the tokens are;
    - else, token ids [B, L] with a ``tokenizer`` drop its ``pad_token_id`` wherever it is (pass ``mask``
      when the pad id also stands for a real token, e.g. GPT-2's pad = end of text);
    - token strings are one per position ([L] each), or only the real tokens with ``mask``.

    Ids without a tokenizer are shown as their numbers.

    >>> import torch
    >>> words, at = token_positions(torch.tensor([[0, 0, 7, 8]]), 4, mask=torch.tensor([[0, 0, 1, 1]]))
    >>> words, at
    ([['7', '8']], [[2, 3]])
    """
    n = batch if batch is not None else (tokens.shape[0] if isinstance(tokens, Tensor) else len(tokens))
    keep = None
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.ndim != 2 or mask.shape[1] != length or mask.shape[0] < n:
            shape = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise PeeringValueError(f"mask must be [B, L] = [{n}, {length}], nonzero at tokens; got {shape}")
        keep = (mask[:n].detach().cpu() != 0).tolist()
    if isinstance(tokens, Tensor):
        ids = tokens.detach().cpu().reshape(tokens.shape[0], -1)[:n]
        if ids.shape[1] != length:
            raise PeeringValueError(f"token ids [B, {ids.shape[1]}] do not match {length} scores per sample")
        convert = _converter(tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None) if convert is not None else None
        if keep is None:
            keep = (ids != pad).tolist() if isinstance(pad, int) else [[True] * length] * ids.shape[0]
        at = [[j for j, k in enumerate(row) if k] for row in keep]
        rows = [[ids[i, j].item() for j in where] for i, where in enumerate(at)]
        words = [[str(t) for t in (convert(row) if convert is not None else row)] for row in rows]
        return _enough(words, n), at
    words = [[str(t) for t in row] for row in tokens][:n]
    at = []
    for i, row in enumerate(words):
        real = [j for j, k in enumerate(keep[i]) if k] if keep is not None else list(range(length))
        if len(row) == length and keep is not None:  # one string per position: drop the padding's
            words[i] = [row[j] for j in real]
        elif len(row) != len(real):
            raise PeeringValueError(
                f"sample {i} has {len(row)} tokens for {len(real)} "
                f"{'real positions' if keep is not None else 'scores'}; give one token string per position, "
                "or only the real tokens with mask= (nonzero where they are), so that each token is drawn "
                "with its own score wherever the padding is"
            )
        at.append(real)
    return _enough(words, n), at


def _enough(words: list[list[str]], n: int) -> list[list[str]]:
    if len(words) < n:
        raise PeeringValueError(f"tokens for {len(words)} samples, scores for {n}")
    return words


def _converter(tokenizer: Any) -> Any:
    """The function from a list of ids to their strings: ``tokenizer.convert_ids_to_tokens``, the
    tokenizer itself when it is a plain function, or None."""
    if tokenizer is None:
        return None
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if callable(convert):
        return convert
    return tokenizer if callable(tokenizer) else None


def _pieces(token: str) -> tuple[str, bool]:
    """(text to draw, True when it starts a new word)."""
    if token.startswith("##") and len(token) > 2:
        return token[2:], False
    if token[:1] in ("▁", "Ġ") and len(token) > 1:
        return token[1:], True
    return token, True


def _prepare(
    scores: Tensor,
    tokens: Sequence[Sequence[str]] | Tensor,
    tokenizer: Any,
    mask: Tensor | None,
    targets: Tensor | None,
    probabilities: Tensor | None,
    output: str | None,
    max_samples: int | None,
    hint: str = PYTHON_HINT,
) -> tuple[np.ndarray, list[list[str]], list[list[str]], np.ndarray, list[str]]:
    """(scores [n, K, L], tokens per sample, caption heads [n][K], scale [n], notes [n])."""
    if scores.ndim == 4:
        scores = token_scores(scores)
    if scores.ndim != 3:
        raise PeeringValueError(
            f"scores must be [B, K, L] (or layer attributions [B, K, L, H]), got shape {tuple(scores.shape)}"
        )
    b, k, length = scores.shape
    n = b if max_samples is None else min(b, max_samples)
    if n < 1:
        raise PeeringValueError("no samples to draw")
    if isinstance(tokens, Tensor) and _converter(tokenizer) is None:
        raise PeeringTypeError(
            "token ids need tokenizer= (an object with convert_ids_to_tokens, e.g. Hugging Face's, or a "
            "function from a list of ids to a list of strings)"
        )
    full = np.nan_to_num(scores[:n].detach().cpu().float().numpy(), nan=0.0)
    words, at = token_positions(tokens, length, tokenizer=tokenizer, mask=mask, batch=n)
    s = np.zeros_like(full)  # each sample's real tokens' scores first, in order; zeros after them
    for i, where in enumerate(at):
        s[i, :, : len(where)] = full[i][:, where]
    scale = np.abs(s).reshape(n, -1).max(axis=1, initial=0.0)
    heads: list[list[str]] = [[f"class {c}" if k > 1 else "" for c in range(k)] for _ in range(n)]
    notes = [""] * n
    if targets is not None:
        t = targets.detach().cpu().to(torch.int64).reshape(b, -1)[:n]
        if t.shape[1] != k:
            raise PeeringValueError(
                f"targets {tuple(targets.shape)} do not match scores {tuple(scores.shape)}"
            )
        if probabilities is not None:
            p = probabilities.detach().cpu().float()[:n].gather(1, t.clamp_min(0))
            heads = [
                [f"→{c} {value_caption(output, q)}" for c, q in zip(cs, qs, strict=True)]
                for cs, qs in zip(t.tolist(), p.tolist(), strict=True)
            ]
            notes = [
                saturation_note(cs, qs, output, hint) for cs, qs in zip(t.tolist(), p.tolist(), strict=True)
            ]
        else:
            heads = [[f"→{c}" for c in cs] for cs in t.tolist()]
    return s, words, heads, scale, notes


def _colours(values: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(background uint8 [L, 3], text uint8 [L, 3]) of scores on the diverging colour table."""
    safe = max(scale, float(np.finfo(np.float32).tiny))
    v = np.clip(values / safe, -1.0, 1.0)
    idx = np.clip(np.floor((v + 1.0) * 128.0).astype(np.intp), 0, 255)
    back = _lut_np()[idx]
    luminance = back.astype(np.float32) @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
    text = np.where((luminance > 110)[:, None], 0, 255).astype(np.uint8) * np.ones((1, 3), dtype=np.uint8)
    return back, text


def token_image(
    scores: Tensor,
    tokens: Sequence[Sequence[str]] | Tensor,
    *,
    tokenizer: Any = None,
    mask: Tensor | None = None,
    targets: Tensor | None = None,
    probabilities: Tensor | None = None,
    output: str | None = None,
    max_samples: int | None = 16,
    width: int = 720,
    method: str | None = None,
    saturation_hint: str = PYTHON_HINT,
) -> Image.Image:
    """The tokens of each sample as coloured text, one paragraph per explained class: a PIL image.

    Args:
        scores: per-token scores [B, K, L], or layer attributions [B, K, L, H] (reduced by
            `token_scores` with its default, the signed sum over the hidden units).
        tokens: per sample, its token strings, one per position (or only the real tokens, with
            ``mask``), or token ids [B, L] with ``tokenizer``.
        tokenizer: converts ids to strings (``convert_ids_to_tokens``); its ``pad_token_id`` is left
            out wherever it is, and each token keeps its own score.
        mask: [B, L], nonzero at the real tokens (an attention mask): padding left out wherever it is
            (left, right or both); the surest way for left-padded text (see `token_positions`).
        targets: int [B, K], the classes explained (for the captions); probabilities: [B, C].
        output: what was differentiated; with "probability", saturated classes get a note.
        max_samples: draw at most this many samples; None for all.
        width: wrap the text at this many pixels.
        method: the attribution method (for the legend's words on what the scores are).
        saturation_hint: how a saturation note names the remedy (the command line: its ``--output``).

    Each paragraph is captioned with its class, probability and the sample's scale (shared by its
    classes: the |score| drawn at full colour); a colour legend under them says what was
    differentiated and what the colours mean.

    >>> import torch
    >>> from peering.render import token_image
    >>> image = token_image(torch.tensor([[[1.0, -0.5, 0.0]]]), [["good", "not", "film"]])
    >>> image.mode, image.width
    ('RGB', 720)
    """
    s, words, heads, scale, notes = _prepare(
        scores, tokens, tokenizer, mask, targets, probabilities, output, max_samples, saturation_hint
    )
    font, unicode_ok = _font()
    line = _band_height(font) + 2 * _TOKEN_PAD + 2
    blocks: list[tuple[str, list[tuple[float, int, str, np.ndarray, np.ndarray]]]] = []
    layout: list[tuple[str, int]] = []  # (kind, height) in drawing order
    for i, row in enumerate(words):
        for c in range(s.shape[1]):
            back, text = _colours(s[i, c, : len(row)], float(scale[i]))
            placed, x, y = [], 0.0, 0
            for j, token in enumerate(row):
                piece, new_word = _pieces(token)
                if not unicode_ok:
                    piece = piece.encode("ascii", "replace").decode()
                w = font.getlength(piece) + 2 * _TOKEN_PAD
                gap = _TOKEN_GAP if new_word and x > 0 else 0
                if x > 0 and x + gap + w > width - 8:
                    x, y, gap = 0.0, y + line, 0
                placed.append((x + gap, y, piece, back[j], text[j]))
                x += gap + w
            caption = ", ".join(t for t in (heads[i][c], scale_caption(float(scale[i]))) if t)
            blocks.append((caption, placed))
            layout.append(("block", y + line))
        if notes[i]:
            layout.append(("note", i))
    band = _band_height(font)
    wrapped = [_wrap(note, font, width - 8) if note else [] for note in notes]
    total = 4 + sum(band + h + 6 for kind, h in layout if kind == "block")
    total += sum(band * len(wrapped[i]) + 6 for kind, i in layout if kind == "note")
    image = Image.new("RGB", (width, total), (_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(image)
    y0, b = 4, 0
    for kind, value in layout:
        if kind == "note":
            for k, text_line in enumerate(wrapped[value]):
                draw.text((4, y0 + k * band), text_line, fill=(0, 0, 0), font=font)
            y0 += band * len(wrapped[value]) + 6
            continue
        caption, placed = blocks[b]
        b += 1
        draw.text((4, y0), caption, fill=(0, 0, 0), font=font)
        y0 += band
        for x, y, piece, back, text in placed:
            w = font.getlength(piece) + 2 * _TOKEN_PAD
            box = (4 + x, y0 + y, 4 + x + w, y0 + y + line - 2)
            draw.rectangle(box, fill=tuple(int(v) for v in back))
            draw.text(
                (4 + x + _TOKEN_PAD, y0 + y + _TOKEN_PAD), piece, fill=tuple(int(v) for v in text), font=font
            )
        y0 += value + 6
    legend = legend_band("sum", [None], width, differentiated(output, method), _MEANING)
    return Image.fromarray(below(np.asarray(image)[None], legend)[0])


def token_html(
    scores: Tensor,
    tokens: Sequence[Sequence[str]] | Tensor,
    *,
    tokenizer: Any = None,
    mask: Tensor | None = None,
    targets: Tensor | None = None,
    probabilities: Tensor | None = None,
    output: str | None = None,
    max_samples: int | None = None,
    method: str | None = None,
) -> str:
    """The same as `token_image`, as an HTML fragment (inline styles only, every token escaped): one
    ``<div class="peering-tokens">`` per sample and class, each token a ``<span>`` whose ``title`` is its
    score, after a ``<p class="peering-tokens-legend">`` saying what the colours mean. Returned as
    ``markupsafe.Markup``, so a Jinja2 template inserts it as HTML.

    >>> import torch
    >>> from peering.render import token_html
    >>> fragment = token_html(torch.tensor([[[1.0, -0.5]]]), [["<good>", "film"]])
    >>> "&lt;good&gt;" in fragment and fragment.count("<span") == 2
    True
    """
    from markupsafe import Markup

    s, words, heads, scale, notes = _prepare(
        scores, tokens, tokenizer, mask, targets, probabilities, output, max_samples
    )
    what = differentiated(output, method)
    out = [f'<p class="peering-tokens-legend">{html.escape(f"{what}: " if what else "")}{_MEANING}</p>']
    for i, row in enumerate(words):
        for c in range(s.shape[1]):
            back, text = _colours(s[i, c, : len(row)], float(scale[i]))
            spans = []
            for j, token in enumerate(row):
                piece, new_word = _pieces(token)
                gap = " " if new_word and j > 0 else ""
                spans.append(
                    f'{gap}<span style="background:#{bytes(back[j].tolist()).hex()};'
                    f'color:#{bytes(text[j].tolist()).hex()};padding:1px 2px;border-radius:2px" '
                    f'title="{s[i, c, j]:+.3g}">{html.escape(piece)}</span>'
                )
            caption = ", ".join(t for t in (heads[i][c], scale_caption(float(scale[i]))) if t)
            out.append(
                f'<div class="peering-tokens"><p class="peering-tokens-caption">{html.escape(caption)}</p>'
                f'<p class="peering-tokens-text" style="line-height:1.9">{"".join(spans)}</p></div>'
            )
        if notes[i]:
            out.append(f'<p class="peering-tokens-note">{html.escape(notes[i])}</p>')
    return Markup("\n".join(out))


def token_panels(
    scores: Tensor,
    ids: Tensor,
    *,
    class_a: Tensor,
    class_b: Tensor,
    prob_a: Tensor,
    prob_b: Tensor,
    labels: Tensor | None,
    tokenizer: Any = None,
    mask: Tensor | None = None,
    output: str | None = None,
    width: int = 720,
    method: str | None = None,
) -> Tensor:
    """One panel per confused text sample, uint8 [N, H, W, 3], all the same size so they stack: the
    sample's true label, then its tokens coloured toward class a and toward class b (two paragraphs of
    `token_image`, on one scale per sample, stated in their captions). The text counterpart of
    `confusion_panels`, used by `peering.lightning.ConfusedLogitCallback` for models explained at their
    token embeddings.

    Args:
        scores: per-token scores [N, 2, L], or layer attributions [N, 2, L, H] (reduced by `token_scores`).
        ids: token ids [N, L].
        class_a, class_b: int [N]: the two classes. prob_a, prob_b: [N]: their probabilities.
        labels: int [N] true labels (-1: unknown), or None.
        tokenizer: turns ids into strings: an object with ``convert_ids_to_tokens`` (a Hugging Face
            tokenizer) or a function from a list of ids to a list of strings. Without one the tokens are
            drawn as their ids, and the panel says that a tokenizer shows the words.
        mask: [N, L], nonzero for the real tokens (an attention mask): padding is left out, wherever it is.
        output: what the scores are of; with "probability", a saturated class gets a note.
        method: the attribution method, said in the legend with ``output``.
        width: the panels' width in pixels (the text wraps inside it).

    >>> import torch
    >>> from peering.render import token_panels
    >>> panels = token_panels(torch.randn(3, 2, 5), torch.randint(0, 99, (3, 5)),
    ...                       class_a=torch.tensor([0, 1, 0]), class_b=torch.tensor([1, 0, 1]),
    ...                       prob_a=torch.full((3,), 0.5), prob_b=torch.full((3,), 0.4), labels=None,
    ...                       mask=torch.tensor([[1, 1, 1, 0, 0]] * 3))
    >>> panels.shape[0], panels.shape[2], panels.dtype
    (3, 720, torch.uint8)
    """
    words, kept = unpadded_tokens(scores, ids, tokenizer, mask)
    return token_panels_of(
        words,
        kept,
        class_a=class_a,
        class_b=class_b,
        prob_a=prob_a,
        prob_b=prob_b,
        labels=labels,
        ids_only=_converter(tokenizer) is None,
        output=output,
        width=width,
        method=method,
    )


def unpadded_tokens(
    scores: Tensor, ids: Tensor, tokenizer: Any = None, mask: Tensor | None = None
) -> tuple[list[list[str]], list[Tensor]]:
    """Per sample, its token strings and its scores [2, k] at those tokens (padding left out wherever the
    mask, or the tokenizer's pad id, puts it: see `token_positions`; ids as strings without a tokenizer),
    from scores [N, 2, L] (or [N, 2, L, H]) and ids [N, L]: what `token_panels_of` draws.

    >>> import torch
    >>> words, kept = unpadded_tokens(torch.ones(1, 2, 4), torch.tensor([[0, 0, 7, 8]]),
    ...                               mask=torch.tensor([[0, 0, 1, 1]]))
    >>> words, kept[0].shape
    ([['7', '8']], torch.Size([2, 2]))
    """
    if scores.ndim == 4:
        scores = token_scores(scores)
    n = ids.shape[0]
    if ids.ndim != 2 or scores.ndim != 3 or scores.shape[:2] != (n, 2) or scores.shape[2] != ids.shape[1]:
        raise PeeringValueError(
            f"scores must be [N, 2, L] (or [N, 2, L, H]) for ids [N, L]; got scores {tuple(scores.shape)} "
            f"and ids {tuple(ids.shape)}"
        )
    length = ids.shape[1]
    if mask is not None and tuple(mask.shape) != (n, length):
        raise PeeringValueError(f"mask must be [N, L] = {(n, length)}, got {tuple(mask.shape)}")
    words, at = token_positions(ids, length, tokenizer=tokenizer, mask=mask)
    scores = scores.detach().cpu().float()
    return words, [scores[i][:, where] for i, where in enumerate(at)]


def two_class_probabilities(classes: Tensor, probabilities: Tensor) -> Tensor:
    """[N, C] holding each sample's probabilities [N, 2] of its two classes [N, 2] (zeros elsewhere): what
    `token_image` and `token_html` take to caption them.

    >>> import torch
    >>> two_class_probabilities(torch.tensor([[3, 1]]), torch.tensor([[0.5, 0.25]])).tolist()
    [[0.0, 0.25, 0.0, 0.5]]
    """
    classes = classes.detach().cpu().to(torch.int64)
    out = torch.zeros(classes.shape[0], int(classes.max()) + 1 if classes.numel() else 1)
    return out.scatter_(1, classes, probabilities.detach().cpu().float())


def token_panels_of(
    words: list[list[str]],
    kept: list[Tensor],
    *,
    class_a: Tensor,
    class_b: Tensor,
    prob_a: Tensor,
    prob_b: Tensor,
    labels: Tensor | None,
    ids_only: bool,
    output: str | None,
    width: int = 720,
    method: str | None = None,
) -> Tensor:
    """`token_panels` from `unpadded_tokens`' tokens and scores (``ids_only``: the words are ids, and the
    panels say that a tokenizer would show the words).

    >>> import torch
    >>> words, kept = unpadded_tokens(torch.ones(1, 2, 3), torch.tensor([[5, 6, 7]]))
    >>> one = torch.tensor([0])
    >>> token_panels_of(words, kept, class_a=one, class_b=one + 1, prob_a=torch.tensor([0.5]),
    ...                 prob_b=torch.tensor([0.4]), labels=None, ids_only=True, output="logit").shape[0]
    1
    """
    n = len(words)
    classes = torch.stack([class_a.reshape(n), class_b.reshape(n)], dim=1)
    probs = two_class_probabilities(classes, torch.stack([prob_a.reshape(n), prob_b.reshape(n)], dim=1))
    classes = classes.cpu().to(torch.int64)
    ls = [-1] * n if labels is None else labels.reshape(n).tolist()
    font, _ = _font()
    band = _band_height(font)
    pictures = []
    for i in range(n):
        body = token_image(
            kept[i][None], [words[i]], targets=classes[i : i + 1], probabilities=probs[i : i + 1],
            output=output, max_samples=None, width=width, method=method,
        )
        head = f"label {ls[i]}" if ls[i] >= 0 else "label ?"
        if ids_only:
            head += " · tokens shown as ids: pass tokenizer= to see the words"
        lines = _wrap(head, font, width - 8)
        picture = Image.new("RGB", (width, 4 + band * len(lines) + body.height), (_BACKGROUND,) * 3)
        draw = ImageDraw.Draw(picture)
        for k, line in enumerate(lines):
            draw.text((4, 4 + k * band), line, fill=(0, 0, 0), font=font)
        picture.paste(body, (0, 4 + band * len(lines)))
        pictures.append(np.asarray(picture))
    height = max((p.shape[0] for p in pictures), default=1)
    out = np.full((n, height, width, 3), _BACKGROUND, dtype=np.uint8)
    for i, p in enumerate(pictures):
        out[i, : p.shape[0]] = p
    return torch.from_numpy(out)
