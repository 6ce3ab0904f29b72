"""PP-OCR data and metrics: English words rendered with Pillow and the DejaVu fonts.

The three ONNX files ship inside `rapidocr==3.10.0` (`rapidocr/models/`). Preprocessing follows
rapidocr's own code: RGB pixels / 255, minus 0.5, divided by 0.5; recognition lines are resized to
height 48 keeping the aspect ratio and right-padded with zeros to the batch width (at least 320);
orientation lines to 48 x 192; detection pages are used at their rendered size (a multiple of 32).
The recogniser's CTC dictionary is the `character` metadata of its ONNX file (index 0 is the CTC
blank, the last index a space), read from the packaged file so that a compressed copy without
metadata decodes the same way.

Words come from a fixed list of common English words embedded below; a fixed permutation gives
200 evaluation words, the rest calibrate, so the two never share a word. Fonts: DejaVu (Debian
`fonts-dejavu-core`, override the folder with $SYMSHRINK_FONT_DIR).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from symshrink.errors import BadInput
from symshrink.extras import package_dir, require
from symshrink.models.types import Feeds, InputSpec

__all__ = [
    "RAPIDOCR", "WORDS", "ocr_model_path", "words", "rec_dictionary", "render_text", "rec_batch",
    "cls_batch", "ctc_decode", "rec_feeds", "cls_feeds", "det_feeds", "rec_exact_match",
    "cls_accuracy", "det_f1", "det_pages", "FONT_PACKAGE", "font_dir",
]

RAPIDOCR = "rapidocr==3.10.0"
FONT_PACKAGE = "fonts-dejavu-core"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
MODEL_FILES = {
    "rec": "PP-OCRv6_rec_small.onnx",
    "det": "PP-OCRv6_det_small.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
}
SEED = 0
N_EVAL_WORDS = 200
REC_HEIGHT, REC_MIN_WIDTH = 48, 320
CLS_SHAPE = (48, 192)
BATCH = 16

_WORD_TEXT = """
about above across action active actual after again against agree ahead allow almost alone along
already also always amount animal answer anyone appear apply area argue around arrive article
artist attack author avoid away baby back bank base beat beautiful because become before begin
behind believe best better between beyond black blood blue board body book born both box break
bring brother budget build building business call camera campaign cancer capital card care career
carry case catch cause center central century certain chair challenge chance change character
charge check child choice choose church city civil claim class clear close coach cold collection
college color come common company compare computer concern condition consider contain continue
control cost could country couple course court cover create crime cultural culture cup current
customer cut dark data daughter dead deal death debate decade decide decision deep defense degree
describe design detail determine develop difference different difficult dinner direction director
discover discuss disease doctor door down draw dream drive drop during early east easy economic
economy edge education effect effort eight either election else employee energy enjoy enough enter
entire environment especially establish even evening event ever every evidence exactly example
executive exist expect experience expert explain face fact factor fail fall family fast father
fear federal feel field fight figure fill film final finally financial find fine finger finish fire
firm first fish five floor focus follow food foot force foreign forget form former forward four
free friend front full fund future game garden general generation girl give glass goal good
government great green ground group grow growth guess hair half hand hang happen happy hard head
health hear heart heat heavy help here herself high himself history hold home hope hospital hotel
hour house however huge human hundred husband idea identify image imagine impact important improve
include increase indeed indicate industry inside instead interest interview into investment issue
itself join just keep kind kitchen know land language large last late later laugh lawyer lead
leader learn least leave left legal less letter level life light like likely line list listen
little live local long look lose loss love machine magazine main maintain major majority make
manage management manager many market marriage material matter maybe mean measure media medical
meet meeting member memory mention message method middle might military million mind minute miss
mission model modern moment money month more morning most mother mouth move movement movie much
music must myself name nation national natural nature near nearly necessary need network never
news newspaper next nice night none north note nothing notice number occur offer office officer
official often once only onto open operation option order organization other others outside owner
page pain painting paper parent part particular partner party pass past patient pattern peace
people perform perhaps period person personal phone physical pick picture piece place plan plant
play player point police policy political poor popular population position positive possible power
practice prepare present president pressure pretty prevent price private probably problem process
produce product production professor program project property protect prove provide public pull
purpose push quality question quickly quite race radio raise range rate rather reach read ready
real reality realize really reason receive recent recently record reduce reflect region relate
remain remember remove report represent require research resource respond response rest result
return reveal rich right rise risk road rock role room rule safe same save scene school science
score season seat second section security seek seem sell send senior sense series serious serve
service seven several shake share shoot short shoulder show side sign significant similar simple
simply since sing single sister sit site situation size skill skin small smile social society
soldier some somebody someone something sometimes song soon sort sound source south space speak
special specific speech spend sport spring staff stage stand standard star start state statement
station stay step still stock stop store story strategy street strong structure student study stuff
style subject success successful such suddenly suffer suggest summer support sure surface system
table take talk task teach teacher team technology television tell tend term test thank their
them themselves theory there these they thing think third those though thought thousand threat
three through throughout throw thus today together tonight total tough toward town trade
traditional training travel treat treatment tree trial trip trouble true truth turn type under
understand unit until upon usually value various very victim view violence visit voice vote wait
walk wall want watch water weapon wear week weight well west western what whatever when where
whether which while white whole whom whose wide wife will wind window wish with within without
woman wonder word work worker world worry would write writer wrong yard yeah year young yourself
"""
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))


def font_dir() -> Path:
    """The DejaVu font folder; raises BadInput when the fonts are missing."""
    root = Path(os.environ.get("SYMSHRINK_FONT_DIR", FONT_DIR))
    if not (root / FONTS[0]).is_file():
        raise BadInput(f"DejaVu fonts not found in {root}: install the Debian package {FONT_PACKAGE} "
                       "or set SYMSHRINK_FONT_DIR")
    return root


@functools.lru_cache(maxsize=64)
def _font(index: int, size: int):
    return require("PIL.ImageFont", "rendering text").truetype(str(font_dir() / FONTS[index % len(FONTS)]), size)


def ocr_model_path(kind: str) -> Path:
    """The packaged PP-OCR ONNX file for `kind` ("rec", "det" or "cls")."""
    path = package_dir("rapidocr", "the PP-OCR models") / "models" / MODEL_FILES[kind]
    if not path.is_file():
        raise BadInput(f"{path} is missing: reinstall {RAPIDOCR}")
    return path


def words(split: str) -> list[str]:
    """The fixed word list split into 200 "eval" words and the remaining "calib" words (disjoint)."""
    perm = np.random.default_rng(SEED).permutation(len(WORDS))
    shuffled = [WORDS[i] for i in perm]
    if split == "eval":
        return shuffled[:N_EVAL_WORDS]
    if split == "calib":
        return shuffled[N_EVAL_WORDS:]
    raise BadInput(f"unknown split {split!r}; known: calib, eval")


@functools.lru_cache(maxsize=1)
def rec_dictionary() -> tuple[str, ...]:
    """CTC classes of the recogniser: blank, the `character` metadata of the ONNX file, space."""
    import onnx  # noqa: PLC0415

    model = onnx.load(str(ocr_model_path("rec")), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise BadInput("the packaged PP-OCR recogniser has no character metadata")
    return ("",) + tuple(meta["character"].splitlines()) + (" ",)


def _pil():
    """Pillow's Image and ImageDraw modules (extra zoo-data)."""
    return require("PIL.Image", "rendering text"), require("PIL.ImageDraw", "rendering text")


def render_text(text: str, font: int = 0, size: int = 32, pad: int = 4) -> np.ndarray:
    """Black `text` on white, cropped to its ink box plus `pad` pixels: uint8 RGB [h, w, 3]."""
    pil_image, pil_draw = _pil()
    f = _font(font, size)
    left, top, right, bottom = f.getbbox(text)
    img = pil_image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), "white")
    pil_draw.Draw(img).text((pad - left, pad - top), text, fill="black", font=f)
    return np.asarray(img)


def _normalise(img: np.ndarray) -> np.ndarray:
    return (img.astype(np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5


def _resize_h(img: np.ndarray, height: int, max_width: int | None = None) -> np.ndarray:
    pil_image = _pil()[0]
    h, w = img.shape[:2]
    new_w = int(math.ceil(height * w / h))
    if max_width is not None:
        new_w = min(new_w, max_width)
    return np.asarray(pil_image.fromarray(img).resize((max(new_w, 1), height), pil_image.BILINEAR))


def rec_batch(images: Sequence[np.ndarray], width: int | None = None) -> np.ndarray:
    """Recogniser input [b, 3, 48, W]: height 48 keeping the aspect ratio, zero right-padding to the
    widest line (at least 320), or to a fixed `width`."""
    lines = [_resize_h(img, REC_HEIGHT, width) for img in images]
    w = width or max(REC_MIN_WIDTH, max(x.shape[1] for x in lines))
    out = np.zeros((len(lines), 3, REC_HEIGHT, w), np.float32)
    for i, x in enumerate(lines):
        out[i, :, :, : x.shape[1]] = _normalise(x)
    return out


def cls_batch(images: Sequence[np.ndarray]) -> np.ndarray:
    """Orientation-classifier input [b, 3, 48, 192] (rapidocr's PP-OCRv4 cls shape)."""
    h, w = CLS_SHAPE
    out = np.zeros((len(images), 3, h, w), np.float32)
    for i, img in enumerate(images):
        x = _resize_h(img, h, w)
        out[i, :, :, : x.shape[1]] = _normalise(x)
    return out


def ctc_decode(probs: np.ndarray) -> list[str]:
    """Greedy CTC decoding of recogniser output [b, T, classes]: argmax, merge repeats, drop blanks."""
    chars = rec_dictionary()
    if probs.ndim != 3 or probs.shape[2] != len(chars):
        raise BadInput(f"recogniser output shape {probs.shape} does not match the {len(chars)}-class "
                       "CTC dictionary")
    out = []
    for seq in probs.argmax(axis=2):
        keep = np.ones(len(seq), bool)
        keep[1:] = seq[1:] != seq[:-1]
        keep &= seq != 0
        out.append("".join(chars[i] for i in seq[keep]))
    return out


def _word_style(i: int) -> tuple[int, int]:
    """Font index and size for the i-th word: cycles through the fonts and three sizes."""
    return i % len(FONTS), (28, 32, 40)[(i // len(FONTS)) % 3]


def _rec_items(split: str) -> list[tuple[str, np.ndarray]]:
    return [(w, render_text(w, *_word_style(i))) for i, w in enumerate(words(split))]


def _float_image_input(inputs: Sequence[InputSpec], what: str) -> InputSpec:
    floats = [s for s in inputs if s.dtype.startswith("float")]
    if len(inputs) != 1 or len(floats) != 1 or len(floats[0].shape) != 4:
        got = ", ".join(f"{s.name}:{s.dtype}{list(s.shape)}" for s in inputs) or "none"
        raise BadInput(f"{what} data needs one float image input [batch, 3, h, w]; the model has {got}")
    spec = floats[0]
    if isinstance(spec.shape[1], int) and spec.shape[1] != 3:
        raise BadInput(f"{what} data has 3 colour channels; input {spec.name!r} has {spec.shape[1]}")
    return spec


def _batches(x_list: list, size: int = BATCH) -> list[list]:
    return [x_list[i: i + size] for i in range(0, len(x_list), size)]


def rec_feeds(inputs: Sequence[InputSpec], split: str, n: int | None) -> list[Feeds]:
    """Rendered single words in recogniser format, batches of up to 16 sorted by width."""
    spec = _float_image_input(inputs, "OCR word")
    if isinstance(spec.shape[2], int) and spec.shape[2] != REC_HEIGHT:
        raise BadInput(f"OCR word data has height {REC_HEIGHT}; input {spec.name!r} has {spec.shape[2]}")
    width = spec.shape[3] if isinstance(spec.shape[3], int) else None
    items = _rec_items(split)[:n]
    items.sort(key=lambda t: t[1].shape[1] / t[1].shape[0])
    return [{spec.name: rec_batch([img for _, img in b], width)} for b in _batches(items)]


def _cls_items(split: str) -> list[tuple[int, np.ndarray]]:
    """Each word rendered upright (label 0) and rotated 180 degrees (label 1)."""
    out = []
    for _, img in _rec_items(split):
        out += [(0, img), (1, np.ascontiguousarray(img[::-1, ::-1]))]
    return out


def cls_feeds(inputs: Sequence[InputSpec], split: str, n: int | None) -> list[Feeds]:
    """Upright and 180-degree rotated words in orientation-classifier format [b, 3, 48, 192]."""
    spec = _float_image_input(inputs, "OCR orientation")
    items = _cls_items(split)[:n]
    return [{spec.name: cls_batch([img for _, img in b])} for b in _batches(items)]


PAGE_SHAPE = (480, 640)  # multiples of 32, used without resizing


def det_pages(split: str, n: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rendered pages (uint8 RGB [480, 640, 3]) with ground-truth text-line boxes [k, 4] (x0, y0, x1, y1).

    Each row holds one or two short lines of one to three words at random sizes and fonts, with wide
    gaps between lines and rows so that the detector (which finds text lines) sees one box per line.
    """
    pil_image, pil_draw = _pil()
    ws = words(split)
    rng = np.random.default_rng(SEED + (split == "calib"))
    pages, k = [], 0
    h, w = PAGE_SHAPE
    for _ in range(n if n is not None else 20):
        img = pil_image.new("RGB", (w, h), "white")
        draw = pil_draw.Draw(img)
        boxes = []
        y = int(rng.integers(16, 40))
        while True:
            size = int(rng.choice([20, 24, 28, 32, 40]))
            font = _font(int(rng.integers(len(FONTS))), size)
            if y + size + 8 > h - 16:
                break
            x = int(rng.integers(16, 60))
            for _ in range(2):
                n_words = int(rng.integers(1, 4))
                text = " ".join(ws[(k + i) % len(ws)] for i in range(n_words))
                left, top, right, bottom = font.getbbox(text)
                if x + right - left > w - 16:
                    break
                draw.text((x - left, y - top), text, fill="black", font=font)
                boxes.append((x, y, x + right - left, y + bottom - top))
                k += n_words
                x += right - left + int(rng.integers(4 * size, 6 * size))
            y += size + int(rng.integers(size, 2 * size))
        pages.append((np.asarray(img), np.array(boxes, np.float32).reshape(-1, 4)))
    return pages


def det_feeds(inputs: Sequence[InputSpec], split: str, n: int | None) -> list[Feeds]:
    """Rendered word pages in detector format [1, 3, 480, 640] (n caps the number of pages)."""
    spec = _float_image_input(inputs, "OCR page")
    fixed = [d for d, want in zip(spec.shape[2:], PAGE_SHAPE, strict=True) if isinstance(d, int) and d != want]
    if fixed:
        raise BadInput(f"OCR page data is {PAGE_SHAPE[0]}x{PAGE_SHAPE[1]}; input {spec.name!r} has "
                       f"{spec.shape[2:]}")
    return [{spec.name: _normalise(img)[None]} for img, _ in det_pages(split, n if n is not None else 8)]


def _input_name(session) -> str:
    return session.get_inputs()[0].name


def rec_exact_match(session, n: int | None = None) -> float:
    """Share of the 200 evaluation words that greedy CTC decoding reads exactly."""
    items = _rec_items("eval")[:n]
    items.sort(key=lambda t: t[1].shape[1] / t[1].shape[0])
    name, hits = _input_name(session), 0
    for b in _batches(items):
        texts = ctc_decode(session.run(None, {name: rec_batch([img for _, img in b])})[0])
        hits += sum(t == w for t, (w, _) in zip(texts, b, strict=True))
    return hits / len(items)


def cls_accuracy(session, n: int | None = None) -> float:
    """Orientation accuracy (0 vs 180 degrees) on the 200 evaluation words, upright and rotated (400)."""
    items = _cls_items("eval")[:n]
    name, hits = _input_name(session), 0
    for b in _batches(items):
        probs = session.run(None, {name: cls_batch([img for _, img in b])})[0]
        hits += int((probs.argmax(1) == np.array([lab for lab, _ in b])).sum())
    return hits / len(items)


def _fit_boxes(prob: np.ndarray, thresh: float = 0.3, unclip: float = 1.5) -> np.ndarray:
    """Crude DBNet box fit: threshold the map, label connected components, take each component's
    bounding box and grow it by DBNet's unclip distance (area * ratio / perimeter; ratio 1.5 as in
    PaddleOCR, rapidocr uses 1.6)."""
    from scipy import ndimage  # noqa: PLC0415

    labels, _ = ndimage.label(prob > thresh)
    boxes = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        bw, bh = x1 - x0, y1 - y0
        if min(bw, bh) < 3:
            continue
        d = bw * bh * unclip / (2 * (bw + bh))
        boxes.append((x0 - d, y0 - d, x1 + d, y1 + d))
    return np.array(boxes, np.float32).reshape(-1, 4)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def det_f1(session, n: int | None = None) -> float:
    """Word-box F1 at IoU 0.5 (greedy one-to-one matching) on 20 rendered evaluation pages.

    The box fit is crude (see `_fit_boxes`): use the figure as before/after, not as an absolute."""
    name = _input_name(session)
    tp = n_pred = n_gt = 0
    for img, gt in det_pages("eval", n):
        prob = session.run(None, {name: _normalise(img)[None]})[0][0, 0]
        pred = _fit_boxes(prob)
        n_pred, n_gt = n_pred + len(pred), n_gt + len(gt)
        if len(pred) == 0 or len(gt) == 0:
            continue
        iou = _iou(pred, gt)
        while iou.size and iou.max() >= 0.5:
            i, j = np.unravel_index(iou.argmax(), iou.shape)
            tp += 1
            iou[i, :] = 0
            iou[:, j] = 0
    return 2 * tp / (n_pred + n_gt) if n_pred + n_gt else 0.0
