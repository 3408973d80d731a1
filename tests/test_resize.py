"""resize_crop / center_crop_resize must equal Pillow's full bilinear resize + crop, bit for bit.

The reference is the model card's code run with the installed Pillow. Real images come from
../shared (the test fails, not skips, when they are missing); synthetic noise covers the sizes
the sample lacks: tiny, extreme aspect ratios, exact multiples, upscales and large downscales,
and every combination of resampled dimensions and pass order that Pillow distinguishes.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobiserve.server.processing import resize
from mobiserve.server.processing.resize import center_crop_resize, resize_crop

SHARED = Path(os.environ.get("MOBISERVE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
SAMPLE = SHARED / "data" / "imagenet-sample"


def pillow(pixels: np.ndarray, resized: tuple[int, int], crop: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(resized, Image.Resampling.BILINEAR).crop(crop))


def card(pixels: np.ndarray) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The model card's resized size and crop box for an [H, W, 3] image."""
    h, w = pixels.shape[:2]
    s = 256 / min(w, h)
    width, height = round(w * s), round(h * s)
    left, top = (width - 224) // 2, (height - 224) // 2
    return (width, height), (left, top, left + 224, top + 224)


def vertical_first(pixels: np.ndarray, resized: tuple[int, int]) -> bool:
    """Pillow 13's pass order (ImagingResampleInner): vertical first when the height shrinks by
    more than twice as many pixels as the width."""
    h, w = pixels.shape[:2]
    return bool(resized[0] != w and h - resized[1] > 0 and h - resized[1] > (w - resized[0]) * 2)


def noise(width: int, height: int) -> np.ndarray:
    return np.random.default_rng(width * 100_003 + height).integers(0, 256, (height, width, 3), np.uint8)


def differences(got: np.ndarray, want: np.ndarray) -> str:
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    where = np.argwhere(got != want)
    return f"{len(where)} values differ, first at {tuple(where[0])}: {got[tuple(where[0])]} != {want[tuple(where[0])]}"


def check_sample(path: Path) -> tuple[str | None, bool]:
    """(failure message or None, whether Pillow takes the vertical pass first) for one JPEG."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    resized, crop = card(pixels)
    got, want = center_crop_resize(pixels), pillow(pixels, resized, crop)
    failure = (
        None
        if np.array_equal(got, want)
        else f"{path.name} {pixels.shape[1]}x{pixels.shape[0]}: {differences(got, want)}"
    )
    return failure, vertical_first(pixels, resized)


@pytest.mark.slow
def test_every_sample_image_is_bit_exact() -> None:
    if not SAMPLE.is_dir():
        pytest.fail(f"test data missing: {SAMPLE} (tests read ../shared beside the project)")
    paths = sorted(SAMPLE.glob("*.JPEG"))
    if len(paths) < 500:
        pytest.fail(f"expected the 515-image sample in {SAMPLE}, found {len(paths)}")
    with ThreadPoolExecutor(max_workers=2) as pool:  # decoding dominates; both release the GIL
        results = list(pool.map(check_sample, paths))
    failures = [failure for failure, _ in results if failure]
    assert not failures, f"{len(failures)} of {len(paths)} images differ:\n" + "\n".join(failures[:20])
    # only portraits taller than 2:1 go vertical first (one image of the sample)
    assert {order for _, order in results} == {False, True}, "the sample should exercise both pass orders"


# (width, height): tiny, extreme aspect ratios, around the crop and resize sizes, exact
# multiples (scale 0.5, 0.25, 0.125), upscales, and large downscales with many taps
SIZES = [
    (8, 8),
    (8, 3000),
    (3000, 8),
    (3000, 9),
    (9, 3000),
    (223, 224),
    (224, 223),
    (224, 224),
    (255, 257),
    (257, 255),
    (256, 256),
    (257, 1000),
    (1000, 257),
    (512, 512),
    (1024, 512),
    (512, 2048),
    (2048, 2048),
    (100, 75),
    (75, 100),
    (31, 200),
    (500, 375),
    (375, 500),
    (2400, 1600),
    (1600, 2400),
    (4000, 3000),
    (801, 6001),
]


@pytest.mark.parametrize(("width", "height"), SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_card_crop_of_noise_is_bit_exact(width: int, height: int) -> None:
    pixels = noise(width, height)
    resized, crop = card(pixels)
    got, want = center_crop_resize(pixels), pillow(pixels, resized, crop)
    assert np.array_equal(got, want), f"{width}x{height} -> {resized} crop {crop}: {differences(got, want)}"


def test_any_size_and_crop_is_bit_exact() -> None:
    """Random sizes (from 1 px) and crops: upscales, downscales, one dimension kept (one pass), none
    changed (a copy), both pass orders, crops touching every edge."""
    rng = np.random.default_rng(1234)
    seen: set[tuple[bool, bool, bool]] = set()
    for case in range(300):
        w, h = (int(v) for v in rng.integers(1, 160, 2))
        ow, oh = (int(v) for v in rng.integers(1, 260, 2))
        if case % 5 == 0:
            ow = w  # horizontal pass skipped
        if case % 7 == 0:
            oh = h  # vertical pass skipped
        if case % 11 == 0:
            ow, oh = max(1, w - int(rng.integers(0, 3))), h // 3 + 1  # vertical first
        left, right = sorted(int(v) for v in rng.integers(0, ow + 1, 2))
        top, bottom = sorted(int(v) for v in rng.integers(0, oh + 1, 2))
        if case % 4 == 0:
            left, top, right, bottom = 0, 0, ow, oh
        pixels = noise(w, h)
        got = resize_crop(pixels, (ow, oh), (left, top, right, bottom))
        want = pillow(pixels, (ow, oh), (left, top, right, bottom))
        seen.add((ow != w, oh != h, vertical_first(pixels, (ow, oh))))
        assert np.array_equal(got, want), (
            f"{w}x{h} -> {ow}x{oh} crop {(left, top, right, bottom)}: {differences(got, want)}"
        )
    assert seen >= {
        (True, True, True),
        (True, True, False),
        (True, False, False),
        (False, True, False),
        (False, False, False),
    }


def test_crop_outside_the_image_is_black_like_pillow() -> None:
    pixels = noise(60, 40)
    for crop in [(-5, -3, 20, 30), (70, 30, 100, 60), (-10, -10, 200, 200), (300, 300, 310, 305)]:
        got, want = resize_crop(pixels, (90, 60), crop), pillow(pixels, (90, 60), crop)
        assert np.array_equal(got, want), f"crop {crop}: {differences(got, want)}"


def test_input_layout_does_not_matter() -> None:
    pixels = noise(300, 200)
    resized, crop = card(pixels)
    want = pillow(pixels, resized, crop)
    for variant in (np.asfortranarray(pixels), np.pad(pixels, ((0, 0), (0, 5), (0, 0)))[:, :300]):
        assert np.array_equal(resize_crop(variant, resized, crop), want)
    readonly = pixels.copy()
    readonly.flags.writeable = False
    assert np.array_equal(center_crop_resize(readonly), want)


def test_threads_do_not_share_scratch_memory() -> None:
    images = [noise(w, h) for w, h in [(500, 375), (375, 500), (640, 480), (300, 1000)]]
    wants = [pillow(p, *card(p)) for p in images]
    failures: list[int] = []

    def work(offset: int) -> None:
        for i in range(20):
            k = (i + offset) % len(images)
            if not np.array_equal(center_crop_resize(images[k]), wants[k]):
                failures.append(k)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_weights_that_could_clip_fall_back_to_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bilinear weights never sum high enough for Pillow's clip to 255 to matter; if they did,
    the numpy passes (which skip the clip) must not be used."""
    pixels = noise(500, 375)
    resized, crop = card(pixels)
    monkeypatch.setattr(resize, "_NO_CLIP_WEIGHT_SUM", 0)
    monkeypatch.setattr(resize, "_vertical", None)  # would raise if called
    resize._coefficients.cache_clear()
    try:
        assert np.array_equal(center_crop_resize(pixels), pillow(pixels, resized, crop))
    finally:
        resize._coefficients.cache_clear()


@pytest.mark.parametrize(
    ("pixels", "resized", "crop"),
    [
        (np.zeros((10, 10), np.uint8), (5, 5), (0, 0, 5, 5)),
        (np.zeros((10, 10, 4), np.uint8), (5, 5), (0, 0, 5, 5)),
        (np.zeros((10, 10, 3), np.float32), (5, 5), (0, 0, 5, 5)),
        (np.zeros((10, 10, 3), np.uint8), (0, 5), (0, 0, 0, 5)),
        (np.zeros((10, 10, 3), np.uint8), (5, 5), (3, 0, 2, 5)),
    ],
    ids=["grey", "rgba", "float", "zero-size", "right<left"],
)
def test_bad_arguments_are_refused(
    pixels: np.ndarray, resized: tuple[int, int], crop: tuple[int, int, int, int]
) -> None:
    with pytest.raises(ValueError):
        resize_crop(pixels, resized, crop)
