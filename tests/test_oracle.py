import numpy as np
import pytest

from noiseclr.domains import shapes
from noiseclr.domains.oracle import hue_distance, measure


@pytest.fixture(scope="module")
def rendered():
    scenes = shapes.sample_scenes(600, seed=11)
    return scenes, shapes.to_uint8(shapes.render(scenes, 64))


def test_oracle_meets_its_documented_error_on_ground_truth(rendered):
    scenes, images = rendered
    ms = [measure(im) for im in images]
    shape_acc = np.mean([m.shape == s.shape for m, s in zip(ms, scenes, strict=True)])
    hue_err = max(hue_distance(m.hue, s.hue) for m, s in zip(ms, scenes, strict=True))
    pos_err = max(max(abs(m.x - s.x * 64), abs(m.y - s.y * 64)) for m, s in zip(ms, scenes, strict=True))
    size_err = max(abs(m.size - s.size * 64) / (s.size * 64) for m, s in zip(ms, scenes, strict=True))
    assert shape_acc >= 0.98
    assert hue_err <= 10
    assert pos_err <= 2
    assert size_err <= 0.10
    assert all(m.count == 1 for m in ms)
    assert np.mean([m.pattern == s.pattern for m, s in zip(ms, scenes, strict=True)]) >= 0.98
    assert max(abs(m.lightness - s.lightness) for m, s in zip(ms, scenes, strict=True)) <= 0.03


def test_oracle_at_another_resolution():
    scenes = shapes.sample_scenes(100, seed=2)
    images = shapes.to_uint8(shapes.render(scenes, 128))
    for m, s in zip((measure(im) for im in images), scenes, strict=True):
        assert m.shape == s.shape
        assert abs(m.x - s.x * 128) <= 2 and abs(m.y - s.y * 128) <= 2


def test_oracle_counts_objects():
    a, b = shapes.sample_scenes(2, seed=0, fixed={"x": "left", "y": "top", "size": "small"})
    img = shapes.to_uint8(shapes.render([a], 64))[0].copy()
    other = shapes.to_uint8(shapes.render([b], 64))[0]
    img[32:, 32:] = other[:32, :32]  # paste a second object into the empty bottom-right quarter
    assert measure(img).count == 2
    grey = np.full((64, 64, 3), 128, np.uint8)
    empty = measure(grey)
    assert empty.count == 0 and empty.shape is None


def test_oracle_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        measure(np.zeros((64, 64), np.uint8))
