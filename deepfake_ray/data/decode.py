"""The robust image decoder every stage uses: ingest, training, scoring and serving.

Accepts what real face datasets hold (grayscale, RGBA, palette, CMYK, 16-bit,
EXIF-rotated, non-square, large) and turns it into a square RGB uint8 array.
Rejects, with a reason and without hanging, what is not a usable image: empty,
truncated, non-image and HTML files, and decompression bombs (refused from the
header, before any pixel is decoded).
"""
from __future__ import annotations

import functools
import hashlib
import io
import re

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin

from deepfake_ray.data import near_copies

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is rejected, never half-used
# open_image's own header check (data.max_pixels) is the limit: Pillow's fixed one would
# refuse anything above 89 MP whatever data.max_pixels says
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 40_000_000
# the most metadata (ICC profile, EXIF, XMP, thumbnails) a real photo carries, with room
METADATA_BYTES = 16 * 2**20
# a PNG's compressed text (XMP; ImageMagick's EXIF as a hex "Raw profile") can unpack to more
# than Pillow's 1 MB a chunk in a real photo; its 64 MB for all of them bounds the cost
PngImagePlugin.MAX_TEXT_CHUNK = METADATA_BYTES
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
PARSERS = FORMATS[:-1]  # Pillow's JPEG parser opens MPO (a JPEG with more pictures after it)
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
# A progressive JPEG is decoded one scan at a time, each a pass over the whole image, and
# nothing in the format bounds their number: one scan repeated makes a small file that
# takes minutes (16 MP, 2,000 scans in 125 KB: 18 s). Encoders write about 10 (colour),
# those that tune them a few dozen.
MAX_JPEG_SCANS = 100
# Pillow parses a JPEG's header a segment, and a stray or fill byte, at a time in Python, and
# joins Exif segments by copying all before each (time growing with their number squared:
# 245,000 tiny ones in 4.9 MB took 20 s; 5 MB of fill bytes 2 s). Real headers hold a few
# dozen segments (an ICC profile or extended XMP at most 255 more each), one of Exif by the
# standard, and no padding to speak of. A file under HEADER_CHECK_BYTES cannot hold enough
# to cost much (~0.1 s at worst), and is not walked (a face crop's ~10 segments: ~4 us).
MAX_HEADER_SEGMENTS, MAX_EXIF_SEGMENTS, MAX_HEADER_PADDING = 2_000, 256, 64 * 1024
HEADER_CHECK_BYTES = 256 * 1024
# a marker in a scan's coded data: an 0xFF not followed by 0x00 (a coded 0xFF), a restart
# marker (RST0-7) or another 0xFF (fill)
CODED_DATA_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# the next marker: fill bytes (0xFF) before it skipped at once, and counted
NEXT_MARKER = re.compile(rb"(\xff+)([^\xff])")
# Pillow makes a Python object per strip or tile of a TIFF, and reads each on its own (a
# 4.8 MB file of 4.8 million one-row strips took 26 s and 1.5 GB). TIFF's smallest tile
# is 16x16: a strip or tile per 256 pixels is the most any real image needs.
PIXELS_PER_TIFF_BLOCK = 256
# as Pillow accepts them: odd byte orders, and BigTIFF
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"MM*\x00", b"II\x00*", b"MM\x00+", b"II+\x00")
# Pillow decodes some formats in Python (an RLE-compressed BMP), ~0.1 us a pixel: a 5 KB
# file of 40 MP took 4 s. Face photos in them are far smaller.
MAX_PYTHON_DECODED_PIXELS = 4_000_000
# how JPEG, PNG, GIF and TIFF files begin (WebP: "WEBP" at byte 8)
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", *TIFF_SIGNATURES)


# Every reason a file is set aside for, as rejected.parquet and score's tables name it,
# and the HTTP service's answers (their `reason`: with underscores); README's table says more.
REASONS = {
    "empty file": "the file is empty",
    "html page": "the file is a web page (a failed download?)",
    "not an image": "not an image file",
    "unsupported format": "an image format or pixel layout the decoder does not read",
    "truncated": "the image ends early",
    "corrupt": "the image's data is damaged",
    "decompression bomb": "the image claims more pixels (or scans, strips) than data.max_pixels allows",
    "too large": "the file is larger than any image within data.max_pixels can be",
    "killed its decoder": "decoding it ended the process decoding it (data.crashes)",
    "no finite score": "the model gave no finite score for it (a broken model)",
}


class DecodeError(ValueError):
    """`reason` is a short category (for counts), one of REASONS; str(e) is the detail."""

    def __init__(self, reason: str, detail: str = ""):
        # (unpickled, from a helper process, it is called with its whole message first)
        assert reason.partition(":")[0] in REASONS, f"a reason clients are not told of: add {reason!r} to REASONS"
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def max_file_bytes(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The largest file an image within `max_pixels` can be (uncompressed 16-bit RGBA: 8
    bytes a pixel, plus metadata). A larger file (a video or an archive named .jpg) is
    refused before it is read, not read whole into memory to be rejected then."""
    return max_pixels * 8 + METADATA_BYTES


def too_large(e: ValueError) -> DecodeError:
    return DecodeError("too large", f"{e}: more than any image within data.max_pixels can be")


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Header-checked, fully decoded RGB image with EXIF orientation applied."""
    if not data:
        raise DecodeError("empty file")
    head = data[:512].removeprefix(b"\xef\xbb\xbf").lstrip().lower()  # an editor's UTF-8 mark
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        raise DecodeError("html page", "the file is a web page (a failed download?)")
    check_header_cost(data, max_pixels)
    try:
        # only our formats' parsers see the bytes: Pillow's others are more code exposed to
        # what a client sends, and some raise what no caller expects (DDS: NotImplementedError)
        img = Image.open(io.BytesIO(data), formats=PARSERS)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a header plugins choke on is one bad file
        if not data.startswith(SIGNATURES) and data[8:12] != b"WEBP":
            raise DecodeError("not an image", f"not a {FORMAT_NAMES} file")
        # an image's own first bytes: a damaged image, not some other kind of file
        raise damaged(e)
    width, height = img.size
    if width * height > max_pixels or width <= 0 or height <= 0:
        raise DecodeError("decompression bomb",
                          f"header claims {width}x{height} pixels (limit {max_pixels:,})")
    if img.format not in FORMATS:
        raise DecodeError("unsupported format", str(img.format))
    if img.format in ("JPEG", "MPO") and len(img.layer) != img.layers:
        # Pillow opens such a header, and its own accessors (the sampling) then fail with
        # an IndexError that no caller expects
        raise DecodeError("corrupt", f"a JPEG frame header that counts {img.layers} colour "
                                     f"components but describes {len(img.layer)}")
    # progressive only: a sequential JPEG's repeated scans fail libjpeg at once ("broken data
    # stream"), and counting costs ~19 us a photo, 3% of a face crop's whole decode
    if img.info.get("progressive") and jpeg_scans(data) > MAX_JPEG_SCANS:
        raise DecodeError("decompression bomb", f"a JPEG of more than {MAX_JPEG_SCANS} scans, "
                                                "each another pass over the whole image")
    if img.tile and img.tile[0][0] in Image.DECODERS and width * height > MAX_PYTHON_DECODED_PIXELS:
        raise DecodeError("decompression bomb", f"{width}x{height} pixels in a {img.format} encoding "
                                                f"that is decoded in Python (limit {MAX_PYTHON_DECODED_PIXELS:,})")
    return img


def damaged(e: Exception) -> DecodeError:
    """Pillow's error for an image's damaged data as a reason: "truncated" where it says the
    data ends early; else "corrupt" (its "broken data stream" is damage in a file of full
    length)."""
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    message = message.split(" <_io.BytesIO")[0][:200]
    if "MAX_TEXT_" in message or "text chunks" in message:  # PngImagePlugin's limits
        return DecodeError("decompression bomb", f"more PNG text metadata than a photo holds ({message})")
    return DecodeError("truncated" if "truncat" in message.lower() else "corrupt", message)


def inflated_at_open(data: bytes) -> bool:
    """Whether opening `data` inflates compressed chunks, not only reads a header: Pillow
    unpacks a PNG's zTXt/iTXt text and iCCP profile as it opens it (a 64 KB file held
    60 MB of text, 0.8 s to open)."""
    return data.startswith(SIGNATURES[1]) and any(chunk in data for chunk in (b"zTXt", b"iTXt", b"iCCP"))


def check_header_cost(data: bytes, max_pixels: int) -> None:
    """Refuses, before Pillow parses it, a header crafted to take that parse seconds."""
    if len(data) > HEADER_CHECK_BYTES and data.startswith(b"\xff\xd8") and (why := jpeg_header_cost(data)):
        raise DecodeError("decompression bomb", f"a JPEG header of {why}, which Pillow parses a "
                                                "piece at a time")
    if data.startswith(TIFF_SIGNATURES) and (blocks := tiff_blocks(data)) > max_pixels // PIXELS_PER_TIFF_BLOCK:
        raise DecodeError("decompression bomb", f"a TIFF of {blocks:,} strips or tiles (limit "
                                                f"{max_pixels // PIXELS_PER_TIFF_BLOCK:,}), each read on its own")


def jpeg_header_cost(data: bytes) -> str | None:
    """What makes the header before a JPEG's first scan too costly for Pillow's parser,
    walked as it walks it (JpegImageFile._open): each marker its MARKER table lists with a
    handler has a length, the others none (an end of image does not end its walk), a stray
    or fill byte or an escaped 0xFF is one step, an unknown marker ends it (Pillow refuses
    the file)."""
    segments = exif = padding = 0
    i = 2
    while found := NEXT_MARKER.search(data, i):
        padding += found.start() - i + len(found.group(1)) - 1
        marker, i = found.group(2)[0], found.end()
        if marker == 0:  # an escaped 0xFF: skipped
            padding += 2
            continue
        if 0xFF00 | marker not in JpegImagePlugin.MARKER:
            break
        if JpegImagePlugin.MARKER[0xFF00 | marker][2] is not None:  # a segment of its length
            segments += 1
            exif += marker == 0xE1 and data.startswith(b"Exif\x00\x00", i + 2)
            i += int.from_bytes(data[i:i + 2], "big")
        if marker == 0xDA:
            break
        if segments > MAX_HEADER_SEGMENTS:
            return f"more than {MAX_HEADER_SEGMENTS:,} segments"
        if exif > MAX_EXIF_SEGMENTS:
            return f"more than {MAX_EXIF_SEGMENTS} Exif segments (the standard allows one)"
        if padding > MAX_HEADER_PADDING:
            return f"more than {MAX_HEADER_PADDING:,} bytes of padding between its segments"
    return None


def tiff_blocks(data: bytes) -> int:
    """The strips or tiles of a TIFF's first image, as its header counts them (0 where the
    header cannot be read: Pillow tells what is wrong)."""
    order = "little" if data[:2] == b"II" else "big"
    big = data[2] == 43  # BigTIFF: 8-byte counts and offsets, as Pillow reads it

    def number(at: int, size: int) -> int:
        return int.from_bytes(data[at:at + size], order)

    ifd = number(8, 8) if big else number(4, 4)
    entry, width = (20, 8) if big else (12, 4)
    first = ifd + (8 if big else 2)  # past the entries' count
    # StripOffsets, TileOffsets: the largest count, as Pillow may read any of them (it skips
    # an entry it cannot load, and a tag given twice)
    return max((number(at + 4, width) for at in range(first, min(first + number(ifd, 8 if big else 2) * entry,
                                                                len(data) - entry + 1), entry)
                if number(at, 2) in (273, 324)), default=0)


def jpeg_scans(data: bytes) -> int:
    """The main image's scans as libjpeg reads them, counted up to one past the limit: each
    segment is skipped by its length (an end marker's bytes inside a comment end nothing),
    a scan's coded data up to the next marker, stray and fill bytes up to the next marker.
    An end of image before any scan ends a stream of tables only, and libjpeg reads on;
    after a scan it is the image's end: what follows (a Motion Photo's video) is not read."""
    scans, i = 0, 2
    while scans <= MAX_JPEG_SCANS and (found := NEXT_MARKER.search(data, i)):
        marker, i = found.group(2)[0], found.end()
        if marker == 0xD9 and scans:
            break
        if 0xD0 <= marker <= 0xD9 or marker in (0x00, 0x01):  # markers with no length
            continue
        i += int.from_bytes(data[i:i + 2], "big")
        if marker == 0xDA:  # a scan: its coded data runs to the next marker
            scans += 1
            coded = CODED_DATA_END.search(data, i)
            i = coded.start() if coded else len(data)
    return scans


def load_rgb(img: Image.Image, target: int | None = None) -> Image.Image:
    if target and img.format == "JPEG":
        img.draft("RGB", (target, target))  # DCT-domain downscale: decodes big JPEGs fast
    try:
        img.load()
    except MemoryError:  # this machine's, not the file's: never a "corrupt" row
        raise
    # Pillow's plugins raise more than OSError on damaged data (struct.error, TypeError,
    # IndexError): each is one bad file, never a failed stage
    except Exception as e:  # noqa: BLE001
        raise damaged(e)
    img = upright(img)
    try:
        return to_rgb(img)
    except (ValueError, OSError) as e:  # a pixel layout Pillow reads but cannot convert
        raise DecodeError("unsupported format", f"{img.mode} pixels: {str(e)[:160]}")


# EXIF orientation -> the transpose that shows the image as its camera meant
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


QUARTER_TURNS = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270,
                 Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90)


def camera_turn(img: Image.Image) -> Image.Transpose | None:
    """The transpose EXIF asks for, if any."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: the pixels are still good
        return None
    return ORIENTATIONS.get(orientation) if isinstance(orientation, int) else None


def upright(img: Image.Image) -> Image.Image:
    """EXIF orientation applied. Not ImageOps.exif_transpose: it also rewrites the EXIF
    block, which raises on a malformed tag that has nothing to do with orientation (a GPS
    value of the wrong type, as some cameras write), and we keep no metadata anyway."""
    method = camera_turn(img)
    return img.transpose(method) if method is not None else img


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        peak = 65535 if img.mode.startswith("I;16") or arr.max() > 255 else 255
        # by a table of levels, not in float64: a 40 MP image peaked at ~0.7 GB that way
        img = Image.fromarray(grey_levels(peak)[arr if arr.dtype.kind == "u" else np.clip(arr, 0, peak)], "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:  # a palette entry or colour key
        img = img.convert("RGBA")
    if img.mode in ("La", "RGBa"):  # premultiplied alpha (some TIFFs): Pillow converts it one way
        img = img.convert({"La": "LA", "RGBa": "RGBA"}[img.mode])
    if img.mode in ("RGBA", "LA", "PA"):
        # flattened on white by a paste through the alpha: alpha_composite's very pixels (all
        # 65,536 pairs of value and alpha), without its full-size RGBA copies (a 12 MP RGBA
        # PNG's decode peaked at 16 bytes a pixel that way, 11 this way)
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        img = Image.new("RGB", img.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    return img if img.mode == "RGB" else img.convert("RGB")


@functools.cache
def grey_levels(peak: int) -> np.ndarray:
    """The 8-bit grey of each value 0..peak: value / peak * 255, rounded down."""
    return (np.arange(peak + 1) / peak * 255.0).astype(np.uint8)


def square_image(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square (face crops mostly are one: no copy then), resized to `size`."""
    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size[0] != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return img


def decode(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> size x size x 3 uint8, or DecodeError."""
    return pixels(open_image(data, max_pixels), size)


def pixels(img: Image.Image, size: int) -> np.ndarray:
    """An image from open_image (its header read, its pixels not yet) -> size x size x 3 uint8."""
    return np.asarray(square_image(load_rgb(img, size), size), dtype=np.uint8)


def as_stored(img: Image.Image, size: int, quality: int | None) -> np.ndarray:
    """An image from open_image -> the pixels prepare would store for it: square, `size`,
    then through the one JPEG encoding at `quality` (None: not re-encoded). A detector
    learnt on stored images, so it is shown any other image as one."""
    if quality is None or stored_already(img, size, quality):
        return pixels(img, size)
    return decode_jpeg(jpeg_bytes(square_image(load_rgb(img, size), size), quality))


def stored_already(img: Image.Image, size: int, quality: int) -> bool:
    """An image in the stored encoding itself (a stored image saved as a file, e.g. the
    pipeline's held-out test images): encoding it again would not give back its pixels."""
    return (img.format == "JPEG" and img.mode == "RGB" and img.size == (size, size)
            and camera_turn(img) is None and JpegImagePlugin.get_sampling(img) == 0
            and getattr(img, "quantization", None) == stored_tables(quality))


@functools.cache
def stored_tables(quality: int) -> dict:
    probe = Image.linear_gradient("L").resize((16, 16)).convert("RGB")
    return Image.open(io.BytesIO(jpeg_bytes(probe, quality))).quantization


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    """The one JPEG encoding of every stored image, real or fake, so both look alike."""
    if img.mode == "RGB" and encoder_writes_as_save(quality):
        return img.tobytes("jpeg", jpeg_encoder_args(quality))
    return saved_jpeg(img, quality)


def saved_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # comment: Pillow would carry a source's JPEG comment over, which no fake has
    img.save(buf, format="JPEG", quality=quality, subsampling=0, comment=b"")
    return buf.getvalue()


def jpeg_encoder_args(quality: int) -> tuple:
    """What Pillow's save() hands its JPEG encoder for saved_jpeg's settings: RGB, quality,
    not progressive, no smoothing or optimizing, 4:4:4, no restart markers, tables, comment,
    markers or EXIF."""
    return ("RGB", quality, False, 0, False, False, 0, (0, 0), 0, 0, 0, None, b"", b"", b"")


@functools.cache
def encoder_writes_as_save(quality: int) -> bool:
    """Whether the encoder called directly writes save()'s very bytes. It skips ~35 us of
    save()'s own Python (of ~85 us for a 64 px face: 4% of ingest's work per photo), but its
    arguments are Pillow's private order: another Pillow falls back to save()."""
    probe = Image.linear_gradient("L").resize((24, 24)).convert("RGB")
    try:
        return probe.tobytes("jpeg", jpeg_encoder_args(quality)) == saved_jpeg(probe, quality)
    except Exception:  # noqa: BLE001 - any failure means: not this Pillow's order
        return False


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    return jpeg_bytes(Image.fromarray(pixels), quality)


def decode_jpeg(data: bytes) -> np.ndarray:
    """Our own normalized images (already square and sized): no checks needed."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# A real photo's own JPEG encoding stays in its pixels where they are stored unresized
# (Celeb 100k's crops are 128 px JPEGs): its quantisation, and 4:2:0's halved colour detail.
# Stored again at data.jpeg_quality, a real is then encoded twice, a fake once: a detector
# could tell them apart by that alone (one measure of colour detail split 40 of 40 such
# pairs). So prepare records each real's ("jpeg q75 4:2:0"; "" where there is none: not a
# JPEG, or resized, which leaves little of it), and generate gives each fake a real's. The
# quality names the tables libjpeg makes at it; tables no quality makes (a Photoshop or
# camera preset's: Pillow's web_high is nearest q85, 13% off it) are recorded as they are, "jpeg
# t<256 hex digits> 4:4:4", as a near quality would leave fakes a first encoding reals lack.
SUBSAMPLINGS = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}


def jpeg_history(img: Image.Image, size: int) -> str:
    """The encoding an image from open_image leaves in the pixels it is stored as, as
    with_history takes it; "" where none is left (or it is not a colour JPEG)."""
    tables = getattr(img, "quantization", None) or {}
    luma, chroma = tables.get(0), tables.get(1)  # by table id: an encoder may number them otherwise
    if (img.format not in ("JPEG", "MPO") or img.mode != "RGB" or img.size != (size, size)
            or camera_turn(img) is not None or luma is None or chroma is None
            or any(list(t) != list(chroma) for i, t in tables.items() if i > 1)):  # a Cr table of its own
        return ""
    sampling = SUBSAMPLINGS.get(JpegImagePlugin.get_sampling(img))
    return f"jpeg {encoding_of((*luma, *chroma))} {sampling}" if sampling else ""


@functools.lru_cache(maxsize=256)  # a dataset's photos share a few sets of tables
def encoding_of(tables: tuple[int, ...]) -> str:
    """"q75" for the luma and chroma tables libjpeg makes at quality 75; tables no quality
    makes as they are, "t" and their hex (16-bit ones, over 255: the nearest quality)."""
    quality = nearest_quality(tables)
    if tables == tuple(standard_tables()[quality - 1]) or max(tables) > 255:
        return f"q{quality}"
    return f"t{bytes(tables).hex()}"


def nearest_quality(tables: tuple[int, ...]) -> int:
    """The libjpeg quality (1-100) whose standard luma and chroma tables are nearest
    `tables`: the very one for what libjpeg, Pillow, OpenCV and most software write."""
    distance = np.abs(standard_tables() - np.asarray(tables, np.int64)).sum(axis=1)
    return int(np.argmin(distance)) + 1


@functools.cache
def standard_tables() -> np.ndarray:
    """Qualities 1..100 x their luma then chroma table (128 values)."""
    return np.array([[*stored_tables(q)[0], *stored_tables(q)[1]] for q in range(1, 101)], np.int64)


def with_history(picture: Image.Image, history: str) -> Image.Image:
    """`picture` as a JPEG encoding of `history` (jpeg_history's text) leaves it."""
    if not history:
        return picture
    _, encoding, sampling = history.split()
    if encoding.startswith("t"):  # the tables themselves
        tables = bytes.fromhex(encoding[1:])
        how = {"qtables": [list(tables[:64]), list(tables[64:])]}
    else:
        how = {"quality": int(encoding.removeprefix("q"))}
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", subsampling=sampling, **how)
    return Image.open(buf).convert("RGB")


def inspect(data: bytes, size: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """One ingest row: metadata plus the normalized JPEG, or the reason it is unusable."""
    row = {"sha1": sha1(data), "bytes": len(data), "width": 0, "height": 0, "format": "",
           "history": "", "image": None, "thumb": None, "reason": "", "detail": ""}
    try:
        img = open_image(data, max_pixels)
        (width, height), fmt = img.size, img.format
        history = jpeg_history(img, size)  # before load_rgb, whose draft mode may shrink it
        upright = load_rgb(img, size)
        if camera_turn(img) in QUARTER_TURNS:  # the size as displayed, as the pixels are
            width, height = height, width
        row.update(width=width, height=height, format=fmt, history=history)
        square = square_image(upright, size)
        # PIL image to JPEG directly: a numpy round trip cost ~40 us of ~800 per photo
        row["image"], row["thumb"] = jpeg_bytes(square, quality), near_copies.thumbnail(square)
    except DecodeError as e:
        row["reason"], row["detail"] = e.reason, str(e)
    return row
