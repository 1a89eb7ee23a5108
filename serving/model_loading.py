"""Loading a causal LM and describing it (the standard `from_pretrained(name_or_path)` path); describing a
checkpoint's vocabulary without loading its weights (for drafters that have none)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name_or_path: str
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    max_context: int
    eos_token_ids: list[int]
    tokenizer_fingerprint: str
    num_parameters: int
    weights_fingerprint: str = ""  # weights_fingerprint(model)


@dataclass
class ModelIdentity:
    """What a model service says it hosts (ModelInfo) and checks requests against, without weights: a drafter
    that loads none pairs with a target through these (vocab_size, tokenizer_fingerprint)."""
    name_or_path: str
    vocab_size: int
    max_context: int
    eos_token_ids: list[int]
    tokenizer_fingerprint: str
    device: torch.device
    dtype: torch.dtype | None  # None: no weights
    num_parameters: int
    weights_fingerprint: str = ""  # "": no weights


def auto_dtype(device_type: str, capability: tuple[int, int] | None = None) -> torch.dtype:
    """What `--dtype auto` loads weights as, on a device of this type ("cpu", "cuda", ...) and, for CUDA, this
    compute capability (torch.cuda.get_device_capability).

    float32 off CUDA: CPUs without native bf16/fp16 matmuls run them slower than float32, and the exactness
    tests' reference is float32. bfloat16 on Ampere and later (sm_80+), which compute it natively at full speed
    and whose float32 range it keeps (no overflow in activations). float16 before Ampere (sm_75 T4, sm_70 V100):
    they have fp16 tensor cores but no native bf16, which they emulate many times slower. A CUDA device whose
    capability is unknown is taken as pre-Ampere: float16 runs everywhere CUDA does."""
    if device_type != "cuda":
        return torch.float32
    return torch.bfloat16 if capability is not None and tuple(capability) >= (8, 0) else torch.float16


def check_device(device: str) -> torch.device:
    """The --device as a torch device; ValueError with what to do when this process cannot use it (a malformed
    name, a CPU-only torch, no GPU visible, an index past the GPUs there are), before any weights are read."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, ...): {error}") from None
    if parsed.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"--device {device}: this torch ({torch.__version__}) is a CPU build; install a CUDA "
                             f"build of torch (the image's default) or use --device cpu")
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA device is visible to this process (check the driver, "
                             f"CUDA_VISIBLE_DEVICES, and that the pod requests nvidia.com/gpu)")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"--device {device}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    elif parsed.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"--device {device}: use cpu or cuda[:N]")
    return parsed


def device_identity(device: torch.device) -> str:
    """ModelInfo.device_id: "GPU-<uuid>" for a CUDA device (the UUID nvidia-smi shows, the same in every process on
    the host), "" for anything else."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return ""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else ""


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    check_device(device)
    if dtype == "auto":
        device_type = torch.device(device).type
        capability = torch.cuda.get_device_capability(device) if device_type == "cuda" else None
        return auto_dtype(device_type, capability)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def tokenizer_fingerprint(name_or_path: str) -> str:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        log.warning("no tokenizer at %s (%s); vocabulary check falls back to vocab_size", name_or_path, error)
        return ""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def _eos_ids(name_or_path: str, config) -> list[int]:
    """From the generation config, else the model config."""
    try:
        eos_value = GenerationConfig.from_pretrained(name_or_path).eos_token_id
    except OSError:
        eos_value = None
    if eos_value is None:
        eos_value = getattr(config, "eos_token_id", None)
    if eos_value is None:
        return []
    return [eos_value] if isinstance(eos_value, int) else list(eos_value)


def _max_context(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


def _check_local_path(name_or_path: str) -> None:
    if name_or_path.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(name_or_path)):
        # transformers would call it a malformed hub repo id; say what is actually wrong
        raise FileNotFoundError(f"no model directory at {name_or_path}")


def read_identity(name_or_path: str) -> ModelIdentity:
    """A checkpoint's vocabulary and limits from its config and tokenizer, loading no weights: vocab_size is the
    config's (the logits count of a model built from it, which is what pairs with a target's logits), max_context
    and EOS ids as load_model reads them, the tokenizer fingerprint as load_model computes it. A directory with a
    tokenizer and no config.json gives the tokenizer's size, its model_max_length (when it states a real one) and
    its EOS token."""
    _check_local_path(name_or_path)
    fingerprint = tokenizer_fingerprint(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        config = None
    if config is not None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        vocab_size, max_context, eos = int(text.vocab_size), _max_context(text), _eos_ids(name_or_path, text)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as error:
            raise ValueError(f"{name_or_path} has neither a model config nor a tokenizer to read a vocabulary "
                             f"from ({error})") from error
        vocab_size = len(tokenizer)
        stated = getattr(tokenizer, "model_max_length", 0) or 0
        max_context = int(stated) if 0 < stated < 1 << 24 else 1 << 20  # tokenizers without one say ~1e30
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return ModelIdentity(name_or_path=name_or_path, vocab_size=vocab_size, max_context=max_context,
                         eos_token_ids=eos, tokenizer_fingerprint=fingerprint, device=torch.device("cpu"),
                         dtype=None, num_parameters=0)


def load_model(name_or_path: str, device: str = "cpu", dtype: str = "auto") -> LoadedModel:
    torch_dtype = resolve_dtype(dtype, device)
    _check_local_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
    model.to(device).eval()
    config = model.config
    vocab_size = model.get_output_embeddings().weight.shape[0]
    return LoadedModel(
        name_or_path=name_or_path, model=model, device=torch.device(device), dtype=torch_dtype,
        vocab_size=int(vocab_size), max_context=_max_context(config), eos_token_ids=_eos_ids(name_or_path, config),
        tokenizer_fingerprint=tokenizer_fingerprint(name_or_path),
        num_parameters=sum(p.numel() for p in model.parameters()),
        weights_fingerprint=weights_fingerprint(model),
    )


WEIGHT_SAMPLES = 64  # values read from each tensor for its fingerprint


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the weights: every tensor's name, shape and dtype, and WEIGHT_SAMPLES of its values at fixed,
    evenly spaced positions. Two checkpoints that differ anywhere a training step or a fine-tune touches differ
    here too (a rolling update that puts new weights under the same path), while reading ~64 values per tensor
    keeps it cheap for a model of any size (one small gather per tensor on the device, one copy to the host)."""
    headers, samples = [], []
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        headers.append(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        positions = torch.linspace(0, flat.numel() - 1, min(WEIGHT_SAMPLES, flat.numel()), device=flat.device)
        samples.append(flat[positions.round().long()].float())
    # All the samples reach the host in one copy (one sync on a GPU, not one per tensor).
    host = torch.cat([sample.to(samples[0].device) for sample in samples]).cpu() if samples else torch.empty(0)
    digest = hashlib.blake2b(digest_size=16)
    for header, values in zip(headers, host.split([len(sample) for sample in samples])):
        digest.update(header)
        if len(values):
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()
