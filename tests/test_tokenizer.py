import pytest
from transformers import CLIPTokenizer

from noiseclr.domains import shapes
from noiseclr.models.shapes.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(shapes.vocabulary(), max_length=16)


def test_every_world_word_is_one_token(tokenizer):
    for word in shapes.vocabulary():
        assert len(tokenizer.tokenize(word)) == 1, word


def test_round_trip_of_captions(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    for scene in shapes.sample_scenes(50, seed=0):
        text = shapes.caption(scene.words)
        ids = tokenizer(text, padding="max_length", max_length=16).input_ids
        assert len(ids) == 16 and ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert again(text).input_ids == tokenizer(text).input_ids


def test_unknown_words_still_encode_letter_by_letter(tokenizer):
    assert tokenizer.tokenize("dog") == ["d", "o", "g</w>"]


def test_added_placeholder_tokens_are_single_tokens(tokenizer):
    tokenizer.add_tokens(["<d0>", "<d1>"])
    ids = tokenizer("<d0> <d1>").input_ids
    assert len(ids) == 4


def test_bad_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="lowercase ascii"):
        build_tokenizer(["Red", "ok"], 8)
