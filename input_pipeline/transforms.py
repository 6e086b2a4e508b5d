"""Image transforms for training and evaluation (spec metaclip.md §6.6, evaluation.md §2.1).

All functions are pure: randomness comes in as a ``np.random.Generator`` derived by the caller from
(seed, epoch, record index), so a resumed run makes the same choices.

- ``decode_image``: bytes -> PIL image in RGB, with a pixel-count guard against decompression bombs.
- ``random_resized_crop_params``: torchvision's ``RandomResizedCrop.get_params`` (10 attempts, then the
  centre-crop fallback), drawn from a numpy Generator.
- ``train_image``: decode + RandomResizedCrop(scale=(0.9, 1), ratio=(3/4, 4/3), bicubic) -> uint8 [S, S, 3].
  JPEGs much larger than the crop are decoded at 1/2, 1/4 or 1/8 scale (libjpeg-turbo DCT-domain
  downscaling, through simplejpeg or PIL ``draft``): the crop box is mapped to the reduced image and the
  resize is done from there.
- ``eval_image``: resize the shortest side to S (bicubic) + centre crop -> uint8 [S, S, 3].

The model normalises on device with ``OPENAI_MEAN`` / ``OPENAI_STD``; ``normalize`` is the host-side
equivalent for pipelines that want float32.
"""

from __future__ import annotations

import functools
import importlib
import io
import math
import warnings

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bomb limit (~ 0.25 GiB of RGBA)
CV2_AREA_ABOVE = 1.25  # cv2 resizes shrinking the crop's short side by more than this use INTER_AREA


class ImageTooLarge(ValueError):
    """The image header declares more pixels than allowed (decompression bomb guard)."""


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    """The decompression-bomb guard, applied to the header size before any pixel is decoded."""
    if w * h > max_pixels:
        raise ImageTooLarge(f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w <= 0 or h <= 0:
        raise OSError(f"image with empty size {w}x{h}")
    _check_pixels(w, h, max_pixels)
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit / 32-bit greyscale: PIL's convert("RGB") clips at 255; scale to 8 bits instead.
        a = np.asarray(img, dtype=np.uint32 if img.mode == "I" else np.uint16).astype(np.float32)
        top = 65535.0 if img.mode != "I" or a.max() > 255 else 255.0
        a8 = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha is dropped below
    return img.convert("RGB")  # like the reference loaders: alpha dropped, CMYK/L/LA/YCbCr converted


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image.

    ``draft_size`` (w, h) lets a JPEG decode at a reduced scale whose size is still >= draft_size.
    Raises ``ImageTooLarge`` for bombs, ``OSError``/``ValueError`` etc. for corrupt data.
    """
    img = _open(data, max_pixels)
    if draft_size is not None:
        img.draft("RGB", draft_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img.load()
    return _to_rgb(img)


def random_resized_crop_params(width: int, height: int, rng: np.random.Generator,
                               scale: tuple[float, float] = (0.9, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: returns (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _decode_divisor(box_w: float, box_h: float, size: int, min_scale: float) -> int:
    """The largest JPEG DCT scale divisor (1, 2, 4, 8) keeping the crop box >= ``min_scale * size`` a side.

    libjpeg-turbo can also decode at 3/8, 5/8, 3/4, 7/8, but those scaled IDCTs have no SIMD: on smooth
    images they decode slower than 8/8, and their output is further from the reference pixels.
    """
    divisor = 1
    while divisor < 8 and min(box_w, box_h) / (2 * divisor) >= min_scale * size:
        divisor *= 2
    return divisor


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG simplejpeg should decode, else None (PIL decodes it).

    Only YCbCr and greyscale JPEGs: TurboJPEG converts CMYK/YCCK to RGB too, but rounds differently from
    PIL's conversion (off by one level), and the two decoders must agree.
    """
    sj = _simplejpeg()
    if sj is None or data[:2] != b"\xff\xd8":
        return None
    try:
        h, w, colorspace, _ = sj.decode_jpeg_header(data)
    except ValueError:
        return None
    return (w, h) if w > 0 and h > 0 and colorspace in ("YCbCr", "Gray") else None


def _decode_jpeg_scaled(data: bytes, full_w: int, full_h: int, divisor: int) -> np.ndarray | None:
    """libjpeg-turbo decode at 1/``divisor`` (DCT scaling) straight to RGB numpy; None if it refuses.

    ``strict=True`` turns libjpeg's recoverable warnings (a truncated file, corrupt entropy data) into an
    error, so anything doubtful falls back to PIL, which then decodes it or raises as it always did.
    """
    try:
        return _simplejpeg().decode_jpeg(data, colorspace="RGB", strict=True,
                                         min_width=-(-full_w // divisor),
                                         min_height=-(-full_h // divisor))
    except Exception:  # any refusal means "let PIL decide"
        return None


def train_image(data: bytes, size: int, rng: np.random.Generator, *,
                scale: tuple[float, float] = (0.9, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = True,
                draft_min_scale: float = 1.0, resize_backend: str = "auto",
                jpeg_decoder: str = "auto") -> np.ndarray:
    """Decode + RandomResizedCrop + bicubic resize -> uint8 [size, size, 3].

    With ``draft`` a JPEG is decoded at the largest 1/2^k scale (k <= 3) that keeps the crop box
    >= ``draft_min_scale * size`` pixels a side; the crop box is drawn on the full-resolution header size
    first, so the random draws do not depend on the decode scale.
    ``jpeg_decoder``: "simplejpeg" (libjpeg-turbo straight to numpy; anything it refuses, e.g. CMYK or a
    truncated file, goes to PIL, which decodes it or raises as usual), "pil", or "auto" (simplejpeg when
    installed). Both run libjpeg-turbo with the same settings: equal pixels at equal scale (PIL's ``draft``
    rounds the scaled size down, so it sometimes keeps a larger scale).
    ``resize_backend``: "pil" (PIL bicubic, antialiased; without a draft decode the output equals
    torchvision's ``resized_crop`` on the PIL image; after one the sub-pixel crop box is resized directly),
    "cv2" (OpenCV on the pixel-rounded box: bicubic up to a 1.25x shrink, area averaging beyond) or "auto"
    (cv2 when installed).
    """
    if jpeg_decoder not in ("auto", "simplejpeg", "pil"):
        raise ValueError(f"jpeg_decoder must be 'auto', 'simplejpeg' or 'pil', got {jpeg_decoder!r}")
    if jpeg_decoder == "simplejpeg" and _simplejpeg() is None:
        raise ImportError("jpeg_decoder='simplejpeg' needs the simplejpeg package")
    jpeg = _jpeg_size(data) if jpeg_decoder != "pil" else None
    img = None
    if jpeg is None:
        img = _open(data, max_pixels)
        full_w, full_h = img.size
    else:
        full_w, full_h = jpeg
        _check_pixels(full_w, full_h, max_pixels)
    top, left, h, w = random_resized_crop_params(full_w, full_h, rng, scale, ratio)
    divisor = _decode_divisor(w, h, size, draft_min_scale) if draft else 1
    arr = _decode_jpeg_scaled(data, full_w, full_h, divisor) if jpeg is not None else None
    if arr is None:
        if img is None:
            img = _open(data, max_pixels)
        if divisor > 1 and img.format == "JPEG":
            img.draft("RGB", (-(-full_w // divisor), -(-full_h // divisor)))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        img = _to_rgb(img)
        dec_w, dec_h = img.size
    else:
        dec_h, dec_w = arr.shape[:2]
    sx, sy = dec_w / full_w, dec_h / full_h
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    cv2 = _cv2() if resize_backend in ("auto", "cv2") else None
    if resize_backend == "cv2" and cv2 is None:
        raise ImportError("resize_backend='cv2' needs opencv-python-headless")
    if cv2 is not None:
        # OpenCV: bicubic near 1:1 (e.g. after a reduced-size decode), where antialiasing is moot; area
        # averaging for real downscales, the antialiased filter closest to PIL's antialiased bicubic
        # (mean |diff| ~1 level where plain bicubic aliases at ~4). 2-10x faster than PIL's resize.
        if arr is None:
            arr = np.asarray(img)
        x0, y0 = round(box[0]), round(box[1])
        x1, y1 = max(x0 + 1, round(box[2])), max(y0 + 1, round(box[3]))
        shrink = min(x1 - x0, y1 - y0) / size
        interpolation = cv2.INTER_AREA if shrink > CV2_AREA_ABOVE else cv2.INTER_CUBIC
        return cv2.resize(arr[y0:y1, x0:x1], (size, size), interpolation=interpolation)
    if arr is not None:
        img = Image.fromarray(arr)
    if (dec_w, dec_h) == (full_w, full_h):
        # Full-resolution decode: crop, then resize, exactly like torchvision's resized_crop on PIL images
        # (a resize ``box`` would also read the pixels just outside the crop at its edges).
        out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    else:
        out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out, dtype=np.uint8)


@functools.cache
def _optional_module(name: str):
    """The module if installed, else None (imported once per process)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _simplejpeg():
    return _optional_module("simplejpeg")


@functools.cache
def _cv2():
    """OpenCV if installed (single-threaded: the pipeline parallelises over examples), else None."""
    cv2 = _optional_module("cv2")
    if cv2 is not None:
        cv2.setNumThreads(1)
    return cv2


def eval_image(data: bytes | Image.Image | np.ndarray, size: int, *,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Resize the shortest side to ``size`` (bicubic) + centre crop -> uint8 [size, size, 3].

    Matches torchvision ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on PIL images (open_clip's eval
    transform): the short side becomes exactly ``size``, the long side ``int(size * long / short)``.
    """
    if isinstance(data, np.ndarray):
        arr = data
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        img = Image.fromarray(arr[..., :3].astype(np.uint8))
    elif isinstance(data, Image.Image):
        img = _to_rgb(data)
    else:
        img = decode_image(data, max_pixels)
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    # torchvision CenterCrop: round((H - size) / 2)
    top = round((nh - size) / 2.0)
    left = round((nw - size) / 2.0)
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 normalised with the OpenAI mean/std (host-side variant)."""
    mean = np.asarray(OPENAI_MEAN, np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(OPENAI_STD, np.float32) * 255.0)
    return (images.astype(np.float32) - mean) * inv_std
