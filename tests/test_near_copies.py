import io

import numpy as np
from PIL import Image, ImageEnhance

from deepfake_ray.data import decode, near_copies
from tests.images import near_copies as saved_again, rgb


def thumbnails(images: list[Image.Image], size: int = 64) -> list[bytes]:
    return [near_copies.thumbnail(decode.square_image(im.convert("RGB"), size)) for im in images]


def test_each_picture_groups_with_its_copies_and_nothing_else():
    pictures = [rgb(i, 96) for i in range(150)]
    copies = [Image.open(io.BytesIO(data)) for p in pictures[:50] for data in saved_again(p).values()]
    blank = [Image.new("RGB", (64, 64), (g, g, g)) for g in (40, 200)]  # like nothing, not like each other
    groups = near_copies.groups(thumbnails(pictures + copies + blank))
    # picture i (index i) with its four copies (150 + 4i ...): one group each, no other group
    assert sorted(groups) == [[i, *range(150 + 4 * i, 154 + 4 * i)] for i in range(50)]


def test_grey_with_faint_noise_is_blank_and_the_faintest_face_is_not():
    """A generator collapsed to grey draws faint noise on it: counted as no face, so
    generate warns of it, where at a threshold of 1.0 noise of 1.5 passed as faces."""
    rng = np.random.default_rng(0)

    def grey_with(noise: float) -> list[bytes]:  # the noise at the thumbnail's own scale
        cells = [np.clip(128 + rng.normal(0, noise, (near_copies.THUMB,) * 2), 0, 255).astype(np.uint8)
                 for _ in range(20)]
        return thumbnails([Image.fromarray(c).resize((64, 64), Image.Resampling.NEAREST) for c in cells])

    assert near_copies.blanks(grey_with(1.5)) == 20
    assert near_copies.blanks(grey_with(4.0)) == 0  # as faint as the demo's least-trained fakes (>= 3)


def full_comparison(thumbs: list[bytes]) -> list[list[int]]:
    """The groups that comparing every pair, as it is and one of them flipped, gives."""
    units = near_copies.unit_vectors(thumbs)
    flipped = near_copies.unit_vectors(near_copies.mirrored(thumbs))
    a, b = np.triu_indices(len(thumbs), 1)
    close = np.maximum((units[a] * units[b]).sum(axis=1),
                       (units[a] * flipped[b]).sum(axis=1)) >= near_copies.SIMILAR
    label = near_copies.joined(np.arange(len(thumbs)), np.stack([a[close], b[close]], axis=1))
    return sorted(g for g in (np.flatnonzero(label == i).tolist() for i in np.unique(label)) if len(g) > 1)


def test_the_hash_bands_group_as_a_full_comparison_does():
    """Candidates come from hashing, so a pair the bands missed would leave a picture split:
    checked against comparing every pair, at every likeness from copies to other faces."""
    pictures = [rgb(i, 64) for i in range(200)]
    blends = [Image.blend(pictures[i], pictures[i + 1], alpha) for i in range(0, 100, 2)
              for alpha in (0.05, 0.1, 0.15, 0.2)]  # from near copies to other pictures
    flipped = [b.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for b in blends[1::2]]  # likewise, flipped
    thumbs = thumbnails(pictures + blends + flipped)
    expected = full_comparison(thumbs)
    assert len(expected) >= 40  # the blends span the threshold
    assert sorted(near_copies.groups(thumbs)) == expected


def test_the_groups_are_the_same_whatever_the_number_of_threads(monkeypatch):
    """Bands are checked a wave at a time, one per core, skipping pairs linked by earlier
    waves: the groups must not depend on how many share a wave, on a 2-core laptop or on
    a 16-core node, with one face drawn again and again beside pictures and their blends."""
    pictures = [rgb(i, 64) for i in range(120)]
    blends = [Image.blend(pictures[i], pictures[i + 1], alpha) for i in range(0, 60, 2)
              for alpha in (0.05, 0.15)]
    face = np.frombuffer(thumbnails([rgb(999, 64)])[0], np.uint8).astype(np.int16)
    noise = np.random.default_rng(1).integers(-2, 3, (3000, face.size))
    drawn = [row.tobytes() for row in np.clip(face + noise, 0, 255).astype(np.uint8)]
    thumbs = thumbnails(pictures + blends) + drawn
    found = {}
    for threads in (1, 3, 8):
        monkeypatch.setattr(near_copies, "threads", lambda threads=threads: threads)
        found[threads] = sorted(near_copies.groups(thumbs))
    assert found[1] == found[3] == found[8]
    assert list(range(180, 3180)) in found[8]  # the drawn face: one group
    assert len(found[8]) >= 20  # and the blends' groups beside it


def test_a_generator_drawing_one_face_over_and_over_makes_one_group():
    """Its near copies fill one hash bucket in every band: all their pairs would be 200
    million here (~25 GB: this test would not end); and its mean face is that face, which
    leaves only noise to hash. Its time: benchmarks/near_copies.py."""
    face = np.frombuffer(thumbnails([rgb(0, 64)])[0], np.uint8).astype(np.int16)
    noise = np.random.default_rng(0).integers(-2, 3, (20000, face.size))
    thumbs = [row.tobytes() for row in np.clip(face + noise, 0, 255).astype(np.uint8)]
    assert near_copies.groups(thumbs + [thumbs[0]] * 5000) == [list(range(25000))]


def test_near_copies_beside_thousands_of_one_face_still_group():
    """A generator drawing one face thousands of times fills the runs of equal hash keys
    that another face's copies fall into; each image is paired with its next 32 there
    only, so in the order the images came, those copies were never compared."""
    rng = np.random.default_rng(106)  # copies that share a band (the hash's odds decide that)
    face = np.frombuffer(thumbnails([rgb(0, 64)])[0], np.uint8).astype(np.float64)
    face = face.mean() + (face - face.mean()) * 29 / face.std()
    other = face + rng.normal(0, 10, face.size)  # another face, correlating ~0.94 with it

    def copies(of, sd, n):
        return [np.clip(of + rng.normal(0, sd, of.size), 0, 255).astype(np.uint8).tobytes() for _ in range(n)]

    first, second = copies(other, 3.4, 2)
    thumbs = [first, *copies(face, 2, 3000), second]
    units = near_copies.unit_vectors(thumbs)
    assert units[0] @ units[-1] >= 0.985 and units[0] @ units[1] < 0.95  # a near copy; another face
    assert sorted(near_copies.groups(thumbs)) == [[0, 3001], list(range(1, 3001))]


def test_a_picture_and_its_mirror_image_are_near_copies():
    """Training flips images at random: a flipped copy in the test split is a picture the
    model trained on. UTKFace's first 5,000 crops hold two, each flipped and recoloured."""
    pictures = [rgb(i, 64) for i in range(120)]
    flipped = [ImageEnhance.Color(p.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).enhance(1.3)
               for p in pictures[:40]]
    thumbs = thumbnails(pictures + flipped)
    units = near_copies.unit_vectors(thumbs)
    assert all(units[i] @ units[120 + i] < near_copies.SIMILAR for i in range(40))  # not alike unflipped
    assert sorted(near_copies.groups(thumbs)) == [[i, 120 + i] for i in range(40)]
    assert near_copies.groups(thumbs[:1]) == near_copies.groups([]) == []
