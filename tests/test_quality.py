import numpy as np

from noiseclr.domains import shapes
from noiseclr.models.shapes.quality import score_images


def test_quality_score_is_perfect_on_rendered_scenes_and_falls_when_captions_do_not_match():
    # The base model's quality bar is only as good as this scorer: a swapped axis or a wrong
    # bin centre would read a model that follows position words as one at chance.
    scenes = shapes.sample_scenes(64, 5, only=shapes.held_out_combinations())
    images = shapes.to_uint8(shapes.render(scenes))
    assert all(v == 1.0 for v in score_images(images, scenes).values())
    shuffled = score_images(images[np.random.default_rng(0).permutation(64)], scenes)
    assert shuffled["position"] < 0.3 and shuffled["shape"] < 0.6 and shuffled["one_object"] == 1.0
    mirrored = score_images(np.ascontiguousarray(images.transpose(0, 2, 1, 3)), scenes)  # x <-> y
    off_diagonal = np.mean(
        [s.x_word != {"top": "left", "middle": "center", "bottom": "right"}[s.y_word] for s in scenes]
    )
    assert mirrored["position"] <= 1 - off_diagonal + 1e-9
