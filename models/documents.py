"""Synthetic document photos with a known homography: the data of ``--distortion document``.

A :class:`DocumentGenerator` composes photos of pages on the fly, self-supervised (the page's
corners in the photo are known exactly, so no labels are needed):

1. **Page** (upright, :func:`render_page`): white or off-white paper of one of
   :data:`PAGE_ASPECTS` (A4, Letter, receipt, card) with text rendered by the machine's
   TrueType fonts (headings, paragraphs, tables, rules, figures: procedural charts and
   blobs, or images from a ``figures`` folder); or an image from a ``pages`` folder (a
   user's own upright pages).
2. **Homography** (:func:`random_corners`): rotation up to ``max_angle`` (40 degrees),
   scale, perspective (each corner moved by up to ``perspective`` of the page's size) and
   position; inside the frame except for a ``touch_border`` fraction of photos, whose
   page may touch or cross the border.
3. **Background** (:func:`render_background`): procedural wood, fabric, desk and floor
   textures, or a crop of an image from a ``backgrounds`` folder.
4. **Photometric realism** (:func:`photometric`): soft shadow under the page, cast
   shadows, a lighting gradient, colour cast, blur, sensor noise, JPEG compression.

Held-out content (``split="test"``) shares nothing with training content: other fonts
(Liberation for test, DejaVu and the rest for training, :func:`split_fonts`), another text
source (words of the licence texts in ``/usr/share/common-licenses`` for test, pseudo-words
for training, :func:`word_source`), other texture seeds, and for user folders a fixed 10 %
of the files (:func:`split_files`).

Geometry (the conventions of ``models.frames``): the page's corners are the outer corners
of its pixel grid, page pixels (-0.5, -0.5), (w-0.5, -0.5), (w-0.5, h-0.5), (-0.5, h-0.5),
in that order (top-left, top-right, bottom-right, bottom-left of the upright page).
``photo_px_from_page_px`` maps them to the photo; :func:`theta_for` turns it into the
``theta`` (output normalized -> photo normalized, [3, 3]) that flattens the page into an
output of any size, and :func:`corners_norm` gives the corners in photo-normalized
coordinates, the regression target of the corner parametrisation (``models.transforms``).

Torch-free (numpy, OpenCV, Pillow): worker processes build their own generator.
"""

from __future__ import annotations

import glob
import io
import logging
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models import frames

log = logging.getLogger(__name__)

DISTORTION = "document"  # the --distortion name of this data source
SPLITS = ("train", "test")
# Page aspect ratios, height / width (upright): A4 and US Letter portrait, a till receipt, an ID-1 card (landscape).
PAGE_ASPECTS = {"a4": 297 / 210, "letter": 11 / 8.5, "receipt": 2.6, "card": 53.98 / 85.6}
PAGE_WEIGHTS = {"a4": 0.45, "letter": 0.25, "receipt": 0.15, "card": 0.15}
TEST_FONT_PREFIXES = ("Liberation",)  # held-out fonts; every other font trains
LICENCE_DIR = Path("/usr/share/common-licenses")  # held-out text source (Debian's base-files)
BACKGROUND_KINDS = ("wood", "fabric", "desk", "floor")
HELD_OUT_EVERY = 10  # user folders: every 10th file (sorted by name) is held out for testing
_TEST_SEED_OFFSET = 1_000_003  # test textures and pages draw from seeds no training draw uses


class DocumentDataError(ValueError):
    """A pages/backgrounds/figures folder cannot be used; the message says why."""


# ------------------------------------------------------------------------------ sources


def find_fonts() -> list[Path]:
    """TrueType/OpenType fonts on the machine (``fc-list``, else the usual folders), sorted."""
    paths: set[str] = set()
    if shutil.which("fc-list"):
        try:
            out = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True, timeout=20)
            paths.update(line.strip() for line in out.stdout.splitlines() if line.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    if not paths:
        for root in ("/usr/share/fonts", "/usr/local/share/fonts"):
            paths.update(glob.glob(f"{root}/**/*.[ot]tf", recursive=True))
    return sorted(Path(p) for p in paths if p.lower().endswith((".ttf", ".otf")) and "Math" not in Path(p).name)


def split_fonts(fonts: list[Path], split: str) -> list[Path]:
    """Held-out fonts (``TEST_FONT_PREFIXES``) for ``test``, the rest for ``train``.

    When one side would be empty (a machine with one font family), fonts alternate by name instead.
    """
    test = [f for f in fonts if f.name.startswith(TEST_FONT_PREFIXES)]
    train = [f for f in fonts if not f.name.startswith(TEST_FONT_PREFIXES)]
    if not test or not train:
        train, test = fonts[0::2], fonts[1::2]
    return test if split == "test" else train


_SYLLABLES = ("ka", "to", "ren", "mi", "sol", "da", "ve", "lin", "por", "tu", "an", "es", "ri", "mo", "bel",
              "cu", "na", "ter", "fi", "go", "shi", "pa", "ul", "zen", "ok", "ma", "de", "ion", "ex", "qua")


def word_source(split: str, rng: np.random.Generator) -> list[str]:
    """Words to typeset: pseudo-words for ``train``; the licence texts' words for ``test``."""
    if split == "test":
        words: list[str] = []
        for path in sorted(LICENCE_DIR.glob("*"))[:8] if LICENCE_DIR.is_dir() else []:
            try:
                words += re.findall(r"[A-Za-z][A-Za-z'-]{1,14}[.,;:]?", path.read_text(errors="ignore")[:20000])
            except OSError:
                continue
        if len(words) >= 200:
            return words
        syllables = tuple(s[::-1] for s in _SYLLABLES)  # no licences here: reversed syllables, still unseen in training
    else:
        syllables = _SYLLABLES
    out = []
    for _ in range(4000):
        w = "".join(rng.choice(syllables, int(rng.integers(1, 4))))
        if rng.random() < 0.12:
            w = w.capitalize()
        if rng.random() < 0.08:
            w += rng.choice([".", ",", ";", ":"])
        out.append(w)
    return out


def split_files(folder: str | Path | None, split: str, what: str) -> list[Path]:
    """Image files of a user folder (recursive, sorted); every 10th held out for ``test``."""
    if folder is None:
        return []
    from models.data import IMAGE_EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise DocumentDataError(f"--{what} {folder}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DocumentDataError(f"--{what} {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it")
    if len(files) < 2:
        return files  # one file: used for both (say so in the metrics: nothing is held out)
    test = files[::HELD_OUT_EVERY]
    train = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY]
    return test if split == "test" else train


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise DocumentDataError(f"{path}: not a readable image ({e})") from None


# ------------------------------------------------------------------------------ pages


def _font(fonts: list[Path], rng: np.random.Generator, size: int, bold: bool | None = None
          ) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    pool = fonts
    if bold is not None and fonts:
        picked = [f for f in fonts if ("Bold" in f.name) == bold]
        pool = picked or fonts
    if not pool:
        return ImageFont.load_default(size)
    return ImageFont.truetype(str(pool[int(rng.integers(len(pool)))]), size)


def _paper(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(228, 255)
    tint = rng.normal(0, 4, 3) + np.array([2.0, 0.5, -3.0]) * rng.uniform(0, 1.5)
    paper = np.clip(base + tint, 200, 255)[None, None, :] * np.ones((h, w, 1))
    grain = cv2.GaussianBlur(rng.normal(0, 3.0, (h, w)).astype(np.float32), (0, 0), 1.2)
    return np.clip(paper + grain[..., None], 0, 255).astype(np.uint8)


def _ink(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.8:
        v = int(rng.integers(0, 60))
        return v, v, v
    return tuple(int(c) for c in rng.integers(0, 140, 3))


def _figure(draw: ImageDraw.ImageDraw, img: Image.Image, box: tuple[int, int, int, int], rng: np.random.Generator,
            figures: list[Path]) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if w < 8 or h < 8:
        return
    if figures and rng.random() < 0.6:
        fig = Image.fromarray(_read_rgb(figures[int(rng.integers(len(figures)))])).resize((w, h), Image.BILINEAR)
        img.paste(fig, (x0, y0))
        return
    kind = rng.integers(3)
    draw.rectangle(box, outline=_ink(rng), width=1)
    if kind == 0:  # bar chart
        n = int(rng.integers(3, 9))
        for i in range(n):
            bh = int(rng.uniform(0.1, 0.9) * h)
            bx = x0 + int((i + 0.2) * w / n)
            draw.rectangle((bx, y1 - bh, bx + max(2, int(0.6 * w / n)), y1 - 1),
                           fill=tuple(int(c) for c in rng.integers(30, 220, 3)))
    elif kind == 1:  # line plot
        pts = [(x0 + int(i * w / 11), y0 + int(rng.uniform(0.1, 0.9) * h)) for i in range(12)]
        draw.line(pts, fill=tuple(int(c) for c in rng.integers(0, 200, 3)), width=max(1, w // 80))
    else:  # a photo-like blob
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        field = np.zeros((h, w, 3), np.float32)
        for _ in range(4):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.2, 0.6) * max(w, h)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
            field += blob[..., None] * rng.uniform(0, 255, 3)
        img.paste(Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)), (x0, y0))


def _words(words: list[str], rng: np.random.Generator, n: int) -> str:
    start = int(rng.integers(0, max(1, len(words) - n)))
    return " ".join(words[start : start + n])


def render_page(rng: np.random.Generator, kind: str, width: int, fonts: list[Path], words: list[str],
                figures: list[Path] | None = None) -> np.ndarray:
    """An upright page [h, w, 3] uint8 of ``kind`` (a key of PAGE_ASPECTS), ``width`` pixels wide."""
    h = round(width * PAGE_ASPECTS[kind])
    img = Image.fromarray(_paper(rng, h, width))
    draw = ImageDraw.Draw(img)
    figures = figures or []
    unit = width / 100.0  # layout unit: 1 % of the page width
    if kind == "card":
        margin = int(unit * rng.uniform(6, 10))
        y = margin
        draw.text((margin, y), _words(words, rng, 2).title(), font=_font(fonts, rng, int(unit * 9), True),
                  fill=_ink(rng))
        y += int(unit * 14)
        for _ in range(int(rng.integers(2, 5))):
            draw.text((margin, y), _words(words, rng, int(rng.integers(2, 5))), font=_font(fonts, rng, int(unit * 5.5)),
                      fill=_ink(rng))
            y += int(unit * 8)
        if rng.random() < 0.6:
            _figure(draw, img, (int(width * 0.7), margin, width - margin, margin + int(unit * 20)), rng, figures)
        return np.asarray(img)
    margin = int(unit * rng.uniform(5, 11))
    mono = [f for f in fonts if "Mono" in f.name] or fonts
    if kind == "receipt":
        font = _font(mono, rng, int(unit * rng.uniform(6, 8)))
        y = margin
        draw.text((margin, y), _words(words, rng, 2).upper(), font=_font(fonts, rng, int(unit * 9), True), fill=_ink(rng))
        y += int(unit * 14)
        while y < h - margin - unit * 20:
            if rng.random() < 0.12:
                draw.line((margin, y, width - margin, y), fill=_ink(rng), width=1)
                y += int(unit * 4)
                continue
            draw.text((margin, y), _words(words, rng, int(rng.integers(1, 3)))[:14], font=font, fill=_ink(rng))
            draw.text((width - margin - unit * 22, y), f"{rng.uniform(0.5, 99):6.2f}", font=font, fill=_ink(rng))
            y += int(unit * 9)
        draw.text((margin, h - margin - unit * 12), "TOTAL", font=_font(mono, rng, int(unit * 9), True), fill=_ink(rng))
        return np.asarray(img)
    # A4 / Letter: heading, then blocks of paragraphs, tables, rules and figures.
    y = margin
    size = unit * rng.uniform(5, 8)
    draw.text((margin, y), _words(words, rng, int(rng.integers(2, 6))).title(), font=_font(fonts, rng, int(size), True),
              fill=_ink(rng))
    y += int(size * 1.8)
    text_size = max(6, int(unit * rng.uniform(2.0, 3.2)))
    body = _font(fonts, rng, text_size, False)
    colour = _ink(rng)
    line = int(text_size * rng.uniform(1.25, 1.6))
    chars_per_line = max(8, int((width - 2 * margin) / (text_size * 0.5)))
    while y < h - margin - line:
        block = rng.random()
        if block < 0.55:  # paragraph
            for _ in range(int(rng.integers(2, 9))):
                if y >= h - margin - line:
                    break
                text = _words(words, rng, 30)[: int(chars_per_line * rng.uniform(0.6, 1.0))]
                while " " in text and body.getlength(text) > width - 2 * margin:  # keep to the margins
                    text = text.rsplit(" ", 1)[0]
                draw.text((margin, y), text, font=body, fill=colour)
                y += line
            y += line // 2
        elif block < 0.65:  # sub-heading
            draw.text((margin, y), _words(words, rng, int(rng.integers(1, 4))).title(),
                      font=_font(fonts, rng, int(text_size * 1.4), True), fill=_ink(rng))
            y += int(line * 1.6)
        elif block < 0.75:  # rule
            draw.line((margin, y + line // 2, width - margin, y + line // 2), fill=_ink(rng), width=max(1, int(unit / 3)))
            y += line
        elif block < 0.88:  # table
            rows, cols = int(rng.integers(2, 7)), int(rng.integers(2, 5))
            cw = (width - 2 * margin) / cols
            rh = int(line * 1.3)
            if y + rows * rh > h - margin:
                continue
            for r in range(rows + 1):
                draw.line((margin, y + r * rh, width - margin, y + r * rh), fill=colour, width=1)
            for c in range(cols + 1):
                draw.line((margin + c * cw, y, margin + c * cw, y + rows * rh), fill=colour, width=1)
            for r in range(rows):
                for c in range(cols):
                    draw.text((margin + c * cw + 3, y + r * rh + 2), _words(words, rng, 2)[: int(cw / (text_size * 0.55))],
                              font=body, fill=colour)
            y += rows * rh + line
        else:  # figure
            fh = int((width - 2 * margin) * rng.uniform(0.25, 0.6))
            fw = int((width - 2 * margin) * rng.uniform(0.4, 1.0))
            if y + fh > h - margin:
                continue
            _figure(draw, img, (margin, y, margin + fw, y + fh), rng, figures)
            y += fh + line
    return np.asarray(img)


# ------------------------------------------------------------------------------ backgrounds


def _noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Smooth noise in about [-1, 1], features about ``scale`` pixels wide."""
    sh, sw = max(2, int(h / scale) + 2), max(2, int(w / scale) + 2)
    small = rng.normal(0, 1, (sh, sw)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def render_background(rng: np.random.Generator, size: frames.Size, kind: str | None = None) -> np.ndarray:
    """A procedural texture [h, w, 3] uint8: wood, fabric, desk or floor (``kind`` None: random)."""
    h, w = size
    kind = kind or BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, 3).astype(np.float32)
    if kind == "wood":
        base = np.array([rng.uniform(90, 190), rng.uniform(55, 120), rng.uniform(20, 70)], np.float32)
        a = rng.uniform(0, np.pi)
        u = xx * math.cos(a) + yy * math.sin(a)
        warp = _noise(rng, h, w, rng.uniform(30, 90)) * rng.uniform(5, 20)
        rings = np.sin((u + warp) / rng.uniform(2, 6)) * 0.5 + 0.5
        shade = 0.75 + 0.25 * rings + 0.08 * _noise(rng, h, w, 8)
        img = base[None, None] * shade[..., None]
    elif kind == "fabric":
        period = rng.uniform(2.5, 6)
        weave = np.sin(xx * 2 * np.pi / period) * np.sin(yy * 2 * np.pi / period)
        shade = 0.85 + 0.1 * weave + 0.08 * _noise(rng, h, w, rng.uniform(10, 40))
        img = base[None, None] * shade[..., None]
    elif kind == "floor":
        tile = rng.uniform(25, 90)
        grout = ((xx % tile) < 2) | ((yy % tile) < 2) if rng.random() < 0.5 else ((yy % tile) < 2)
        shade = 0.9 + 0.15 * _noise(rng, h, w, tile / 2)
        img = base[None, None] * shade[..., None]
        img[grout] *= 0.55
    else:  # desk: smooth colour with speckle
        shade = 0.9 + 0.12 * _noise(rng, h, w, rng.uniform(40, 120))
        img = base[None, None] * shade[..., None] + rng.normal(0, 4, (h, w, 1))
    # clutter: a few dark or bright rectangles and lines (pens, other papers, edges)
    for _ in range(int(rng.integers(0, 4))):
        c = rng.uniform(0, 255, 3)
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        pts = np.array([[x0, y0], [x0 + rng.normal(0, w / 3), y0 + rng.normal(0, h / 3)]], np.int32)
        cv2.line(img, tuple(int(v) for v in pts[0]), tuple(int(v) for v in pts[1]), c.tolist(),
                 int(rng.integers(1, max(2, min(h, w) // 30))))
    return np.clip(img, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ geometry


def page_corners_px(page_size: frames.Size) -> np.ndarray:
    """The outer corners of a page's pixel grid [4, 2]: TL, TR, BR, BL (pixel centres at integers)."""
    h, w = page_size
    return np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]])


def random_corners(rng: np.random.Generator, photo_size: frames.Size, page_aspect: float, max_angle: float = 40.0,
                   perspective: float = 0.12, touch_border: float = 0.15, fill: tuple[float, float] = (0.35, 0.9),
                   ) -> tuple[np.ndarray, float]:
    """Where a page lands in the photo: corners [4, 2] (photo pixels, TL TR BR BL) and its rotation (degrees).

    The page (height/width ``page_aspect``) is scaled so its diagonal is ``fill`` of the photo's
    smaller side's... (drawn uniformly), rotated by up to ``max_angle``, each corner moved by up
    to ``perspective`` of the page's size, and placed at random. Unless the photo is one of the
    ``touch_border`` fraction, placements leaving the frame (with a 2 % margin) are redrawn.
    """
    h, w = photo_size
    touching = rng.random() < touch_border
    for _ in range(50):
        angle = rng.uniform(-max_angle, max_angle)
        diag = rng.uniform(*fill) * math.hypot(h, w) * (1.1 if touching else 1.0)
        pw = diag / math.hypot(1.0, page_aspect)
        ph = pw * page_aspect
        quad = np.array([[-pw / 2, -ph / 2], [pw / 2, -ph / 2], [pw / 2, ph / 2], [-pw / 2, ph / 2]])
        quad += rng.uniform(-perspective, perspective, (4, 2)) * np.array([pw, ph])
        a = math.radians(angle)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        quad = quad @ rot.T
        lo, hi = quad.min(0), quad.max(0)
        span = hi - lo
        if touching:
            centre = rng.uniform([w * 0.2, h * 0.2], [w * 0.8, h * 0.8])
        else:
            margin = 0.02 * np.array([w, h])
            room = np.array([w, h]) - 2 * margin - span
            if (room < 0).any():
                continue
            centre = margin - lo + rng.uniform(0, 1, 2) * room
        quad = quad + centre
        if not _convex(quad):
            continue
        return quad, angle
    raise RuntimeError("no page placement fits this photo; lower fill or perspective")


def _convex(quad: np.ndarray) -> bool:
    cross = []
    for i in range(4):
        a, b, c = quad[i], quad[(i + 1) % 4], quad[(i + 2) % 4]
        cross.append((b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0]))
    return all(c > 0 for c in cross) or all(c < 0 for c in cross)


def homography_from_corners(page_size: frames.Size, corners: np.ndarray) -> np.ndarray:
    """``photo_px_from_page_px`` [3, 3]: the page's outer pixel-grid corners to ``corners``."""
    m = cv2.getPerspectiveTransform(page_corners_px(page_size).astype(np.float32), corners.astype(np.float32))
    return m / m[2, 2]


def theta_for(photo_px_from_page_px: np.ndarray, photo_size: frames.Size, page_size: frames.Size) -> np.ndarray:
    """theta [3, 3] (output normalized -> photo normalized) that flattens the page, for any output size.

    Normalized coordinates do not depend on resolution, so the page's own size stands in for
    the output's: ``photo_px_from_page_px`` is ``input_px_from_output_px`` for that output size
    (``frames.theta_from_pixel_matrix``).
    """
    return frames.theta_from_pixel_matrix(photo_px_from_page_px, photo_size, page_size)


def corners_norm(corners_px: np.ndarray, photo_size: frames.Size) -> np.ndarray:
    """Photo pixel corners [..., 4, 2] -> photo-normalized coordinates."""
    h, w = photo_size
    return (np.asarray(corners_px, np.float64) + 0.5) * np.array([2.0 / w, 2.0 / h]) - 1.0


def corners_px(corners_normalized: np.ndarray, photo_size: frames.Size) -> np.ndarray:
    """Inverse of :func:`corners_norm`."""
    h, w = photo_size
    return (np.asarray(corners_normalized, np.float64) + 1.0) * np.array([w / 2.0, h / 2.0]) - 0.5


def corner_error(pred_px: np.ndarray, true_px: np.ndarray) -> np.ndarray:
    """Corner error [N]: mean distance of the 4 corners to the truth / the page's diagonal in the photo.

    Both [N, 4, 2] in photo pixels (TL TR BR BL); the diagonal is the mean length of the true
    quadrilateral's two diagonals.
    """
    pred_px, true_px = np.asarray(pred_px, np.float64), np.asarray(true_px, np.float64)
    dist = np.linalg.norm(pred_px - true_px, axis=-1).mean(-1)
    diag = 0.5 * (np.linalg.norm(true_px[:, 2] - true_px[:, 0], axis=-1) + np.linalg.norm(true_px[:, 3] - true_px[:, 1], axis=-1))
    return dist / diag


# ------------------------------------------------------------------------------ composing


_NOISE_BANK: dict[int, np.ndarray] = {}


def _noise_patch(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Unit Gaussian noise [h, w, 3] float32: a random crop of a bank drawn once (fresh draws cost more than the warp)."""
    bank = _NOISE_BANK.get(0)
    size = 1024
    if bank is None or bank.shape[0] < h or bank.shape[1] < w:
        size = max(size, h, w)
        bank = _NOISE_BANK[0] = np.random.default_rng(12345).standard_normal((size, size, 3), dtype=np.float32)
    y0, x0 = int(rng.integers(0, bank.shape[0] - h + 1)), int(rng.integers(0, bank.shape[1] - w + 1))
    return bank[y0 : y0 + h, x0 : x0 + w]


def photometric(rng: np.random.Generator, photo: np.ndarray, mask: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Lighting gradient, cast shadow, colour cast, blur, noise and JPEG on a float [h, w, 3] photo in 0..255."""
    h, w = photo.shape[:2]
    # The lighting field is smooth: computed on a coarse grid, then resized (cheap at any photo size).
    lh, lw = max(2, h // 8), max(2, w // 8)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    yy, xx = (yy + 0.5) * (h / lh), (xx + 0.5) * (w / lw)
    # lighting gradient (linear plus a soft spot)
    gx, gy = rng.normal(0, 0.35 * strength, 2)
    light = 1.0 + gx * (xx / w - 0.5) + gy * (yy / h - 0.5)
    if rng.random() < 0.5:
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.3, 1.0) * max(h, w)
        light += rng.uniform(0, 0.25) * strength * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    light *= rng.uniform(0.7, 1.1)
    # cast shadow (a hand, a phone): a soft dark half-plane
    if rng.random() < 0.3 * strength:
        a = rng.uniform(0, 2 * np.pi)
        d = (xx - rng.uniform(0, w)) * math.cos(a) + (yy - rng.uniform(0, h)) * math.sin(a)
        soft = rng.uniform(0.02, 0.1) * max(h, w)
        light *= 1.0 - rng.uniform(0.2, 0.5) / (1.0 + np.exp(-d / soft))
    light = cv2.resize(light.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    cast = rng.uniform(0.85, 1.12, 3).astype(np.float32)  # colour cast (white balance)
    photo = photo * (light[..., None] * cast[None, None])
    if rng.random() < 0.6:
        photo = cv2.GaussianBlur(photo, (0, 0), rng.uniform(0.3, 1.1) * strength + 1e-3)
    photo = photo + _noise_patch(rng, h, w) * np.float32(rng.uniform(0, 6) * strength)
    photo = np.clip(photo, 0, 255).astype(np.uint8)
    if rng.random() < 0.7:
        ok, buf = cv2.imencode(".jpg", photo[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 96))])
        if ok:
            photo = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return np.ascontiguousarray(photo)


@dataclass
class DocumentPhoto:
    """One composed example."""

    photo: np.ndarray  # [H, W, 3] uint8 RGB
    page: np.ndarray  # [h, w, 3] uint8: the upright page as it was placed (at the resolution it was warped from)
    corners: np.ndarray  # [4, 2] photo pixels, TL TR BR BL (outer corners of the page's pixel grid)
    photo_px_from_page_px: np.ndarray  # [3, 3]
    angle: float  # in-plane rotation, degrees
    kind: str  # page kind (PAGE_ASPECTS key, or "folder")

    @property
    def photo_size(self) -> tuple[int, int]:
        return self.photo.shape[0], self.photo.shape[1]

    def theta(self) -> np.ndarray:
        """The true theta [3, 3] that flattens the page (output normalized -> photo normalized)."""
        return theta_for(self.photo_px_from_page_px, self.photo_size, self.page.shape[:2])


PHOTO_ASPECTS = (3 / 4, 4 / 3, 1.0, 16 / 9, 9 / 16)  # height / width


class DocumentGenerator:
    """Composes :class:`DocumentPhoto` examples from pools of pages and backgrounds.

    Rendering a page with text costs tens of milliseconds, so pages and backgrounds are drawn
    into pools (``pool_pages``, ``pool_backgrounds``) and one of each is re-rendered every
    ``refresh`` photos; composing (a warp, the photometric steps) costs about a millisecond
    at training sizes. ``split`` chooses the fonts, text, texture seeds and folder files
    (see the module docstring); ``seed`` makes the stream reproducible.

    ``keyed=True`` makes photo ``n`` a pure function of ``(seed, n)``, so that a training run can
    make any photo again without composing the ones before it (``models.document_train``:
    resumed runs, one generator per data-loading lane): photo ``n`` draws from its own generator
    seeded by ``(seed, 1, n)``; the pools are refreshed in turn, slot by slot (one page and one
    background every ``refresh`` photos), and the ``g``-th rendering of slot ``k`` draws from
    ``(seed, 2, k, g)`` (pages) or ``(seed, 3, k, g)`` (backgrounds). :meth:`seek` brings the pools
    to their state at any photo, re-rendering only the slots that differ. The distribution of
    photos is the same as without ``keyed``; the draws are not.
    """

    def __init__(self, split: str = "train", seed: int = 0, pages: str | Path | None = None,
                 backgrounds: str | Path | None = None, figures: str | Path | None = None,
                 photo_long_side: tuple[int, int] = (192, 320), page_width: int = 420, pool_pages: int = 48,
                 pool_backgrounds: int = 48, refresh: int = 16, max_angle: float = 40.0, perspective: float = 0.12,
                 touch_border: float = 0.15, photometric_strength: float = 1.0, background_size: int = 384,
                 keyed: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self._entropy = seed + (_TEST_SEED_OFFSET if split == "test" else 0)
        self.rng = np.random.default_rng(self._entropy)
        self.keyed = keyed
        self.fonts = split_fonts(find_fonts(), split)
        self.words = word_source(split, self.rng)
        self.page_files = split_files(pages, split, "pages")
        self.background_files = split_files(backgrounds, split, "backgrounds")
        self.figure_files = split_files(figures, split, "figures")
        self.photo_long_side = photo_long_side
        self.page_width = page_width
        self.refresh = refresh
        self.max_angle, self.perspective, self.touch_border = max_angle, perspective, touch_border
        self.strength = photometric_strength
        self.background_size = background_size
        self._count = 0
        if keyed:  # rendered by the first seek() (the first photo's, or a resumed run's), each slot from its own key
            self._pages, self._backgrounds = [None] * pool_pages, [None] * pool_backgrounds
            self._generations = {2: [-1] * pool_pages, 3: [-1] * pool_backgrounds}
        else:
            self._pages = [self._new_page() for _ in range(pool_pages)]
            self._backgrounds = [self._new_background() for _ in range(pool_backgrounds)]

    def _keyed_rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self._entropy, *keys]))

    def seek(self, index: int) -> None:
        """Keyed generators: photo ``index`` (from 0) comes next; the pools are brought to their state there."""
        if not self.keyed:
            raise ValueError("seek needs a keyed generator (DocumentGenerator(..., keyed=True))")
        refreshes = index // self.refresh if self.refresh else 0  # slots re-rendered before photo `index`
        for key, slots, render in ((2, self._pages, self._new_page), (3, self._backgrounds, self._new_background)):
            n, done = len(slots), self._generations[key]
            for k in range(n):
                generation = (refreshes - k + n - 1) // n  # how many of those refreshes hit slot k
                if done[k] != generation:
                    self.rng = self._keyed_rng(key, k, generation)
                    slots[k] = render()
                    done[k] = generation
        self._count = index

    def _new_page(self) -> tuple[np.ndarray, str]:
        if self.page_files and (self.rng.random() < 0.8 or not self.fonts):
            return _read_rgb(self.page_files[int(self.rng.integers(len(self.page_files)))]), "folder"
        kinds = list(PAGE_WEIGHTS)
        kind = kinds[int(self.rng.choice(len(kinds), p=np.array(list(PAGE_WEIGHTS.values()))))]
        width = self.page_width if kind != "receipt" else self.page_width // 2
        return render_page(self.rng, kind, width, self.fonts, self.words, self.figure_files), kind

    def _new_background(self) -> np.ndarray:
        if self.background_files and self.rng.random() < 0.7:
            return _read_rgb(self.background_files[int(self.rng.integers(len(self.background_files)))])
        return render_background(self.rng, (self.background_size, self.background_size))

    def _background(self, size: frames.Size) -> np.ndarray:
        h, w = size
        bg = self._backgrounds[int(self.rng.integers(len(self._backgrounds)))]
        bh, bw = bg.shape[:2]
        frac = self.rng.uniform(0.5, 1.0)
        ch, cw = max(2, int(bh * frac)), max(2, int(min(bw, bh * frac * w / h)))
        ch = min(ch, bh)
        y0, x0 = int(self.rng.integers(0, bh - ch + 1)), int(self.rng.integers(0, bw - cw + 1))
        crop = bg[y0 : y0 + ch, x0 : x0 + cw]
        if self.rng.random() < 0.5:
            crop = crop[:, ::-1]
        return cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=cv2.INTER_LINEAR)

    def photo_size(self) -> tuple[int, int]:
        long_side = int(self.rng.integers(self.photo_long_side[0], self.photo_long_side[1] + 1))
        aspect = PHOTO_ASPECTS[int(self.rng.integers(len(PHOTO_ASPECTS)))]
        if aspect >= 1:
            return long_side, max(16, round(long_side / aspect))
        return max(16, round(long_side * aspect)), long_side

    def __call__(self, photo_size: frames.Size | None = None, effects: bool = True) -> DocumentPhoto:
        """One photo (``effects=False``: no shadows, lighting, blur, noise or JPEG; the geometry is the same)."""
        if self.keyed:
            self.seek(self._count)
            self.rng = self._keyed_rng(1, self._count)
        self._count += 1
        if not self.keyed and self.refresh and self._count % self.refresh == 0:
            self._pages[int(self.rng.integers(len(self._pages)))] = self._new_page()
            self._backgrounds[int(self.rng.integers(len(self._backgrounds)))] = self._new_background()
        h, w = photo_size or self.photo_size()
        page, kind = self._pages[int(self.rng.integers(len(self._pages)))]
        ph, pw = page.shape[:2]
        corners, angle = random_corners(self.rng, (h, w), ph / pw, self.max_angle, self.perspective, self.touch_border)
        # Pre-shrink the page to about its size in the photo (area filter: no aliasing in the warp).
        side = max(np.linalg.norm(corners[1] - corners[0]), np.linalg.norm(corners[2] - corners[3])) / pw
        if side < 0.9:
            page = cv2.resize(page, (max(4, round(pw * side * 1.1)), max(4, round(ph * side * 1.1))),
                              interpolation=cv2.INTER_AREA)
        m = homography_from_corners(page.shape[:2], corners)
        bg = self._background((h, w)).astype(np.float32)
        warped = cv2.warpPerspective(page, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        mask = cv2.warpPerspective(np.ones(page.shape[:2], np.float32), m, (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        # supersampled mask edge: the page's outer corners are exact, so its coverage is too (to ~1/2 px)
        mask = mask[..., None]
        if effects:  # soft shadow under the page
            off = self.rng.normal(0, 0.01, 2) * max(h, w)
            shift = np.float32([[1, 0, off[0]], [0, 1, off[1]]])
            shadow = cv2.warpAffine(mask[..., 0], shift, (w, h))
            shadow = cv2.GaussianBlur(shadow, (0, 0), max(0.5, self.rng.uniform(0.005, 0.02) * max(h, w)))
            bg *= 1.0 - self.rng.uniform(0.2, 0.5) * shadow[..., None]
        photo = bg * (1.0 - mask) + warped.astype(np.float32) * mask
        if effects:
            out = photometric(self.rng, photo, mask, self.strength)
        else:
            out = np.clip(photo + 0.5, 0, 255).astype(np.uint8)
        return DocumentPhoto(out, page, corners, m, angle, kind)


SAMPLE_SEED = 7  # models/default/sample.jpg


def sample_photo(seed: int = SAMPLE_SEED, long_side: int = 1024) -> DocumentPhoto:
    """A larger held-out photo (``split="test"``) of an A4 page, for demos: ``models/default/sample.jpg``.

    The first A4 page the held-out generator draws for ``seed`` at a rotation of 10 to 35 degrees,
    rendered 900 pixels wide (legible text), on a 1024-pixel procedural background.
    """
    gen = DocumentGenerator("test", seed=seed, page_width=900, photo_long_side=(long_side, long_side), pool_pages=1,
                            pool_backgrounds=1, refresh=1, touch_border=0.0, background_size=long_side)
    for _ in range(200):
        d = gen(photo_size=(round(long_side * 3 / 4), long_side))
        if d.kind == "a4" and 10 <= abs(d.angle) <= 35:
            return d
    raise RuntimeError(f"no A4 page at 10-35 degrees in 200 draws of seed {seed}")


def write_sample(path: str | Path, seed: int = SAMPLE_SEED, long_side: int = 1024, quality: int = 88) -> DocumentPhoto:
    """Write :func:`sample_photo` as a JPEG (the bundled ``models/default/sample.jpg``: ``write_sample(that path)``)."""
    d = sample_photo(seed, long_side)
    Path(path).write_bytes(jpeg_bytes(d.photo, quality))
    return d


def jpeg_bytes(photo: np.ndarray, quality: int = 90) -> bytes:
    """An RGB uint8 photo as JPEG bytes (Pillow)."""
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


__all__ = [
    "DISTORTION", "PAGE_ASPECTS", "BACKGROUND_KINDS", "DocumentDataError", "DocumentGenerator", "DocumentPhoto",
    "find_fonts", "split_fonts", "word_source", "split_files", "render_page", "render_background", "random_corners",
    "homography_from_corners", "theta_for", "corners_norm", "corners_px", "corner_error", "page_corners_px",
    "photometric", "jpeg_bytes", "sample_photo", "write_sample",
]
