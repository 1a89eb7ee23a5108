"""Device plumbing, on a CPU: the draft's and the verify's passes run with every model tensor on a fake CUDA device
that refuses to be mixed with host tensors and counts every host sync (DESIGN.md principle 11).

FakeCuda is a TorchFunctionMode. Tensors it marks (the model's weights, and whatever an op makes from a marked
tensor or with device="cuda") say they are on cuda:0 and compute on the CPU. An op that mixes a marked tensor with an
unmarked one of one or more dimensions raises CrossDevice, as CUDA would (0-dim host tensors are allowed, as CUDA
allows them; explicit copies, .to / .copy_, are transfers, not mixes). These count as host syncs, per layer (a frame
under serving/runtimes/ on the stack: "runtime", else "caller"): reading a marked tensor on the host (.item, .tolist,
.numpy, .cpu / .to("cpu") without non_blocking, bool / int / float / index, printing), ops whose result's size
depends on the data (nonzero, unique, masked_select, boolean-mask indexing, bincount, repeat_interleave),
torch.equal / allclose, and a blocking copy from the host (torch.tensor(..., device="cuda"), .to("cuda") without
non_blocking: PyTorch synchronizes the stream after a pageable host-to-device copy). Non-blocking copies either way
are counted apart (no sync).

Ceilings (caller layer: the draft loop and the verify's scoring; the runtime's own syncs are reported, not bounded
here, because the runtime is another seam with its own budget):
  draft, min_confidence 0: 1 per proposal pass, whatever the sessions, gammas and sampling: all tokens of all
    sessions are read in one .tolist() at the end; the draft_probs rows leave with one non-blocking copy per width.
  draft, min_confidence > 0: 1 + one per draft step (the confidences are read each step to decide whether to stop).
  verify: 1 per pass: the greedy jobs' argmax ids in one .tolist(), the sampled jobs' target_probs in one copy
    (non-blocking when a .tolist() follows, else the one sync).
The runtime layer: the lean runtime syncs never (its index tensors go over in one non-blocking copy, and its
decode_step feeds the device's tokens as they are), asserted below; the hf runtime's decode_step is the base
default (one .tolist() a step), printed with -s. The static runtime showed none on an H200 (torch's CUDA sync
debug mode), where its pool can be sized; here it is not run.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import LlamaConfig, LlamaForCausalLM

from draft_service.drafters.base import ProposeJob
from draft_service.drafters.model import propose_batch
from serving.runtimes import make_runtime
from speculation.sampling import Sampling, race, race_bits, race_key
from verify_service.verifier import ScoreJob, score_batch

FAKE = torch.device("cuda", 0)
MARK = "_fake_cuda"
RUNTIME_DIR = os.path.join("serving", "runtimes") + os.sep
HOST_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__", "__array__",
              "__format__", "__repr__", "nonzero", "argwhere", "equal", "allclose", "unique", "unique_consecutive",
              "masked_select", "bincount", "repeat_interleave", "cpu"}
INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}
UPLOADS = {"tensor", "as_tensor", "new_tensor"}


class CrossDevice(AssertionError):
    pass


def is_fake(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, MARK, False)


def tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item)


def mark(obj):
    for t in tensors_in(obj):
        setattr(t, MARK, True)
    return obj


def cuda_like(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def cpu_like(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cpu"
    return isinstance(device, str) and device.startswith("cpu")


def put_on_fake_device(model: torch.nn.Module) -> torch.nn.Module:
    mark(list(model.parameters()) + list(model.buffers()))
    return model


class FakeCuda(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()  # (layer, kind) -> n; kind: sync, async_upload, async_download
        self.where: Counter = Counter()  # (layer, op) -> n, for the report

    def syncs(self, layer: str) -> int:
        return self.counts[(layer, "sync")]

    def reset(self) -> None:
        self.counts.clear()
        self.where.clear()

    def _count(self, kind: str, op: str) -> None:
        frame, layer = sys._getframe(2), "caller"
        while frame is not None:
            if RUNTIME_DIR in frame.f_code.co_filename:
                layer = "runtime"
                break
            frame = frame.f_back
        self.counts[(layer, kind)] += 1
        self.where[(layer, f"{kind}:{op}")] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property of a tensor
            prop = getattr(getattr(func, "__self__", None), "__name__", "")
            if prop == "device" and is_fake(args[0]):
                return FAKE
            if prop == "is_cuda" and is_fake(args[0]):
                return True
            if prop == "is_cpu" and is_fake(args[0]):
                return False
            return func(*args, **kwargs)
        if name == "get_device" and is_fake(args[0]):
            return 0
        if name in ("to", "cuda", "cpu", "copy_"):
            return self._transfer(func, name, args, kwargs)
        if name in UPLOADS and (cuda_like(kwargs.get("device")) or (name == "new_tensor" and is_fake(args[0])
                                                                    and kwargs.get("device") is None)):
            kwargs["device"] = "cpu"
            result = func(*args, **kwargs)
            if result.numel():  # a blocking host -> device copy synchronizes the stream (an empty one copies nothing)
                self._count("sync", name)
            return mark(result.clone() if any(result is t for t in tensors_in(args)) else result)
        to_fake = cuda_like(kwargs.get("device"))
        if to_fake:
            kwargs["device"] = "cpu"
        inputs = list(tensors_in((args, kwargs)))
        fakes = [t for t in inputs if is_fake(t)]
        reals = [t for t in inputs if not is_fake(t) and t.dim() > 0]
        if fakes and reals:
            raise CrossDevice(f"{name}: cuda tensors {[tuple(t.shape) for t in fakes]} mixed with cpu tensors "
                              f"{[tuple(t.shape) for t in reals]}")
        if fakes and name in HOST_READS:
            self._count("sync", name)
        elif fakes and name in INDEXING and any(t.dtype == torch.bool for t in tensors_in(args[1:2])):
            self._count("sync", name + "[bool mask]")
        result = func(*args, **kwargs)
        if (fakes or to_fake) and name not in ("tolist", "item", "numpy"):
            mark(result)
        return result

    def _transfer(self, func, name, args, kwargs):
        source = args[0]
        if name == "copy_":
            destination, source = args[0], args[1]
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            if is_fake(destination) and not is_fake(source) and source.dim() > 0:
                self._count("async_upload" if non_blocking else "sync", "copy_ to cuda")
            elif is_fake(source) and not is_fake(destination):
                self._count("async_download" if non_blocking else "sync", "copy_ to cpu")
            return func(*args, **kwargs)
        if name == "cpu":
            target, non_blocking, rest = "cpu", False, args[1:]
        elif name == "cuda":
            target, non_blocking, rest = "cuda", kwargs.pop("non_blocking", False), ()
            func = torch.Tensor.to
        else:
            target, rest, non_blocking = None, [], kwargs.pop("non_blocking", False)
            for arg in args[1:]:
                if isinstance(arg, (torch.device, str)):
                    target = arg
                    arg = "cpu"
                elif isinstance(arg, torch.Tensor):
                    target = FAKE if is_fake(arg) else "cpu"
                    arg = arg.dtype
                elif isinstance(arg, bool):
                    non_blocking = arg
                    continue
                rest.append(arg)
            if "device" in kwargs:
                target = kwargs.pop("device")
                kwargs["device"] = "cpu"
        if cuda_like(target) and not is_fake(source):  # host -> device
            self._count("async_upload" if non_blocking else "sync", f"{name} to cuda")
            return mark(torch.Tensor.to(source, *rest, copy=True, **kwargs))
        if cpu_like(target) and is_fake(source):  # device -> host
            self._count("async_download" if non_blocking else "sync", f"{name} to cpu")
            return torch.Tensor.to(source, *[r for r in rest if r != "cpu"], copy=True,
                                   **{k: v for k, v in kwargs.items() if k != "device"})
        result = func(source, *rest, **kwargs) if name != "cuda" else source
        return mark(result) if is_fake(source) else result


# -- the harness checks itself ------------------------------------------------------------------------------------

def test_the_fake_device_refuses_a_mix_and_counts_syncs_by_layer():
    with FakeCuda() as fake:
        x = torch.ones(3, device="cuda")
        assert x.device == FAKE and x.is_cuda and (x + 1).device == FAKE
        with pytest.raises(CrossDevice):
            x + torch.ones(3)
        assert (x * torch.tensor(2.0)).device == FAKE  # a 0-dim host tensor is a scalar
        assert x.sum().tolist() == 3.0 and int(x[0]) == 1 and x.cpu().device.type == "cpu"
        y = torch.tensor([1, 2], device=FAKE)  # a blocking copy from the host
        z = torch.tensor([1, 2]).to(FAKE, non_blocking=True)
        assert is_fake(y) and is_fake(z) and not is_fake(x.to("cpu"))
    assert fake.syncs("caller") == 5 and fake.counts[("caller", "async_upload")] == 1


# -- the sampler ------------------------------------------------------------------------------------------------------

def test_the_race_runs_on_the_fake_device_without_a_sync():
    probs = torch.randn(3, 50).softmax(-1)
    expected = race(probs, [race_key(5, 2, r) for r in range(3)])
    with FakeCuda() as fake:
        on_device = mark(probs.clone())
        picks = race(on_device, [race_key(5, 2, r) for r in range(3)])
        one = race(on_device[1:2], [race_key(5, 2, 1)])
        assert picks.device == FAKE
    assert fake.syncs("caller") == 0 and fake.counts[("caller", "async_upload")] == 1  # the keys, not waited for
    assert torch.equal(picks, expected) and int(one) == int(expected[1])


def fmix32_reference(x: int) -> int:
    """lowbias32 with 0x21f0aaad / 0x735a2d97, in Python's unbounded ints, wrapped the textbook way."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % 2 ** 32
    x ^= x >> 15
    x = (x * 0x735A2D97) % 2 ** 32
    return x ^ (x >> 15)


def bits_reference(first: int, second: int, v: int) -> int:
    high = fmix32_reference(fmix32_reference(v ^ first) ^ second)
    low = (((high ^ second) * 0x735A2D97) % 2 ** 32) >> 11
    return (high << 21) | low | 1


def test_the_noise_is_the_same_bits_as_a_pure_python_reference_and_on_every_device():
    keys = [race_key(seed, stream, index) for seed, stream, index in
            [(0, 0, 0), (7, 1, 0), ((1 << 64) - 1, 2, 31), (1 << 40, 2, 3)]]
    vocab = 70_000  # past 2**16: the ids' high half enters the hash too
    on_cpu = race_bits(keys, vocab, "cpu")
    for row, (first, second) in enumerate(keys):
        for v in (0, 1, 2, 255, 65_535, 65_536, 69_999):
            assert int(on_cpu[row, v]) == bits_reference(first, second, v)
    assert torch.equal(race_bits(keys[1:2], vocab, "cpu")[0], on_cpu[1])  # a lone row's scalar key: the same bits
    assert torch.equal(race_bits(keys, 100, "cpu"), on_cpu[:, :100])  # the bits of id v do not depend on the width
    assert int(on_cpu.min()) >= 1 and int(on_cpu.max()) < 2 ** 53
    devices = ["cuda"] if torch.cuda.is_available() else []
    for device in devices:
        assert torch.equal(race_bits(keys, vocab, device).cpu(), on_cpu)
        probs = torch.randn(4, vocab).softmax(-1)
        assert torch.equal(race(probs.to(device), keys).cpu(), race(probs, keys))


# -- a tiny Llama on the fake device ------------------------------------------------------------------------------

VOCAB = 96


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def runtime_on_fake_device(model, kind, fake):
    put_on_fake_device(model)
    runtime = make_runtime(model, FAKE, kind)
    assert runtime.device == FAKE
    fake.reset()  # building the runtime (hf's startup check runs a forward) is not a pass
    return runtime


SAMPLED = Sampling(0.9, top_k=20)


def draft_jobs(runtime, sampling, min_confidence=0.0):
    """Three sessions with ragged gammas, one of them under a vocab_limit, one feeding a chunk (gamma 0)."""
    return [ProposeJob(runtime.new_cache(), [1, 2, 3, 4], 4, sampling, min_confidence, 0, 11),
            ProposeJob(runtime.new_cache(), [5, 6], 2, sampling, min_confidence, VOCAB - 10, 12),
            ProposeJob(runtime.new_cache(), [7, 8, 9], 3, Sampling(1.0), min_confidence, 0, 13),
            ProposeJob(runtime.new_cache(), [10, 11], 0, sampling, min_confidence, 0, 14)]


def report(what, fake):
    print(f"\n{what}: " + ", ".join(f"{layer} {op} x{n}" for (layer, op), n in sorted(fake.where.items())))


@pytest.mark.parametrize("kind", ["lean", "hf"])
@pytest.mark.parametrize("sampling", [Sampling(0.0), SAMPLED], ids=["greedy", "sampled"])
def test_a_draft_proposal_stays_on_the_device_and_syncs_once(model, kind, sampling):
    expected = propose_batch(make_runtime(model, torch.device("cpu"), kind), draft_jobs(make_runtime(
        model, torch.device("cpu"), kind), sampling))
    with FakeCuda() as fake:
        runtime = runtime_on_fake_device(model, kind, fake)
        jobs = draft_jobs(runtime, sampling)
        proposals = propose_batch(runtime, jobs)
        report(f"draft {kind} {sampling}", fake)
        assert fake.syncs("caller") <= 1, fake.where
        assert kind != "lean" or fake.syncs("runtime") == 0, fake.where
        fake.reset()  # the next proposal on the same caches: the last token fed, then decode steps only
        propose_batch(runtime, [ProposeJob(job.cache, proposal.token_ids[-1:] or [3], 2, sampling, 0.0, 0, 20 + n)
                                for n, (job, proposal) in enumerate(zip(jobs, proposals))])
        assert fake.syncs("caller") <= 1, fake.where
        assert kind != "lean" or fake.syncs("runtime") == 0, fake.where
    assert [p.token_ids for p in proposals] == [p.token_ids for p in expected]
    assert [len(p.token_ids) for p in proposals] == [4, 2, 3, 0]
    assert all(t < VOCAB - 10 for t in proposals[1].token_ids)
    for job, proposal, reference in zip(jobs, proposals, expected):
        assert (proposal.draft_probs is None) == (job.sampling.greedy or job.gamma == 0)
        if proposal.draft_probs is not None:
            assert not is_fake(proposal.draft_probs) and proposal.draft_probs.shape[0] == len(proposal.token_ids)
            torch.testing.assert_close(proposal.draft_probs, reference.draft_probs)


@pytest.mark.parametrize("kind", ["lean", "hf"])
def test_a_draft_asked_for_min_confidence_syncs_once_a_step(model, kind):
    with FakeCuda() as fake:
        runtime = runtime_on_fake_device(model, kind, fake)
        proposals = propose_batch(runtime, draft_jobs(runtime, SAMPLED, min_confidence=1e-9))
        assert [len(p.token_ids) for p in proposals] == [4, 2, 3, 0]  # nothing is that doubtful
        assert fake.syncs("caller") <= 1 + 4, fake.where


def verify_jobs(runtime, samplings):
    return [ScoreJob(runtime.new_cache(), list(range(3 + n, 9 + 2 * n)), 3, sampling)
            for n, sampling in enumerate(samplings)]


@pytest.mark.parametrize("kind", ["lean", "hf"])
@pytest.mark.parametrize("samplings", [[Sampling(0.0)] * 3, [SAMPLED, Sampling(1.0), SAMPLED],
                                       [Sampling(0.0), SAMPLED, Sampling(0.0)]], ids=["greedy", "sampled", "mixed"])
def test_a_verify_pass_scores_on_the_device_and_syncs_once(model, kind, samplings):
    expected = score_batch(make_runtime(model, torch.device("cpu"), kind), verify_jobs(make_runtime(
        model, torch.device("cpu"), kind), samplings))
    with FakeCuda() as fake:
        runtime = runtime_on_fake_device(model, kind, fake)
        scores = score_batch(runtime, verify_jobs(runtime, samplings))
        report(f"verify {kind} {samplings}", fake)
        assert fake.syncs("caller") <= 1, fake.where
        assert kind != "lean" or fake.syncs("runtime") == 0, fake.where
    for got, want, sampling in zip(scores, expected, samplings):
        assert got.argmax_token_ids == want.argmax_token_ids and len(got.argmax_token_ids) == 3 * sampling.greedy
        if sampling.greedy:
            assert got.target_probs is None
        else:
            assert not is_fake(got.target_probs) and got.target_probs.shape == (3, VOCAB)
            torch.testing.assert_close(got.target_probs, want.target_probs)


def test_two_rows_whose_keys_differ_by_a_small_xor_are_not_each_others_permutation():
    """Found in review: when the noise entered the key as fmix32(v ^ first) alone, two keys whose `first` words
    differ by d < vocab made rows where row 2 at v equals row 1 at v ^ d, so on a flat row the second draw was the
    first XOR d, every time. Seed 14975's draft steps 3 and 8 are such a pair at a 32,768-id vocabulary."""
    from speculation.sampling import DRAFT_STREAM

    vocab = 32_768
    a, b = race_key(14975, DRAFT_STREAM, 3), race_key(14975, DRAFT_STREAM, 8)
    d = a[0] ^ b[0]
    assert d < vocab  # the pair is one of those (the keys themselves did not change)
    row_a, row_b = race_bits([a], vocab, "cpu")[0] >> 21, race_bits([b], vocab, "cpu")[0] >> 21
    mirrored = (row_b == row_a[torch.arange(vocab) ^ d]).float().mean().item()
    assert mirrored < 0.001, mirrored
    flat = torch.full((2, vocab), 1.0 / vocab)
    picks = race(flat, [a, b])
    assert int(picks[1]) != int(picks[0]) ^ d
