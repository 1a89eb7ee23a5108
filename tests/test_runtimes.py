"""The two model runtimes: the HF forward with the growable KV cache, and the lean Llama forward."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from serving.runtimes import RUNTIMES, Runtime, make_runtime
from serving.runtimes.hf import KVCache, ModelRunner
from serving.runtimes.lean import LeanLlama


def tiny_llama(kv_heads=4, bias=False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, intermediate_size=96, max_position_embeddings=128,
                         attention_bias=bias)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises biases to zero, which would hide a missing bias term
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.5)
    return model


def steps(run, cache):
    """Prefill, decode, crop (a rollback) and a multi-token append: the service's whole repertoire."""
    out = [run(cache, list(range(10, 40)), 3)]
    out += [run(cache, [t], 1) for t in (5, 6, 7)]
    cache.crop(31)
    out.append(run(cache, [8, 9, 10, 11], 4))
    return torch.cat(out)


def test_growable_cache_gives_bitwise_the_same_logits_as_dynamic_cache():
    """The growable cache must hold exactly DynamicCache's keys and values, so that the forward over it is
    the same computation. Both sides keep the same number of logit rows (`logits_to_keep`): the lm_head
    product over 3 rows need not round like the one over 30 rows sliced afterwards (since transformers
    5.24 it does not, by ~1e-7), and that difference is the matmul's, not the cache's."""
    model = tiny_llama()

    @torch.inference_mode()
    def dynamic(cache, ids, keep):
        return model(torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=keep).logits[0, -keep:]

    reference = DynamicCache()
    expected = [dynamic(reference, list(range(10, 40)), 3)] + [dynamic(reference, [t], 1) for t in (5, 6, 7)]
    reference.crop(31 - reference.get_seq_length())
    expected.append(dynamic(reference, [8, 9, 10, 11], 4))
    cache = KVCache(model.config)
    ours = steps(ModelRunner(model, torch.device("cpu")).extend, cache)
    assert torch.equal(ours, torch.cat(expected))
    assert cache.length == reference.get_seq_length() == 35
    for layer, reference_layer in zip(cache.cache.layers, reference.layers):
        assert torch.equal(layer.keys, reference_layer.keys) and torch.equal(layer.values, reference_layer.values)


@pytest.mark.parametrize("kv_heads,bias", [(4, False), (2, False), (4, True)], ids=["mha", "gqa", "attention-bias"])
def test_lean_llama_matches_the_hf_forward_to_rounding(kv_heads, bias):
    model = tiny_llama(kv_heads, bias)
    hf = ModelRunner(model, torch.device("cpu"))
    lean = LeanLlama(model)
    expected = steps(hf.extend, hf.new_cache())
    ours = steps(lean.extend, lean.new_cache())
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert ours.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_runtime_choice():
    model = tiny_llama()
    assert make_runtime(model, torch.device("cpu"), "auto").name == "lean"
    assert make_runtime(model, torch.device("cpu"), "hf").name == "hf"
    with pytest.raises(ValueError, match="--runtime"):
        make_runtime(model, torch.device("cpu"), "fastest")


def test_a_model_whose_cache_cannot_roll_back_is_refused_at_startup():
    """Mamba's state cannot drop rejected draft tokens: refuse to serve it, naming why, before any request."""
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=4)).eval()
    with pytest.raises(ValueError, match="'mamba' models cannot be served: their KV cache cannot roll back"):
        make_runtime(model, torch.device("cpu"), "auto")


# -- the conformance test every runtime must pass (serving/runtimes/base.py) -----------------------------------
CONCRETE_RUNTIMES = [name for name in RUNTIMES if name != "auto"]


def ragged_steps(runtime):
    """Three sessions at different lengths through one pass at each step: a prefill of different sizes, a
    decode step fed on the device (decode_step), a rollback of one session, and a ragged multi-token append."""
    caches = [runtime.new_cache() for _ in range(3)]
    out = runtime.extend_batch(caches, [list(range(10, 40)), list(range(50, 57)), [3]], [3, 1, 1])
    tokens = torch.tensor([5, 6, 7], device=runtime.device)
    out.append(runtime.decode_step(caches, tokens))
    caches[0].crop(29)
    out += runtime.extend_batch(caches, [[8, 9, 10, 11], [12], [13, 14]], [4, 1, 2])
    return torch.cat([o.float().cpu() for o in out]), [c.length for c in caches]


@pytest.mark.parametrize("name", CONCRETE_RUNTIMES)
@pytest.mark.parametrize("kv_heads,bias", [(4, False), (2, True)], ids=["mha", "gqa-bias"])
def test_every_runtime_conforms_to_the_hf_forward(name, kv_heads, bias):
    """One session's repertoire (`steps`) and a ragged batch of three, against the HF forward run session by
    session: same logits to rounding, same greedy picks, same cache lengths; and what it says of itself."""
    model = tiny_llama(kv_heads, bias)
    runtime = make_runtime(model, torch.device("cpu"), name)
    assert runtime.name == name and isinstance(runtime, Runtime)
    assert runtime.clock.now_ns() > 0 and runtime.device == torch.device("cpu")
    reference = ModelRunner(model, torch.device("cpu"))
    expected, ours = steps(reference.extend, reference.new_cache()), steps(runtime.extend, runtime.new_cache())
    torch.testing.assert_close(ours.float(), expected, atol=1e-5, rtol=1e-4)
    assert ours.argmax(-1).tolist() == expected.argmax(-1).tolist()
    expected, expected_lengths = ragged_steps(reference)
    ours, lengths = ragged_steps(runtime)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert ours.argmax(-1).tolist() == expected.argmax(-1).tolist()
    assert lengths == expected_lengths == [33, 9, 4]
