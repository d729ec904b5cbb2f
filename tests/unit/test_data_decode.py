import io

import numpy as np
import pytest
from PIL import Image

from prisma_ray.data.decode import FrameSampling, decode_image, decode_video
from prisma_ray.data.errors import REASONS, BadSample

ZOO_MAX_PIXELS = 1_000_000  # tests/conftest.py IMAGE_ZOO_MAX_PIXELS


def _png(array, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, **kw).save(buf, format="PNG")
    return buf.getvalue()


def test_image_zoo_outcomes(image_zoo):
    for name, (data, expected) in image_zoo.items():
        try:
            img = decode_image(data, max_pixels=ZOO_MAX_PIXELS)
        except BadSample as e:
            assert e.reason == expected, f"{name}: {e}"
            assert e.reason in REASONS and e.detail
            continue
        assert expected is None, f"{name} decoded but should fail with {expected}"
        assert img.dtype == np.uint8 and img.shape == (48, 64, 3), name


def test_rgb_png_is_exact():
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_png(rgb)), rgb)


def test_grayscale_is_replicated():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = decode_image(_png(gray))
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_sixteen_bit_gray_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    out = decode_image(_png(values))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])


def test_sixteen_bit_rgb_keeps_the_high_byte(image_zoo):
    # the zoo's rgb16.png holds good.png's pixels times 257 (x * 257 / 257 == x)
    good = decode_image(image_zoo["good.png"][0])
    np.testing.assert_array_equal(decode_image(image_zoo["rgb16.png"][0]), good)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black
    out = decode_image(_png(rgba))
    np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(out[0, 1], (255, 255, 255))
    assert np.all(np.abs(out[1, 0].astype(int) - 127) <= 1)


def test_cmyk_jpeg_round_trips_to_rgb():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:16] = (200, 30, 40)
    rgb[16:] = (20, 180, 90)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG", quality=95)
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "CMYK"
    out = decode_image(buf.getvalue())
    assert np.abs(out.astype(int) - rgb).mean() < 4


def test_exif_orientation_is_applied():
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :10] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", exif=exif)
    out = decode_image(buf.getvalue())
    assert out.shape == (20, 10, 3)
    assert out[:10].min() == 255 and out[10:].max() == 0  # left half is now on top


def test_pixel_guard_is_configurable():
    data = _png(np.zeros((100, 100, 3), np.uint8))
    assert decode_image(data, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(BadSample, match="max_pixels=9999") as err:
        decode_image(data, max_pixels=9_999)
    assert err.value.reason == "too_large"


def test_video_zoo_outcomes(video_zoo):
    sampling = FrameSampling(num_frames=8)
    for name, (data, expected) in video_zoo.items():
        try:
            video = decode_video(data, sampling)
        except BadSample as e:
            assert e.reason == expected, f"{name}: {e}"
            continue
        assert expected is None, f"{name} decoded but should fail with {expected}"
        assert video.frames.shape == (8, 64, 64, 3) and video.frames.dtype == np.uint8, name
        assert video.fps == 8


def test_video_from_path_and_file(video_zoo, tmp_path):
    data = video_zoo["good.mp4"][0]
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    sampling = FrameSampling(num_frames=4, stride=2, anchor="start")
    from_bytes = decode_video(data, sampling)
    with open(path, "rb") as f:
        from_file = decode_video(f, sampling)
    from_path = decode_video(str(path), sampling)
    np.testing.assert_array_equal(from_bytes.frame_index, [0, 2, 4, 6])
    for other in (from_file, from_path):
        np.testing.assert_array_equal(other.frames, from_bytes.frames)


def test_sampled_frames_are_the_right_ones(video_zoo):
    # the blue bar starts at column 2*i in frame i (see tests/conftest.py)
    video = decode_video(video_zoo["good.mp4"][0], FrameSampling(num_frames=3, stride=4, anchor="start"))
    np.testing.assert_array_equal(video.frame_index, [0, 4, 8])
    for frame, index in zip(video.frames, video.frame_index):
        blue_cols = np.where(frame[20, :, 2] > 128)[0]
        assert abs(blue_cols.min() - 2 * index) <= 1


def test_too_short_says_what_is_needed(video_zoo):
    with pytest.raises(BadSample) as err:
        decode_video(video_zoo["good.mp4"][0], FrameSampling(num_frames=13))
    assert err.value.reason == "too_short" and "12 frames" in err.value.detail and "needs 13" in err.value.detail


@pytest.mark.parametrize(
    "sampling, total, fps, expected",
    [
        (dict(num_frames=4), 12, 8.0, [4, 5, 6, 7]),
        (dict(num_frames=4, anchor="start"), 12, 8.0, [0, 1, 2, 3]),
        (dict(num_frames=4, stride=3), 12, 8.0, [1, 4, 7, 10]),
        (dict(num_frames=4, stride=3), 10, 8.0, [0, 3, 6, 9]),
        (dict(num_frames=3, fps=10, anchor="start"), 100, 30.0, [0, 3, 6]),
        (dict(num_frames=3, fps=60, anchor="start"), 100, 30.0, [0, 1, 2]),
    ],
)
def test_frame_indices(sampling, total, fps, expected):
    np.testing.assert_array_equal(FrameSampling(**sampling).indices(total, fps), expected)


def test_frame_sampling_validation():
    with pytest.raises(ValueError, match="either stride or fps"):
        FrameSampling(num_frames=4, stride=2, fps=5)
    with pytest.raises(BadSample, match="needs 10"):
        FrameSampling(num_frames=4, stride=3).indices(9, 8.0)


def test_frame_sampling_offset():
    """`offset` skips source frames before the first sampled one; a video too short for it is a bad sample."""
    assert FrameSampling(num_frames=3, stride=4, anchor="start", offset=2).indices(20, 25.0).tolist() == [2, 6, 10]
    assert FrameSampling(num_frames=3, stride=4, offset=2).indices(15, 25.0).tolist() == [4, 8, 12]
    with pytest.raises(BadSample, match="offset=5"):
        FrameSampling(num_frames=3, stride=4, offset=5).indices(12, 25.0)
