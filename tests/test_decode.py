import io
import re
import time

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from deepfake_ray.data import decode
from tests.images import (bad_files, bomb_png, encode, good_files, jpeg_numbering_its_chroma_table_2,
                          premultiplied_alpha_tiff, rgb, rotated_with_a_malformed_gps_tag)


@pytest.mark.parametrize("name", sorted(good_files()))
def test_accepts_awkward_but_real_images(name):
    pixels = decode.decode(good_files()[name], 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 5  # a real picture, not a blank frame


class Decoded(BaseException):
    """Raised where pixels would be decoded: past the decoder's `except Exception`."""


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_rejects_unusable_files_with_a_reason(name, monkeypatch):
    data, reason = bad_files()[name]
    if reason == "decompression bomb":  # refused from its header: never decoded
        monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (_ for _ in ()).throw(Decoded()))
    started = time.process_time()
    with pytest.raises(decode.DecodeError) as e:
        decode.decode(data, 32)
    assert e.value.reason == reason
    assert time.process_time() - started < 10  # and nothing hangs


def test_a_progressive_photo_with_a_video_after_it_is_no_bomb():
    """A Motion Photo carries its video after the JPEG's end: megabytes in which the bytes
    of a start-of-scan marker turn up by chance (once per 64 KiB), as in large metadata.
    Only the image's own scans count against the limit."""
    video = np.random.default_rng(0).bytes(8_000_000)
    photo = encode(rgb(2, 256), "JPEG", progressive=True, icc_profile=video[:60_000]) + video
    assert photo.count(b"\xff\xda") > decode.MAX_JPEG_SCANS
    assert decode.decode(photo, 32).shape == (32, 32, 3)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_flattened_on_white_as_alpha_compositing_does(mode):
    """Every pair of value and alpha: a see-through pixel is white, an opaque one itself,
    and those between are what Image.alpha_composite over white gives (the stored bytes,
    and so the splits, of images with transparency must not change with how it is done)."""
    value, alpha = (a.astype(np.uint8) for a in np.meshgrid(np.arange(256), np.arange(256)))
    if mode == "RGBA":
        img = Image.fromarray(np.stack([value, 255 - value, value // 3, alpha], -1), "RGBA")
    elif mode == "LA":
        img = Image.fromarray(np.stack([value, alpha], -1), "LA")
    else:  # a palette whose entry i is grey i at alpha 255 - i
        img = Image.fromarray(value, "P")
        img.putpalette([level for i in range(256) for level in (i, i, i)])
        img.info["transparency"] = bytes(255 - i for i in range(256))
        alpha = 255 - value
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    expected = np.asarray(Image.alpha_composite(white, img.convert("RGBA")).convert("RGB"))
    flat = np.asarray(decode.decode(encode(img, "PNG"), 256))
    assert flat.shape == (256, 256, 3) and np.array_equal(flat, expected)
    assert (flat[alpha == 0] == 255).all() and (flat[alpha == 255] != 255).any()


@pytest.mark.parametrize("mode,key", [("RGB", (0, 255, 0)), ("L", 7)])
def test_a_colour_key_is_see_through_as_a_viewer_shows_it(mode, key):
    """A PNG's tRNS colour key (a green screen) in an RGB or grey image: its pixels are
    transparent, flattened on white as alpha is, not kept green."""
    pixels = np.array(rgb(3, 64).convert(mode))
    pixels[(pixels == key).all(-1) if mode == "RGB" else pixels == key] = 128  # a face has no keyed pixel
    pixels[:32] = key  # the top half is the keyed colour
    img = Image.fromarray(pixels, mode)
    flat = decode.decode(encode(img, "PNG", transparency=key), 64)
    assert (flat[:32] == 255).all() and (flat[32:] != 255).any()


def test_premultiplied_alpha_tiff_is_accepted():
    # mode "La": Pillow opens it, but converting it straight to RGB raises, which used to
    # escape the decoder and fail a whole prepare
    pixels = decode.decode(premultiplied_alpha_tiff(rgb(1, 96)), 32)
    assert pixels.shape == (32, 32, 3) and pixels.std() > 5


def test_max_pixels_above_pillows_own_limit_is_honoured():
    claims = bomb_png(10_000)  # 100 MP: over Pillow's fixed 89 MP, under the limit asked for
    with pytest.raises(decode.DecodeError) as refused:
        decode.open_image(claims)  # the default limit, 40 MP
    assert refused.value.reason == "decompression bomb"
    assert decode.open_image(claims, max_pixels=200_000_000).size == (10_000, 10_000)


def test_exif_orientation_is_applied():
    img = decode.open_image(good_files()["exif_rotated.jpeg"])
    assert img.size == (96, 60)  # stored landscape...
    assert decode.load_rgb(img).size == (60, 96)  # ...displayed portrait


def test_a_malformed_exif_tag_does_not_stop_the_rotation_or_the_ingest():
    row = decode.inspect(rotated_with_a_malformed_gps_tag(rgb(5, 96).crop((0, 0, 96, 60))), 32, 90)
    assert row["reason"] == "" and (row["width"], row["height"]) == (60, 96)


def test_manifest_size_is_the_displayed_one():
    row = decode.inspect(good_files()["exif_rotated.jpeg"], 32, 90)
    assert (row["width"], row["height"]) == (60, 96)
    # nearly square: its draft-decoded copy can come out square, which told no turn apart
    stored = rgb(1, 96).resize((1002, 1001))
    exif = stored.getexif()
    exif[0x0112] = 6
    row = decode.inspect(encode(stored, "JPEG", exif=exif), 32, 90)
    assert (row["width"], row["height"]) == (1001, 1002)


def test_not_an_image_detail_names_no_python_object():
    row = decode.inspect(b"just some text, saved as .jpg", 32, 90)
    assert row["reason"] == "not an image" and "<_io" not in row["detail"]


def test_sixteen_bit_keeps_its_range():
    pixels = decode.decode(good_files()["sixteen.png"], 32)
    assert pixels.max() > 128  # scaled down from 16 bits, not clipped to white or black
    assert pixels.min() < 128


def test_a_large_sixteen_bit_photo_is_scaled_without_copies_of_eight_bytes_a_pixel():
    """A 40 MP 16-bit scan peaked at ~0.7 GB when its levels were scaled in float64."""
    import tracemalloc

    ramp = np.repeat(np.linspace(0, 65535, 2000, dtype=np.uint16)[:, None], 3000, axis=1)  # dark to light
    png = encode(Image.fromarray(ramp), "PNG")
    decode.decode(png, 32)  # its tables made once, untracked
    tracemalloc.start()  # numpy reports its arrays to it; Pillow's own buffers are not counted
    try:
        pixels = decode.decode(png, 32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * ramp.size, f"{peak / ramp.size:.1f} bytes a pixel"
    assert pixels.min() < 64 and pixels.max() > 192  # the whole range, scaled down


def test_inspect_row_reports_metadata_and_normalized_jpeg():
    row = decode.inspect(good_files()["wide.png"], 32, 90)
    assert (row["width"], row["height"], row["format"], row["reason"]) == (160, 90, "PNG", "")
    assert decode.decode_jpeg(row["image"]).shape == (32, 32, 3)
    bad = decode.inspect(b"", 32, 90)
    assert bad["image"] is None and bad["reason"] == "empty file"


@pytest.mark.parametrize("quality", [75, 95])
def test_stored_jpeg_is_pillows_own_baseline_444_encoding_without_metadata(quality):
    exif = Image.Exif()
    exif[0x010F] = "SomeCamera"
    source = encode(rgb(7, 80), "JPEG", quality=90, comment=b"from a camera",
                    exif=exif.tobytes())
    row = decode.inspect(source, 48, quality)
    expected = io.BytesIO()  # what Pillow's own save() writes for the same pixels
    Image.fromarray(decode.decode(source, 48)).save(expected, "JPEG", quality=quality, subsampling=0)
    assert row["image"] == expected.getvalue()
    assert decode.encoder_writes_as_save(quality)  # the pinned Pillow takes the faster path
    stored = Image.open(io.BytesIO(row["image"]))
    assert "comment" not in stored.info and "exif" not in stored.info
    assert JpegImagePlugin.get_sampling(stored) == 0 and not stored.info.get("progressive")


def test_another_pillows_encoder_arguments_fall_back_to_its_save(monkeypatch):
    """The direct encoder call uses Pillow's private argument order; where it differs (here:
    progressive where save writes baseline), the stored bytes are still save()'s."""
    real_args = decode.jpeg_encoder_args
    monkeypatch.setattr(decode, "jpeg_encoder_args", lambda q: (*real_args(q)[:2], True, *real_args(q)[3:]))
    decode.encoder_writes_as_save.cache_clear()
    try:
        pixels = np.asarray(rgb(3, 40))
        expected = io.BytesIO()
        Image.fromarray(pixels).save(expected, "JPEG", quality=90, subsampling=0)
        assert decode.encode_jpeg(pixels, 90) == expected.getvalue()
    finally:
        decode.encoder_writes_as_save.cache_clear()


def test_a_header_that_describes_no_components_is_corrupt_as_the_service_decodes_it():
    """At the model's own size and quality the service first asks whether a file is in
    the stored encoding already: that question must not crash on a damaged header."""
    from tests.images import componentless_jpeg

    for size, quality in [(32, 95), (32, None), (64, 95)]:
        with pytest.raises(decode.DecodeError) as e:
            decode.as_stored(decode.open_image(componentless_jpeg(32)), size, quality)
        assert e.value.reason == "corrupt" and "colour components" in str(e.value)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_each_exif_orientation_shows_the_picture_as_the_camera_meant(orientation):
    """Each EXIF orientation turns or mirrors the stored pixels as the standard says (as
    Pillow's own ImageOps.exif_transpose does): a face stored on its side, or mirrored,
    would be stored and scored the wrong way round."""
    from PIL import ImageOps

    picture = rgb(5, 96).crop((0, 0, 96, 60))  # asymmetric: any wrong turn or flip shows
    exif = picture.getexif()
    exif[0x0112] = orientation
    photo = encode(picture, "PNG", exif=exif)  # lossless: the pixels compare exactly
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(photo))).convert("RGB"))
    assert np.array_equal(np.asarray(decode.load_rgb(decode.open_image(photo))), expected)


def test_a_phone_portrait_is_stored_upright():
    """Orientation 6, as phones save a portrait: the stored landscape's top is the
    picture's right side once shown (turned a quarter clockwise)."""
    stored = np.zeros((60, 96, 3), np.uint8)
    stored[:30] = (255, 0, 0)  # top half red, bottom half blue
    stored[30:] = (0, 0, 255)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    photo = encode(img, "PNG", exif=exif)
    for pixels in (decode.decode(photo, 32), decode.decode_jpeg(decode.inspect(photo, 32, 95)["image"])):
        left, right = pixels[:, :12].mean(axis=(0, 1)), pixels[:, -12:].mean(axis=(0, 1))
        assert left[2] > 200 > left[0] and right[0] > 200 > right[2]  # blue left, red right


@pytest.mark.parametrize("size", [(160, 90), (90, 160)])
def test_a_non_square_image_keeps_its_centre(size):
    """Face crops put the face in the middle: a wide or tall image is cut to the square at
    its centre, never at a corner."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[...] = (0, 255, 0)  # the centre 90 x 90 (and a little more) green
    ends = (slice(None), slice(0, 30)) if w > h else (slice(0, 30), slice(None))
    pixels[ends] = (255, 0, 0)  # the first 30 columns (or rows) red, the last 30 blue
    pixels[(slice(None), slice(w - 30, w)) if w > h else (slice(h - 30, h), slice(None))] = (0, 0, 255)
    photo = encode(Image.fromarray(pixels), "PNG")
    for square in (decode.decode(photo, 32), decode.decode_jpeg(decode.inspect(photo, 32, 95)["image"])):
        assert square[..., 1].min() > 200 and square[..., [0, 2]].max() < 50  # all green


def test_only_an_image_in_the_stored_encoding_is_shown_as_it_is():
    """The service shows the detector an image as prepare would have stored it: one at
    another JPEG quality is encoded again, one already in the stored encoding is not."""
    picture = rgb(4, 32)
    for quality in (50, 75):  # other JPEGs of the same size, mode and sampling
        other = encode(picture, "JPEG", quality=quality, subsampling=0)
        shown = decode.as_stored(decode.open_image(other), 32, 95)
        assert np.array_equal(shown, decode.decode_jpeg(decode.inspect(other, 32, 95)["image"]))
        assert not np.array_equal(shown, decode.decode_jpeg(other))
    stored = decode.inspect(encode(picture, "PNG"), 32, 95)["image"]
    assert np.array_equal(decode.as_stored(decode.open_image(stored), 32, 95), decode.decode_jpeg(stored))


def test_a_web_page_is_named_as_one_whatever_its_spacing_and_case():
    """A failed download saves the server's error page: often after a blank line, its
    tags in capitals."""
    for page in (b"\r\n\n  <!DOCTYPE HTML PUBLIC \"-//W3C//DTD HTML 4.01//EN\">\n<HTML><BODY>503</BODY></HTML>",
                 b"\n<html><head><title>404 Not Found</title></head></html>",
                 b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code></Error>',  # S3's
                 b"\xef\xbb\xbf<!DOCTYPE html><html><body>saved by an editor</body></html>"):  # UTF-8 mark
        with pytest.raises(decode.DecodeError) as e:
            decode.decode(page, 32)
        assert e.value.reason == "html page"


def png_with_text(text: str, chunks: int = 1) -> bytes:
    """A photo whose PNG carries `chunks` compressed text chunks (iTXt) of `text`."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for i in range(chunks):
        info.add_itxt(f"XML:com.adobe.xmp.{i}", text, zip=True)
    return encode(rgb(5, 64), "PNG", pnginfo=info)


def test_a_png_with_megabytes_of_compressed_metadata_is_a_photo_and_more_is_a_bomb():
    """Photoshop's XMP or ImageMagick's EXIF as hex text can unpack to more than Pillow's
    1 MB a text chunk (once rejected as "corrupt"); tens of megabytes of text, unpacked
    from a few kilobytes, are refused as what they are."""
    photo = png_with_text(np.random.default_rng(0).bytes(1_500_000).hex())  # 3 MB of hex
    assert decode.decode(photo, 32).std() > 5
    for bomb in (png_with_text("x" * (decode.METADATA_BYTES + 1)), png_with_text("x" * 15_000_000, chunks=5)):
        assert len(bomb) < 200_000
        with pytest.raises(decode.DecodeError) as e:
            decode.decode(bomb, 32)
        assert e.value.reason == "decompression bomb", e.value


@pytest.mark.parametrize("quality", [40, 75, 95])
@pytest.mark.parametrize("subsampling", ["4:4:4", "4:2:2", "4:2:0"])
def test_a_photo_stored_at_its_own_size_records_the_jpeg_encoding_its_pixels_carry(quality, subsampling):
    """Celeb 100k's crops are JPEGs at the stored size: stored again, a real is encoded
    twice and a fake once, unless the fake is given the real's first encoding. What
    prepare records must be the encoding that reproduces the photo's pixels."""
    source = encode(rgb(3, 32), "JPEG", quality=quality, subsampling=subsampling)
    row = decode.inspect(source, 32, 95)
    assert row["history"] == f"jpeg q{quality} {subsampling}"
    given = decode.with_history(rgb(3, 32), row["history"])  # the same picture, given that history
    assert np.array_equal(np.asarray(given), decode.decode(source, 32))


@pytest.mark.parametrize("preset", ["web_high", "medium", "web_low"])
def test_a_photo_saved_with_tables_no_quality_makes_records_the_tables_themselves(preset):
    """Photoshop's and cameras' presets quantise with tables of their own: recorded as the
    nearest libjpeg quality (web_high's: q85, 13% off its tables), a fake was given a first
    encoding no real had, a difference a detector can learn instead of the faces."""
    source = encode(rgb(3, 32), "JPEG", quality=preset)
    history = decode.inspect(source, 32, 95)["history"]
    assert re.fullmatch(r"jpeg t[0-9a-f]{256} 4:[24]:[024]", history), history
    given = decode.with_history(rgb(3, 32), history)
    assert np.array_equal(np.asarray(given), decode.decode(source, 32))
    sixteen_bit = (300, *[2] * 127)  # tables of values over 255: named by the nearest quality
    assert decode.encoding_of(sixteen_bit) == f"q{decode.nearest_quality(sixteen_bit)}"


@pytest.mark.parametrize("kind", ["png", "resized", "grey", "turned", "cmyk", "tables 0 and 2",
                                  "a table of its own for Cr"])
def test_a_photo_whose_jpeg_encoding_is_not_recorded_is_stored_all_the_same(kind):
    """Resized or converted, little or nothing of a JPEG's blocks stays where the stored
    image's are; a PNG never had any. A turned one keeps them, but is not recorded (its
    subsampling turns with it), nor one whose tables are numbered otherwise: a KeyError
    there failed the whole prepare."""
    picture = rgb(4, 32)
    turned = picture.getexif()
    turned[0x0112] = 6
    data = {"png": encode(picture, "PNG"), "resized": encode(rgb(4, 64), "JPEG", quality=75),
            "grey": encode(picture.convert("L"), "JPEG", quality=75),
            "turned": encode(picture, "JPEG", quality=75, exif=turned),
            "cmyk": encode(picture.convert("CMYK"), "JPEG", quality=75),
            "tables 0 and 2": jpeg_numbering_its_chroma_table_2(picture),
            "a table of its own for Cr": encode(picture, "JPEG", qtables=[[2] * 64, [3] * 64, [9] * 64])}[kind]
    row = decode.inspect(data, 32, 95)
    assert row["reason"] == "" and row["history"] == ""
