"""Real image files of every awkward kind a face dataset holds, made on the fly."""
from __future__ import annotations

import io
import os
import struct

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from deepfake_ray.data.sample import face

# Real face photos shipped beside the repository (never copied into it); tests skip without them.
SHARED_UTKFACE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                              "data", "utkface_crop_part1_5k"))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(i: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray(face(7, i, size))


CRASHING = b"crashes the decoder"  # a comment on which tests.processes.crashing_image_library crashes


def crashing_jpeg(i: int) -> bytes:
    """A face image on which the image library that crashing_image_library makes crashes."""
    return encode(rgb(i), "JPEG", comment=CRASHING)


def near_copies(picture: Image.Image) -> dict[str, bytes]:
    """file name -> the same picture saved again, as datasets hold it: recompressed,
    downscaled, blurred, brightened."""
    side = picture.size[0]
    return {"q30.jpg": encode(picture, "JPEG", quality=30),
            "small.jpg": encode(picture.resize((side * 2 // 5,) * 2, Image.Resampling.BILINEAR), "JPEG", quality=90),
            "blurred.jpg": encode(picture.filter(ImageFilter.GaussianBlur(1)), "JPEG", quality=90),
            "brighter.png": encode(ImageEnhance.Brightness(picture).enhance(1.1), "PNG")}


def good_files() -> dict[str, bytes]:
    """name -> bytes of images the decoder must accept."""
    base = rgb(1, 96)
    exif = base.crop((0, 0, 96, 60)).getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    sixteen = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    return {
        "plain.jpg": encode(rgb(2), "JPEG", quality=90),
        "upper.JPG": encode(rgb(3), "JPEG", quality=90),
        "gray.png": encode(base.convert("L"), "PNG"),
        "rgba.png": encode(base.convert("RGBA"), "PNG"),
        "palette.png": encode(base.convert("P"), "PNG"),
        "cmyk.jpg": encode(base.convert("CMYK"), "JPEG"),
        "sixteen.png": encode(sixteen, "PNG"),
        "exif_rotated.jpeg": encode(base.crop((0, 0, 96, 60)), "JPEG", exif=exif),
        "wide.png": encode(base.resize((160, 90)), "PNG"),
        "large.jpg": encode(base.resize((1024, 1024)), "JPEG"),
        "photo.webp": encode(rgb(4), "WEBP"),
        "progressive.jpg": encode(base.resize((256, 256)), "JPEG", quality=90, progressive=True),
    }


def rotated_with_a_malformed_gps_tag(img: Image.Image) -> bytes:
    """A portrait photo (EXIF orientation 6) whose GPS latitude is stored as text instead
    of numbers, as some cameras write it: one byte off a valid file. Pillow's
    ImageOps.exif_transpose raises TypeError on it."""
    exif = img.getexif()
    exif[0x0112] = 6
    exif.get_ifd(0x8825)[2] = (51.0, 30.0, 0.0)  # GPSLatitude: three RATIONALs
    data = bytearray(encode(img, "JPEG", exif=exif))
    entry = data.find(struct.pack(">HHI", 2, 5, 3))  # tag 2, type 5 (RATIONAL), count 3
    data[entry + 2:entry + 4] = struct.pack(">H", 2)  # type 2: ASCII
    return bytes(data)


def premultiplied_alpha_tiff(img: Image.Image) -> bytes:
    """A grayscale TIFF with associated (premultiplied) alpha, which Pillow opens as mode
    "La" but cannot write: a gray+alpha TIFF with its ExtraSamples tag set to 1."""
    import struct

    unassociated, associated = (struct.pack("<HHIHH", 338, 3, 1, value, 0) for value in (2, 1))
    data = encode(img.convert("LA"), "TIFF")
    assert data.count(unassociated) == 1
    return data.replace(unassociated, associated)


def bomb_png(side: int = 30_000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (900 MP by default)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    row = b"\x00" + b"\x00" * side
    idat = zlib.compress(row * 16, 9)  # far fewer rows than claimed: never decoded anyway
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected reason) of files the decoder must reject."""
    jpeg = encode(rgb(5, 96), "JPEG", quality=95)
    webp = encode(rgb(6, 96), "WEBP")
    return {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "notes.png": (b"these are not the pixels you are looking for\n" * 20, "not an image"),
        "cut.png": (encode(rgb(6), "PNG")[:40], "corrupt"),  # an image's first bytes: damaged
        "half.webp": (webp[: len(webp) // 2], "corrupt"),
        "damaged.png": (damaged_png(), "corrupt"),  # all its bytes there: not "truncated"
        "download.jpg": (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "html page"),
        "bomb.png": (bomb_png(), "decompression bomb"),
        "scans.jpg": (many_scans_jpeg(), "decompression bomb"),  # ~20,000 scans: seconds to decode
        "hidden_scans.jpg": (hidden_scans_jpeg(), "decompression bomb"),
        "exif_segments.jpg": (many_exif_segments_jpeg(), "decompression bomb"),
        "comments.jpg": (padded_jpeg(b"\xff\xfe\x00\x02" * 70_000), "decompression bomb"),  # empty ones
        "fill_bytes.jpg": (padded_jpeg(b"\xff" * 300_000), "decompression bomb"),
        # as a folder holds them: prepare reads files by name, whatever format their bytes are
        "strips_tiff.png": (many_strips_tiff(), "decompression bomb"),
        "decoy_strips_tiff.png": (many_strips_tiff(decoy=True), "decompression bomb"),
        "hidden_scans_after_tables.jpg": (b"\xff\xd8\xff\xd9" + many_scans_jpeg(60_000), "decompression bomb"),
        "exif_after_tables.jpg": (padded_jpeg(b"\xff\xd9" + many_exif_segments_jpeg()[2:-2]), "decompression bomb"),
        "escaped_exif.jpg": (padded_jpeg(b"\xff\x00" + many_exif_segments_jpeg()[2:-2]), "decompression bomb"),
        "rle_bmp.png": (wide_rle_bmp(), "decompression bomb"),
        "texture.jpg": (dds_texture(), "not an image"),
        "no_components.jpg": (componentless_jpeg(), "corrupt"),
    }


def damaged_png() -> bytes:
    """A PNG of full length with one byte of its compressed pixels flipped."""
    png = bytearray(encode(rgb(6, 96), "PNG"))
    png[png.find(b"IDAT") + 10] ^= 0xFF
    return bytes(png)


def componentless_jpeg(size: int = 32) -> bytes:
    """A JPEG whose frame header counts 3 colour components but describes none: Pillow
    opens it, and asking its sampling raised IndexError (a 500 from the service)."""
    import struct

    data = encode(rgb(7, size), "JPEG", quality=95, subsampling=0)
    at = data.find(b"\xff\xc0")
    length = struct.unpack(">H", data[at + 2:at + 4])[0]
    frame = b"\xff\xc0" + struct.pack(">H", 8) + data[at + 4:at + 10]
    return data[:at] + frame + data[at + 2 + length:]


def dds_texture() -> bytes:
    """A DirectDraw texture header in a pixel format Pillow's DDS parser refuses with
    NotImplementedError, not the errors a damaged image raises."""
    import struct

    return b"DDS " + struct.pack("<I", 124) + bytes(68) + struct.pack("<II", 32, 0x2000) + bytes(48)


def many_scans_jpeg(size_bytes: int = 250_000) -> bytes:
    """A 512x512 progressive JPEG of `size_bytes`, its smallest scan repeated: within every
    size and pixel limit, and slow to decode, as each scan is another pass over the image."""
    data = encode(Image.new("L", (512, 512), 120), "JPEG", progressive=True, quality=90)
    scans, i = [], 2
    while data[i + 1] != 0xD9:  # marker by marker, up to the end of the image
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if data[i + 1] == 0xDA:  # a scan: its coded data runs on to the next marker
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
            scans.append((i, end))
        i = end
    start, end = min(scans, key=lambda scan: scan[1] - scan[0])
    last = scans[-1][1]
    return data[:last] + data[start:end] * ((size_bytes - len(data)) // (end - start)) + data[last:]


def hidden_scans_jpeg() -> bytes:
    """many_scans_jpeg with a comment after its first scan that holds an end-of-image
    marker's bytes: libjpeg skips the comment by its length and decodes every scan."""
    data = many_scans_jpeg(60_000)
    second_scan = data.find(b"\xff\xda", data.find(b"\xff\xda") + 2)
    return data[:second_scan] + b"\xff\xfe\x00\x04\xff\xd9" + data[second_scan:]


def many_exif_segments_jpeg(segments: int = 20_000) -> bytes:
    """A small JPEG (~280 KB) of `segments` tiny Exif segments, which Pillow's parser joins
    by copying all before each: 245,000 of them took 20 s."""
    import struct

    return padded_jpeg((b"\xff\xe1" + struct.pack(">H", 2 + 10) + b"Exif\x00\x00II*\x00") * segments)


def padded_jpeg(header: bytes) -> bytes:
    """A small JPEG with `header` after its start marker, which Pillow's parser reads a
    segment or a byte at a time (5 MB of fill bytes took 2 s, 1 million empty comments 1 s)."""
    data = encode(rgb(8, 32), "JPEG")
    return data[:2] + header + data[2:]


def many_strips_tiff(strips: int = 160_000, decoy: bool = False) -> bytes:
    """An 8 x `strips` grayscale TIFF (1.3 MP) of one-row strips, all of them the same 8
    bytes: Pillow makes an object of each (4.8 million took 26 s and 1.5 GB). `decoy`: its
    offsets given twice, first with a count of 0, which Pillow skips."""
    import struct

    entries = 10 if decoy else 9
    ifd_at = 16  # after the header and the one row of pixels
    offsets_at = ifd_at + 2 + entries * 12 + 4
    counts_at = offsets_at + strips
    # (tag, type (1 BYTE, 3 SHORT, 4 LONG), count, value or, for more than 4 BYTEs, their offset)
    tags = [(256, 3, 1, 8), (257, 4, 1, strips), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            *([(273, 1, 0, 0)] if decoy else []), (273, 1, strips, offsets_at), (277, 3, 1, 1),
            (278, 3, 1, 1), (279, 1, strips, counts_at)]
    ifd = b"".join(struct.pack("<HHI", tag, kind, count) + struct.pack("<HH" if kind == 3 else "<I", value, *[0] * (kind == 3))
                   for tag, kind, count, value in tags)
    return (b"II*\x00" + struct.pack("<I", ifd_at) + bytes(range(0, 256, 32)) + struct.pack("<H", entries)
            + ifd + bytes(4) + bytes([8]) * strips + bytes([8]) * strips)


def wide_rle_bmp(width: int = 4_001, height: int = 1_000) -> bytes:
    """An 8-bit RLE BMP of one pixel a row, then an end of line: a few KB that Pillow's
    decoder, written in Python, fills out a byte at a time (40,000 x 1,000 took 4 s)."""
    import struct

    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    pixels = b"\x01\x80\x00\x00" * height + b"\x00\x01"  # a run of 1 of grey 128, end of line; end
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def jpeg_numbering_its_chroma_table_2(img: Image.Image) -> bytes:
    """A valid colour JPEG whose quantization tables are ids 0 and 2 (Pillow numbers them
    by id: no table 1), as some encoders write it."""
    data = bytearray(encode(img, "JPEG", quality=75))
    at = 2
    while data[at] == 0xFF and data[at + 1] != 0xDA:  # the segments before the scan
        marker, length = data[at + 1], int.from_bytes(data[at + 2:at + 4], "big")
        if marker == 0xDB:  # DQT: each table's precision and id, then its values
            table = at + 4
            while table < at + 2 + length:
                if data[table] & 0x0F == 1:
                    data[table] = data[table] & 0xF0 | 2
                table += 1 + 64 * (2 if data[table] >> 4 else 1)
        if marker == 0xC0:  # SOF0: each component's table
            for component in range(data[at + 9]):
                selector = at + 10 + 3 * component + 2
                if data[selector] == 1:
                    data[selector] = 2
        at += 2 + length
    return bytes(data)
