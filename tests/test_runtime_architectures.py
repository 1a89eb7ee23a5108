"""The lean runtime on the architectures it claims (serving/runtimes/lean.py): real configs shrunk
(tests/tiny_models.py: REAL_ARCHITECTURES), against the HF forward and through the services against `generate`;
and the ones it refuses, refused by name."""

from __future__ import annotations

import types

import grpc
import pytest
import torch

from serving.runtimes import lean, make_runtime
from serving.runtimes.hf import ModelRunner
from tests.test_runtimes import ragged_steps, steps
from tests.tiny_models import REAL_ARCHITECTURES, real_config, real_model

CPU = torch.device("cpu")


def long_steps(run, cache):
    """Past original_max_position_embeddings (16-32 here) and past the 8-token windows: a prefill of 40, decode
    steps, a rollback into the prefill, then appends of 1 to 9 tokens up to position 111."""
    out = [run(cache, [(7 * i) % 290 + 3 for i in range(40)], 5)]
    out += [run(cache, [t], 1) for t in (11, 12, 13)]
    cache.crop(37)
    for size in (6, 1, 9, 3, 1, 8, 2, 5, 1, 7, 4, 1, 9, 6, 2, 1, 8):
        out.append(run(cache, [(cache.length * 13 + j) % 290 + 3 for j in range(size)], size))
    assert cache.length == 111
    return torch.cat(out)


def _plain(name: str):
    """The same weights as `name`'s model without what the architecture adds to positions (RoPE scaling,
    sliding window): what a runtime that ignored it would compute. None where there is nothing to ignore."""
    _, fields = REAL_ARCHITECTURES[name]
    rope = dict(fields["rope_parameters"])
    if rope["rope_type"] != "default":
        return real_config(name, rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]})
    if any(lean.attention_windows(real_config(name))):
        return real_config(name, sliding_window=None, use_sliding_window=False)
    return None


@pytest.mark.parametrize("name", list(REAL_ARCHITECTURES))
def test_lean_matches_the_hf_forward(name):
    """Every step the services take, one session and a ragged batch, and a long sequence past where the RoPE
    scaling and the window set in: same logits to float rounding, same greedy picks. Where the architecture
    changes positions (scaled RoPE, a window), the same weights without it pick other tokens, so a runtime
    that dropped it would fail here."""
    config = real_config(name)
    model = real_model(config)
    runtime = make_runtime(model, CPU, "auto")
    assert runtime.name == "lean", lean.unsupported(config)
    reference = ModelRunner(model, CPU)
    for sequence in (steps, long_steps):
        expected = sequence(reference.extend, reference.new_cache())
        ours = sequence(runtime.extend, runtime.new_cache())
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
        assert ours.argmax(-1).tolist() == expected.argmax(-1).tolist()
    expected, expected_lengths = ragged_steps(reference)
    ours, lengths = ragged_steps(runtime)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    assert ours.argmax(-1).tolist() == expected.argmax(-1).tolist() and lengths == expected_lengths
    plain = _plain(name)
    if plain is not None:
        without = ModelRunner(real_model(plain), CPU)
        ignored = long_steps(without.extend, without.new_cache())
        assert (ignored.argmax(-1) != long_steps(reference.extend, reference.new_cache()).argmax(-1)).any(), \
            f"{name}: its RoPE scaling or window changes no greedy pick here; this test would not see it ignored"


def test_a_layer_skipping_runner_keeps_each_kept_layer_windowed_or_not():
    """Qwen2 with layer 0 full and layer 1 windowed, layer 0 skipped: the runner must still window what was
    layer 1. The reference is a one-layer Qwen2 whose only layer is windowed, holding layer 1's weights."""
    config = real_config("qwen2-window")
    model = real_model(config)
    one_layer = real_model(real_config("qwen2-window", num_hidden_layers=1, max_window_layers=0))
    state = {k.replace("layers.1.", "layers.0."): v for k, v in model.state_dict().items() if "layers.0." not in k}
    one_layer.load_state_dict(state)
    assert lean.attention_windows(one_layer.config) == [8]
    reference = ModelRunner(one_layer, CPU)
    skipping = make_runtime(model, CPU, "lean").skipping([0])
    expected = long_steps(reference.extend, reference.new_cache())
    ours = long_steps(skipping.extend, skipping.new_cache())
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    assert ours.argmax(-1).tolist() == expected.argmax(-1).tolist()


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
            "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
REFUSED = {
    "dynamic": (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
                "'dynamic' recomputes its frequencies from the sequence length at run time"),
    "longrope": (dict(rope_parameters=LONGROPE), "'longrope' switches from short to long factors at run time"),
    "mlp-bias": (dict(mlp_bias=True), "MLP biases are not computed"),
    "gelu": (dict(hidden_act="gelu"), "hidden_act 'gelu' is not silu"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_lean_refuses_it_names_and_auto_serves_with_hf(name):
    overrides, reason = REFUSED[name]
    model = real_model(real_config("llama-2", **overrides))
    assert reason in lean.unsupported(model.config)
    with pytest.raises(ValueError, match=f"--runtime lean cannot serve this 'llama' model: .*{reason}"):
        make_runtime(model, CPU, "lean")
    assert make_runtime(model, CPU, "auto").name == "hf"


def test_refusals_read_older_and_foreign_configs():
    """transformers 4.x spells RoPE `rope_scaling` (None for default, `type` for rope_type); what is not one of
    its architectures, or rotates part of each head, or has per-layer RoPE, is refused by name."""
    def old(**fields):
        return types.SimpleNamespace(model_type="llama", hidden_act="silu", num_hidden_layers=2,
                                     max_position_embeddings=128, **fields)

    assert lean.unsupported(old(rope_scaling=None)) == ""
    assert lean.unsupported(old(rope_scaling={"type": "linear", "factor": 2.0})) == ""
    assert "'dynamic' recomputes" in lean.unsupported(old(rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert "'su' is not one it computes" in lean.unsupported(old(rope_scaling={"type": "su"}))
    assert "partial_rotary_factor 0.5" in lean.unsupported(old(rope_scaling=None, partial_rotary_factor=0.5))
    assert "per layer type" in lean.unsupported(old(rope_parameters={"full_attention": {"rope_type": "default"}}))
    assert "model_type 'gpt2' is not one it computes" in lean.unsupported(types.SimpleNamespace(model_type="gpt2"))


def test_windows_are_read_as_the_hf_masks_apply_them():
    assert lean.attention_windows(real_config("mistral-7b-v0.1")) == [8, 8]
    assert lean.attention_windows(real_config("mistral-7b-v0.3")) == [None, None]
    assert lean.attention_windows(real_config("qwen2-window")) == [None, 8]
    assert lean.attention_windows(real_config("qwen2.5")) == [None, None]  # use_sliding_window off
    # a window as long as the context never binds: no masks to build
    assert lean.attention_windows(real_config("mistral-7b-v0.1", sliding_window=128)) == [None, None]


# -- served through the real services, exact against `generate` --------------------------------------------------
MAX_NEW = 24


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.tiny_models import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("name", ["llama-3.1", "qwen2.5"])
def test_served_by_lean_exactly_like_generate(name, tokenizer, tmp_path):
    """A Llama-3.1 (llama3 RoPE, generations running past original_max_position_embeddings) and a Qwen2.5
    (biases, tied embeddings) checkpoint as target, a noisy copy as draft: both services run them on the lean
    runtime and say so (GetModelInfo.runtime), and greedy output is the target's own `generate`, token for
    token, through rounds that accept and rounds that reject."""
    from transformers import AutoModelForCausalLM

    from specdec_api import common_pb2, draft_pb2_grpc, verify_pb2_grpc
    from tests.conftest import PROMPTS, start_stack
    from tests.tiny_models import save_noisy_copy, save_real_model

    target_dir = save_real_model(tmp_path / "target", tokenizer, name, seed=1, sharpen=6.0)
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    stack = start_stack(target_dir, save_noisy_copy(target_dir, tmp_path / "draft", tokenizer))
    try:
        request = common_pb2.GetModelInfoRequest()
        with grpc.insecure_channel(f"localhost:{stack.verify.port}") as verify, \
                grpc.insecure_channel(f"localhost:{stack.draft.port}") as draft:
            assert verify_pb2_grpc.VerifyServiceStub(verify).GetModelInfo(request, timeout=10).runtime == "lean"
            assert draft_pb2_grpc.DraftServiceStub(draft).GetModelInfo(request, timeout=10).runtime == "lean"
        drafted = accepted = 0
        with stack.client() as client:
            for prompt in PROMPTS[:10]:
                inputs = tokenizer(prompt, return_tensors="pt")
                with torch.inference_mode():
                    expected = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
                result = client.generate(prompt, max_new_tokens=MAX_NEW, num_draft_tokens=3)
                assert result.token_ids == expected[0, inputs["input_ids"].shape[1]:].tolist(), prompt
                drafted += result.stats["drafted_tokens"]
                accepted += result.stats["accepted_tokens"]
        assert 0 < accepted < drafted
    finally:
        stack.stop()


# -- --dtype auto (serving/model_loading.py) ---------------------------------------------------------------------
@pytest.mark.parametrize("device_type,capability,expected", [
    ("cpu", None, torch.float32),
    ("mps", None, torch.float32),
    ("cuda", (9, 0), torch.bfloat16),  # H100 / H200
    ("cuda", (8, 0), torch.bfloat16),  # A100
    ("cuda", (8, 9), torch.bfloat16),  # L4
    ("cuda", (7, 5), torch.float16),  # T4
    ("cuda", (7, 0), torch.float16),  # V100
    ("cuda", (6, 1), torch.float16),
    ("cuda", None, torch.float16),
])
def test_dtype_auto_is_bfloat16_from_ampere_on_float16_before_and_float32_off_cuda(device_type, capability, expected):
    from serving.model_loading import auto_dtype, resolve_dtype

    assert auto_dtype(device_type, capability) == expected
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("float16", "cpu") == torch.float16


def test_a_device_this_process_cannot_use_is_refused_before_loading_with_what_to_do():
    """`--device cuda` where torch cannot use it must not end in a traceback from deep inside torch: the service says
    why and what to do (here, CPU-only torch: the build; on a GPU machine, an index past its GPUs)."""
    from serving.model_loading import check_device, resolve_dtype

    count = torch.cuda.device_count() if torch.backends.cuda.is_built() else 0
    cuda_says = ("CPU build" if not torch.backends.cuda.is_built() else
                 "no CUDA device is visible" if count == 0 else "only")
    for device, says in [(f"cuda:{count + 6}", cuda_says), ("gpu", "not a device name"), ("meta", "use cpu or cuda")]:
        with pytest.raises(ValueError, match=says):
            resolve_dtype("auto", device)
    if count == 0:
        with pytest.raises(ValueError, match=cuda_says):
            check_device("cuda")
    assert check_device("cpu") == torch.device("cpu")
