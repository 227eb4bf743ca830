"""The paper's word features and tasks (§4.2), on hand-written texts."""
import pytest
import torch

import dpg_min as dm


@pytest.mark.parametrize("text, expected", [
    ("what an amazing day", 1.0),
    ("Amazing, truly.", 0.0),                 # single words match with their exact case
    ("it was amazing, really", 1.0),          # punctuation is split off
    ("an amazing-looking cat", 1.0),
    ("amazingly good", 0.0),                  # whole words only
    ("", 0.0),
])
def test_single_word_feature(text, expected):
    assert dm.feature("word:amazing", text) == expected


def test_wikileaks_is_case_sensitive():
    assert dm.feature("word:WikiLeaks", "documents from WikiLeaks today") == 1.0
    assert dm.feature("word:WikiLeaks", "documents from wikileaks today") == 0.0


def test_wordlist_feature_matches_lowercased_words():
    assert dm.feature("list:politics", "The Senate met today") == 1.0
    assert dm.feature("list:politics", "the cat sat") == 0.0
    assert dm.feature("list:sports", "a FOOTBALL match") == 1.0


@pytest.mark.parametrize("text, expected", [
    ("she said her name", 1.0),
    ("She met him", 0.0),                     # one each: not more female
    ("She and her sister met him", 1.0),      # capitalised pronouns count
    ("he said his name was hers", 0.0),
    ("no people here", 0.0),
])
def test_female_feature_counts_pronouns(text, expected):
    assert dm.feature("female", text) == expected


def test_phi_matrix_of_topics_task():
    features = [f for f, _ in dm.TASKS["topics"]]
    phi = dm.phi_matrix(features, ["a physics experiment", "a painting in a museum and a stock market",
                                   "nothing at all"])
    assert phi.dtype == torch.float32 and phi.shape == (3, 4)
    assert phi.tolist() == [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]]


def test_tasks_have_the_paper_targets():
    assert dm.TASKS["amazing"] == [("word:amazing", 1.0)]
    assert [m for _, m in dm.TASKS["topics"]] == [0.25] * 4
    assert dm.TASKS["hybrid-politics"] == [("female", 0.5), ("list:politics", 1.0)]
    for features in dm.TASKS.values():
        for name, mu in features:
            assert 0 < mu <= 1
            if not name.startswith("sentiment:"):      # those need a classifier (tests/test_methods.py)
                dm.feature(name, "text")              # every other feature is known


def test_unknown_feature_is_an_error():
    with pytest.raises(ValueError, match="unknown feature"):
        dm.feature("colour:red", "red")


def test_word_lists_are_ours_and_lowercase():
    for name, words in dm.WORDLISTS.items():
        assert len(words) == len(set(words)), name
        assert all(w == w.lower() and w.isalpha() for w in words), name
