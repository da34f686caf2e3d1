import numpy as np
import pytest
import torch

from noiseclr.domains import shapes
from noiseclr.domains.dataset import read_image, read_table, write_world


def test_same_seed_same_world_other_seed_other_world():
    a = shapes.sample_scenes(64, seed=3)
    b = shapes.sample_scenes(64, seed=3)
    c = shapes.sample_scenes(64, seed=4)
    assert a == b
    assert a != c
    assert torch.equal(shapes.render(a), shapes.render(b))
    assert not torch.equal(shapes.render(a), shapes.render(c))


def test_render_shape_range_and_resolution():
    images = shapes.render(shapes.sample_scenes(4, seed=0), resolution=96)
    assert images.shape == (4, 3, 96, 96)
    assert images.min() >= 0 and images.max() <= 1


def test_fixed_factors_are_held_and_bad_ones_rejected():
    scenes = shapes.sample_scenes(50, seed=1, fixed={"pattern": "plain", "shape": "square"})
    assert {s.pattern for s in scenes} == {"plain"} and {s.shape for s in scenes} == {"square"}
    with pytest.raises(ValueError, match="unknown factor 'colour'"):
        shapes.sample_scenes(1, seed=0, fixed={"colour": "red"})
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        shapes.sample_scenes(1, seed=0, fixed={"shape": "star"})


def test_both_kinds_of_content_vary():
    scenes = shapes.sample_scenes(200, seed=0)
    assert {s.pattern for s in scenes} == set(shapes.PATTERNS)  # background content
    assert {s.shape for s in scenes} == set(shapes.SHAPES)  # object content


def test_held_out_combinations_never_drawn_for_training():
    held = shapes.held_out_combinations()
    assert 0 < len(held) < len(shapes.all_combinations())
    drawn = shapes.sample_scenes(2000, seed=0, exclude=held)
    assert not {tuple(s.words[f] for f in shapes.FACTORS) for s in drawn} & held
    only = shapes.sample_scenes(100, seed=0, only=held)
    assert {tuple(s.words[f] for f in shapes.FACTORS) for s in only} <= held


def test_caption_round_trip_and_partial_captions():
    scene = shapes.sample_scenes(1, seed=5)[0]
    text = shapes.caption(scene.words)
    assert shapes.parse_caption(text) == scene.words
    assert shapes.caption({"hue": "red", "shape": "circle"}) == "a red circle"
    with pytest.raises(ValueError, match=r"does not know.*'dog'"):
        shapes.parse_caption("a red dog")


@pytest.mark.parametrize("uri", ["memory://world-test", "file://{tmp}/world"])
def test_write_world_round_trip(uri, tmp_path):
    uri = uri.format(tmp=tmp_path)
    table = write_world(uri, n=12, seed=7, progress=False)
    again = read_table(uri)
    assert again.equals(table)
    assert again.num_rows == 12
    expected = shapes.to_uint8(shapes.render(shapes.sample_scenes(12, seed=7)))
    for i, file in enumerate(again.column("file").to_pylist()):
        assert np.array_equal(read_image(uri, file), expected[i])
    assert again.column("caption")[0].as_py() == shapes.caption(shapes.sample_scenes(12, seed=7)[0].words)


def test_read_table_on_a_folder_that_is_not_a_world(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a shapes-world data set"):
        read_table(str(tmp_path))
