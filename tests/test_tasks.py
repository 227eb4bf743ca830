"""The paper's features and tasks (§4.2), the EBM's log P (§4.1), the sentiment classifier, and the
tiny model's vocabulary and base rates."""
import math

import pytest
import torch

import dpg_min as dm

INF = math.inf


def task_config(tmp_path, **changes):
    return dm.Config(**{"out": str(tmp_path / "o"), **changes})


# -- features -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("what an amazing day", 1.0),
    ("Amazing, truly.", 0.0),                 # a single word matches with its exact case
    ("it was amazing, really", 1.0),          # punctuation is split off
    ("an amazing-looking cat", 1.0),
    ("amazingly good", 0.0),                  # whole words only
    ("", 0.0),
])
def test_word_feature_matches_whole_words_with_their_case(text, expected):
    assert dm.feature("word:amazing", text) == expected


def test_wikileaks_is_case_sensitive():
    assert dm.feature("word:WikiLeaks", "documents from WikiLeaks today") == 1.0
    assert dm.feature("word:WikiLeaks", "documents from wikileaks today") == 0.0


def test_wordlist_feature_matches_lowercased_words():
    assert dm.feature("list:politics", "The Senate met today") == 1.0
    assert dm.feature("list:politics", "the cat sat") == 0.0
    assert dm.feature("list:sports", "a FOOTBALL match") == 1.0
    assert dm.feature("list:mine", "a Zebra", {"mine": ("zebra",)}) == 1.0


@pytest.mark.parametrize("text, expected", [
    ("she said her name", 1.0),
    ("She met him", 0.0),                     # one each: not more female
    ("She and her sister met him", 1.0),      # capitalised pronouns count
    ("HERSELF", 1.0),
    ("he said his name was hers", 0.0),
    ("no people here", 0.0),
])
def test_female_feature_counts_more_female_than_male_pronouns(text, expected):
    assert dm.feature("female", text) == expected


def test_unknown_feature_is_an_error():
    with pytest.raises(ValueError, match="unknown feature"):
        dm.feature("colour:red", "red")


def test_word_lists_are_lowercase_words_without_repeats():
    for name, words in dm.WORDLISTS.items():
        assert len(words) == len(set(words)) > 0, name
        assert all(w == w.lower() and w.isalpha() for w in words), name


def test_phi_matrix_of_the_topics_task():
    features = [f for f, _ in dm.TASKS["topics"]]
    phi = dm.phi_matrix(features, ["a physics experiment",
                                   "a painting in a museum and a stock market", "nothing"])
    assert phi.dtype == torch.float32 and phi.shape == (3, 4)
    assert phi.tolist() == [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]]
    assert dm.phi_matrix(features, []).shape == (0, 4)


def test_tasks_have_the_paper_targets():
    assert dm.TASKS["amazing"] == [("word:amazing", 1.0)]
    assert dm.TASKS["wikileaks"] == [("word:WikiLeaks", 1.0)]
    assert dm.TASKS["female"] == [("female", 0.5)]
    assert [m for _, m in dm.TASKS["topics"]] == [0.25] * 4
    assert dm.TASKS["hybrid-sports"] == [("female", 0.5), ("list:sports", 1.0)]
    assert dm.TASKS["hybrid-politics"] == [("female", 0.5), ("list:politics", 1.0)]
    assert len(dm.TASKS) == 10
    for features in dm.TASKS.values():
        for name, mu in features:
            assert 0 < mu <= 1
            if not name.startswith("sentiment:"):      # those ask a classifier (below)
                dm.feature(name, "text")               # every other feature is known


# -- load_task ----------------------------------------------------------------------------------


def test_load_task_of_a_paper_task_and_of_a_custom_word(tmp_path):
    features, mu_bar, wordlists = dm.load_task(task_config(tmp_path, task="hybrid-sports"))
    assert features == ["female", "list:sports"] and mu_bar == [0.5, 1.0]
    assert wordlists == dm.WORDLISTS
    assert dm.load_task(task_config(tmp_path, word="zebra"))[:2] == (["word:zebra"], [1.0])
    topics = dm.load_task(task_config(tmp_path, task="topics", moments="0.1,0.2,0.3,0.4"))
    assert topics[1] == [0.1, 0.2, 0.3, 0.4]


def test_custom_word_list_file_is_read_lowercased(tmp_path):
    path = tmp_path / "animals.txt"
    path.write_text("# my list\nZebra\n\n  okapi  \n")
    cfg = task_config(tmp_path, wordlist=str(path), moments="0.5")
    features, mu_bar, wordlists = dm.load_task(cfg)
    assert features == [f"list:{path}"] and mu_bar == [0.5]
    assert wordlists[str(path)] == ("zebra", "okapi")
    assert dm.feature(features[0], "a Zebra ran", wordlists) == 1.0
    both = dm.load_task(task_config(tmp_path, word="Lion", wordlist=str(path)))
    assert both[0] == ["word:Lion", f"list:{path}"] and both[1] == [1.0, 1.0]


def test_a_bad_word_list_line_is_named_by_number_without_echoing_the_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# a comment\nzebra\n\nmy secret password\nokapi\n")
    with pytest.raises(dm.BadInput) as info:
        dm.load_task(task_config(tmp_path, wordlist=str(path)))
    assert "line 4 is not one" in str(info.value) and "secret" not in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_a_word_list_that_is_not_utf8_is_bad_input(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(dm.BadInput, match="UnicodeDecodeError"):
        dm.load_task(task_config(tmp_path, wordlist=str(path)))


# -- log P: hard factors and λ -----------------------------------------------------------------


def test_log_P_of_hybrid_task_is_minus_inf_where_the_hard_feature_is_absent_and_tilted_elsewhere():
    """hybrid-sports: φ = (female, sports), μ̄ = (0.5, 1): sports is an exact factor, λ weighs
    female alone."""
    features = [f for f, _ in dm.TASKS["hybrid-sports"]]
    mu_bar = [m for _, m in dm.TASKS["hybrid-sports"]]
    phi = dm.phi_matrix(features,
                        ["she played football", "he played football", "she said so", "a cat"])
    logp_a = torch.tensor([-1.0, -2.0, -3.0, -4.0], dtype=torch.float64)
    lam = torch.tensor([0.7], dtype=torch.float64)
    log_P = dm.log_P_of(logp_a, phi, mu_bar, lam)
    assert log_P.dtype == torch.float64 and log_P.tolist() == [-1.0 + 0.7, -2.0, -INF, -INF]


@pytest.mark.parametrize("phi, mu_bar, lam, expected", [
    ([[1.0], [0.0]], [1.0], [], [-1.0, -INF]),                  # pointwise: P = a·φ
    ([[1.0], [0.0]], [0.0], [], [-INF, -2.0]),                  # μ̄ = 0: the feature must be absent
    # all soft: a·exp(λ·φ), never −inf
    ([[1.0, 0.0], [0.0, 1.0]], [0.25, 0.25], [0.5, -1.0], [-0.5, -3.0]),
    ([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], [1.0, 0.3, 0.0], [2.0],
     [1.0, -2.0, -INF]),
])
def test_log_P_of_hard_factors_and_soft_lambdas(phi, mu_bar, lam, expected):
    logp_a = torch.tensor([-1.0, -2.0, -3.0][:len(phi)], dtype=torch.float64)
    log_P = dm.log_P_of(logp_a, torch.tensor(phi), mu_bar, torch.tensor(lam, dtype=torch.float64))
    assert log_P.tolist() == expected and not log_P.isnan().any()


# -- sentiment: the classifier through the transformers pipeline --------------------------------


@pytest.fixture(scope="module")
def tiny_classifiers(tmp_path_factory):
    """Two random tiny classifiers saved to folders, as downloaded ones would be: the same weights,
    with their labels in either order. They check plumbing, not sentiment."""
    root = tmp_path_factory.mktemp("classifiers")
    paths = {}
    for name, labels in (("neg_pos", ("NEGATIVE", "POSITIVE")),
                         ("pos_neg", ("positive", "negative")),
                         ("spam", ("SPAM", "HAM"))):
        model, tokenizer = dm.build_tiny(dm.tiny_vocab(), seed=3, labels=labels)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="module")
def texts(lm):
    a, tokenizer = lm
    torch.manual_seed(0)
    return tokenizer.batch_decode(dm.sample(a, 70, 12, 0)[0][:, 1:].tolist())


def test_tiny_sentiment_classifier_gives_its_argmax_label_in_batches_or_alone(texts):
    classify = dm.load_classifier("tiny", "cpu")
    phi = dm.phi_matrix(["sentiment:positive", "sentiment:negative", "word:amazing"], texts,
                        classify=classify)
    # two labels
    assert phi.shape == (70, 3) and torch.equal(phi[:, 0] + phi[:, 1], torch.ones(70))
    assert 0 < phi[:, 0].mean() < 1                                 # the random model says both
    alone = [r["label"] == "POSITIVE" for r in classify(texts, batch_size=1)]
    # 70 texts in padded batches of 32 = one by one
    assert phi[:, 0].tolist() == [float(x) for x in alone]
    with torch.no_grad():
        logits = classify.model(**classify.tokenizer(texts[:1], return_tensors="pt")).logits
    label = classify.model.config.id2label[logits.argmax().item()]
    assert phi[0, 0].item() == float(label == "POSITIVE")


def test_sentiment_labels_are_mapped_by_name_not_by_index(tiny_classifiers, texts):
    neg_pos = dm.load_classifier(tiny_classifiers["neg_pos"], "cpu")
    pos_neg = dm.load_classifier(tiny_classifiers["pos_neg"], "cpu")
    features = ["sentiment:positive", "sentiment:negative"]
    phi = dm.phi_matrix(features, texts, classify=neg_pos)
    swapped = dm.phi_matrix(features, texts, classify=pos_neg)
    assert 0 < phi[:, 0].mean() < 1 and torch.equal(phi, swapped.flip(1))


def test_a_classifier_without_positive_and_negative_labels_is_bad_input(tiny_classifiers):
    message = r"has labels \['SPAM', 'HAM'\], not positive and negative"
    with pytest.raises(dm.BadInput, match=message):
        dm.load_classifier(tiny_classifiers["spam"], "cpu")


# -- the tiny model -----------------------------------------------------------------------------


def test_tiny_vocabulary_holds_every_task_word():
    vocab = dm.tiny_vocab()
    assert len(vocab) == len(set(vocab)) == 1000
    assert all(set(words) <= set(vocab) for words in dm.WORDLISTS.values())
    assert {"amazing", "WikiLeaks", *dm.FEMALE, *dm.MALE} <= set(vocab)
    assert "zebra" in dm.tiny_vocab(extra=["zebra"]) and "zebra" not in vocab


@pytest.fixture(scope="module")
def phi_of_a(lm):
    """4096 samples of the tiny a at T = 20 (the TINY preset's), and φ of every built-in
    non-sentiment feature."""
    a, tokenizer = lm
    features = sorted({f for task in dm.TASKS.values() for f, _ in task
                       if not f.startswith("sentiment:")})
    torch.manual_seed(0)
    ids, _ = dm.sample(a, 4096, dm.TINY["seq_len"], 0, 1024)
    return features, dm.phi_matrix(features, tokenizer.batch_decode(ids[:, 1:].tolist())).double()


def test_tiny_base_rates_leave_every_feature_something_to_learn(phi_of_a):
    """Each built-in feature fires in 0.5%-40% of samples of the tiny a: neither absent nor
    common."""
    features, phi = phi_of_a
    for name, rate in zip(features, phi.mean(0).tolist()):
        assert 0.005 <= rate <= 0.40, (name, rate)


@pytest.mark.parametrize("task, fresh_atol", [
    ("female", 0.06),
    ("topics", 0.06),
    ("hybrid-sports", 0.25),
])
def test_fit_lambdas_on_tiny_samples_reaches_the_targets(phi_of_a, task, fresh_atol):
    """λ fitted (as train does: inside the hard constraints) on half the samples of a gives
    E_p φ = μ̄ within tolerance, and nearly so on the other half (3 standard errors; hybrid-sports
    has only ~35 female-and-sports samples per half, hence its looser bound); the hard feature
    holds on every sample p can hold."""
    features, phi_all = phi_of_a
    columns = [features.index(f) for f, _ in dm.TASKS[task]]
    mu_bar = [m for _, m in dm.TASKS[task]]
    soft = [m not in (0, 1) for m in mu_bar]
    fit_half = phi_all[:2048, columns]
    fresh_half = phi_all[2048:, columns]

    def log_w(phi):
        return dm.log_P_of(torch.zeros(len(phi), dtype=torch.float64), phi, mu_bar,
                           torch.zeros(sum(soft), dtype=torch.float64))
    targets = torch.tensor([m for m, s in zip(mu_bar, soft) if s], dtype=torch.float64)
    lam, mu_hat = dm.fit_lambdas(fit_half[:, soft], log_w(fit_half), targets, tol=0.01)
    assert torch.linalg.vector_norm(mu_hat - targets) < 0.01
    log_P = dm.log_P_of(torch.zeros(2048, dtype=torch.float64), fresh_half, mu_bar, lam)
    weights = torch.softmax(log_P, 0)
    assert torch.allclose(weights @ fresh_half[:, soft], targets, atol=fresh_atol)
    hard = [not s for s in soft]
    assert torch.allclose(weights @ fresh_half[:, hard], torch.ones(1, dtype=torch.float64))


def test_word_lists_read_utf8_with_a_bom_and_words_compare_in_nfc(tmp_path):
    """A word list saved with a BOM, "café" saved decomposed (e + combining acute), and texts and
    --word either way: all compare as the composed word (issue 28)."""
    path = tmp_path / "words.txt"
    path.write_bytes(b"\xef\xbb\xbfzebra\ncafe\xcc\x81\n")
    words = dm.read_wordlist(str(path))
    assert words == ("zebra", "caf\u00e9")
    for text in ("un caf\u00e9 noir", "un cafe\u0301 noir"):
        assert dm.feature("list:w", text, {"w": words}) == 1
        assert dm.phi_matrix(["list:w"], [text], {"w": words}).tolist() == [[1.0]]
        assert dm.feature("word:caf\u00e9", text) == 1
    cfg = dm.parse_config(["--word", "cafe\u0301", "--out", str(tmp_path / "run")])
    assert cfg.word == "caf\u00e9"
