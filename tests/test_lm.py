"""LM plumbing: log-probs against the library's own loss, the sampler against the model's softmax,
build_tiny."""
import math
from types import SimpleNamespace

import pytest
import torch

import dpg_min as dm

WORDS = "the a cat dog sat on mat amazing science art".split()   # ids 2..11; 0 is BOS/EOS, 1 <unk>


def tiny(seed=0):
    return dm.build_tiny(WORDS, seed=seed, n_layer=2, n_embd=32, n_head=2)


def test_sequence_logprob_equals_minus_the_library_loss_times_the_scored_tokens():
    """Σ_t log m(y_t | y_<t) equals −(HF's mean token loss with labels=ids) × the number of scored
    tokens."""
    model, _ = tiny()
    ids = torch.randint(0, model.config.vocab_size, (5, 9),
                        generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    ours = dm.sequence_logprob(model, ids, chunk=2)
    # summed in float64 (overflow margin)
    assert ours.shape == (5,) and ours.dtype == torch.float64
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss              # mean over 5 × 8 predicted tokens
        rows = [model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss for i in range(5)]
    assert torch.allclose(ours.sum().float(), -loss * 5 * 8, rtol=1e-5)
    assert torch.allclose(ours.float(), -torch.stack(rows) * 8, rtol=1e-5)
    # any chunk: the same numbers
    assert torch.allclose(dm.sequence_logprob(model, ids), ours, rtol=1e-6)


def test_token_logprobs_with_a_value_head_gives_one_value_per_scored_token():
    model, _ = tiny()
    v_head = torch.nn.Linear(model.config.hidden_size, 1)
    ids = torch.tensor([[0, 2, 3, 4], [0, 5, 6, 7]])
    logp, V = dm.token_logprobs(model, ids, v_head)
    assert logp.shape == V.shape == (2, 3)
    assert torch.allclose(logp.double().sum(1), dm.sequence_logprob(model, ids))


@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_sampler_logprobs_equal_rescored_logprobs_for_any_chunk_size(chunk):
    """The log-probs the sampler accumulates (with the KV cache) equal a fresh full forward pass."""
    model, _ = tiny()
    torch.manual_seed(1)
    ids, logp = dm.sample(model, n=7, T=6, bos_id=0, chunk=chunk)
    assert ids.shape == (7, 7) and (ids[:, 0] == 0).all() and logp.dtype == torch.float64
    assert torch.allclose(logp, dm.sequence_logprob(model, ids), atol=1e-4)


def test_sampler_is_exact_ancestral_sampling_one_step():
    """One step: sample frequencies match the model's full softmax (no top-k, EOS allowed). Guards
    the inverse-CDF draw: 20k samples give a standard error below 0.003 for probabilities near
    1/12."""
    model, _ = tiny()
    torch.manual_seed(2)
    ids, _ = dm.sample(model, n=20000, T=1, bos_id=0, chunk=20000)
    with torch.no_grad():
        logits = model(input_ids=torch.zeros(1, 1, dtype=torch.long)).logits
        probs = torch.softmax(logits[0, -1], -1)
    freq = torch.bincount(ids[:, 1], minlength=probs.numel()).double() / len(ids)
    assert (freq > 0).all() and (freq - probs).abs().max() < 0.012


@pytest.mark.parametrize("chunk", [20000, 1000])
def test_chunk_size_does_not_change_the_two_step_distribution(chunk):
    """Two steps (the second through the KV cache): each of the 12² sequences is drawn at its model
    probability exp(log m(x)), in one chunk or in twenty. Bound: 5 standard errors per sequence."""
    model, _ = tiny()
    torch.manual_seed(3)
    ids, logp = dm.sample(model, n=20000, T=2, bos_id=0, chunk=chunk)
    V = model.config.vocab_size
    grid = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
    every = torch.stack(grid, -1).reshape(-1, 2)
    bos = torch.zeros(V * V, 1, dtype=torch.long)
    probs = dm.sequence_logprob(model, torch.cat([bos, every], 1)).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    freq = torch.bincount(ids[:, 1] * V + ids[:, 2], minlength=V * V).double() / len(ids)
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / len(ids)).sqrt() + 1e-4).all()
    assert torch.allclose(logp, probs[ids[:, 1] * V + ids[:, 2]].log(), atol=1e-4)


def test_sample_in_chunks_draws_the_same_samples_as_one_chunk_from_the_same_rng_state():
    model, _ = tiny()
    torch.manual_seed(4)
    one = dm.sample(model, n=64, T=3, bos_id=0, chunk=64)
    torch.manual_seed(4)
    four = dm.sample(model, n=64, T=3, bos_id=0, chunk=16)
    assert torch.equal(one[0], four[0])


class FixedLogits(torch.nn.Module):
    """A stand-in LM whose next-token logits never change: the draws are i.i.d. from
    softmax(logits)."""
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids, attention_mask, cache):
        return SimpleNamespace(logits=self.logits.expand(len(input_ids), 1, -1), cache=None)


def test_sampler_never_draws_a_token_of_probability_zero():
    """The inverse-CDF draw at the edges: −inf logits first, in the middle and last are never drawn,
    and a token of probability 1e-9 is (almost surely) not either; the log-probs are those of the
    tokens drawn."""
    probs = [0.0, 0.5, 0.0, 1e-9, 0.3, 0.2 - 1e-9, 0.0]
    model = FixedLogits([math.log(p) if p else -math.inf for p in probs])
    torch.manual_seed(5)
    ids, logp = dm.sample(model, n=20000, T=3, bos_id=1, chunk=20000)
    tokens = ids[:, 1:]
    counts = torch.bincount(tokens.flatten(), minlength=len(probs))
    assert counts[[0, 2, 3, 6]].tolist() == [0, 0, 0, 0]
    expected = torch.tensor(probs, dtype=torch.float64)
    assert ((counts.double() / tokens.numel() - expected).abs() < 0.01).all()
    assert torch.allclose(logp, expected.log()[tokens].sum(1), atol=1e-6)


def test_sequence_logprob_gradient_reaches_every_weight():
    model, _ = tiny()
    dm.sequence_logprob(model, torch.tensor([[0, 2, 3, 4], [0, 5, 6, 7]])).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_build_tiny_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    m1, tok = tiny(seed=5)
    after = torch.rand(1)
    m2, _ = tiny(seed=5)
    m3, _ = tiny(seed=6)
    assert before == after                                       # no side effect on the global RNG
    pairs = zip(m1.state_dict().values(), m2.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(m1.transformer.wte.weight, m3.transformer.wte.weight)
    assert tok("the amazing cat").input_ids == [2, 9, 4]
    assert tok.decode([2, 9, 4]) == "the amazing cat"


def test_tiny_model_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = tiny()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([[0, 2, 3, 4]])
    assert torch.allclose(dm.sequence_logprob(model, ids), dm.sequence_logprob(again, ids))
    assert tok2("the amazing cat").input_ids == tok("the amazing cat").input_ids
    assert tok2.bos_token_id == tok.bos_token_id == 0
