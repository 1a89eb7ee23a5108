"""Trains the reference pair: the target on next-token loss, then the draft distilled from the target.

Stages run in order and each leaves its result in the work directory, so an interrupted run resumes
where it stopped (`specdec train-pair` again with the same flags):

  1. tokenizer    byte-level BPE over the training files
  2. tokens       the training split, tokenized and concatenated with EOS between files
  3. target       Llama LM trained on next-token cross-entropy (checkpointed every few minutes)
  4. draft        small Llama LM trained on KL(target || draft) plus cross-entropy on the data
  5. export       bf16 safetensors, tokenizer, generation config, held-out prompts (JSONL)
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from reference_pair import corpus
from reference_pair.tokenizer_build import train_tokenizer


@dataclass
class ModelShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int


TARGET_SHAPE = ModelShape(hidden_size=512, num_hidden_layers=7, num_attention_heads=8, intermediate_size=1376)
DRAFT_SHAPE = ModelShape(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384)


@dataclass
class TrainSettings:
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    target_steps: int = 1200
    draft_steps: int = 1200
    target_lr: float = 2e-3
    draft_lr: float = 3e-3
    distill_weight: float = 0.8
    seed: int = 0
    threads: int = 2
    max_position_embeddings: int = 1024


def llama_config(shape: ModelShape, settings: TrainSettings, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )


def lr_at(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batches(tokens: np.ndarray, seq_len: int, batch_size: int, generator: np.random.Generator):
    starts = generator.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    window = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])


class Trainer:
    def __init__(self, work_dir: Path, out_dir: Path, settings: TrainSettings):
        self.work_dir, self.out_dir, self.settings = work_dir, out_dir, settings
        work_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(settings.threads)

    def log(self, message: str) -> None:
        tqdm.write(message)
        with open(self.work_dir / "train.log", "a") as f:
            f.write(message + "\n")

    # 1-2 ----------------------------------------------------------------------------------------
    def tokenizer_and_tokens(self) -> tuple[PreTrainedTokenizerFast, np.ndarray]:
        tok_dir = self.work_dir / "tokenizer"
        tokens_path = self.work_dir / "train_tokens.npy"
        files = corpus.source_files()
        train_files, held_out = corpus.split(files)
        if not (tok_dir / "tokenizer.json").exists():
            self.log(f"tokenizer: {len(train_files)} train files, {len(held_out)} held-out files")
            train_tokenizer([t for _, t in train_files], self.settings.vocab_size, tok_dir)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        if not tokens_path.exists():
            ids: list[int] = []
            for _, text in tqdm(train_files, desc="tokenize", unit="file"):
                ids.extend(tokenizer(text)["input_ids"])
                ids.append(tokenizer.eos_token_id)
            np.save(tokens_path, np.asarray(ids, dtype=np.int32))
        tokens = np.load(tokens_path)
        self.log(f"corpus: {len(tokens):,} training tokens")
        return tokenizer, tokens

    # 3-4 ----------------------------------------------------------------------------------------
    def _checkpoint_path(self, name: str) -> Path:
        return self.work_dir / f"{name}.ckpt"

    def _train(self, name, model, tokens, steps, peak_lr, teacher=None) -> LlamaForCausalLM:
        s = self.settings
        optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.1, betas=(0.9, 0.95))
        step, rng_state = 0, None
        ckpt = self._checkpoint_path(name)
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step, rng_state = state["step"], state["numpy_rng"]
            self.log(f"{name}: resumed at step {step}")
        generator = np.random.default_rng(s.seed + (1 if teacher is not None else 0))
        if rng_state is not None:
            generator.bit_generator.state = rng_state
        model.train()
        last_save = time.monotonic()
        progress = tqdm(total=steps, initial=step, desc=f"train {name}", unit="step")
        while step < steps:
            inputs, labels = batches(tokens, s.seq_len, s.batch_size, generator)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, peak_lr)
            logits = model(input_ids=inputs).logits  # [batch, seq, vocab]
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            loss = ce
            if teacher is not None:
                with torch.inference_mode():
                    teacher_logits = teacher(input_ids=inputs).logits
                teacher_log_probs = F.log_softmax(teacher_logits.flatten(0, 1).clone(), dim=-1)
                kl = F.kl_div(F.log_softmax(logits.flatten(0, 1), dim=-1), teacher_log_probs,
                              log_target=True, reduction="batchmean")
                loss = s.distill_weight * kl + (1 - s.distill_weight) * ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", ce=f"{ce.item():.3f}")
            if step % 50 == 0:
                self.log(f"{name} step {step} loss {loss.item():.4f} ce {ce.item():.4f}")
            if time.monotonic() - last_save > 300 or step == steps:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                            "numpy_rng": generator.bit_generator.state}, ckpt)
                last_save = time.monotonic()
        progress.close()
        model.eval()
        return model

    def held_out_loss(self, model, tokenizer, max_tokens: int = 40_000) -> float:
        _, held_out = corpus.split(corpus.source_files())
        ids: list[int] = []
        for _, text in held_out:
            ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
            if len(ids) >= max_tokens:
                break
        data = torch.tensor(ids[:max_tokens])
        seq = self.settings.seq_len
        losses = []
        with torch.inference_mode():
            for start in range(0, len(data) - seq - 1, seq):
                window = data[start : start + seq + 1]
                logits = model(input_ids=window[None, :-1]).logits[0]
                losses.append(F.cross_entropy(logits, window[1:]).item())
        return float(np.mean(losses))

    # 5 ------------------------------------------------------------------------------------------
    def export(self, model: LlamaForCausalLM, tokenizer, name: str, extra: dict) -> None:
        out = self.out_dir / name
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        model.to(torch.float32)
        # Stored in bf16 (half the bytes), declared float32: transformers 5 loads the declared dtype by
        # default, so `from_pretrained(dir)` computes in fp32, as the services do on a CPU. Declared bf16,
        # the "target alone" a user runs would be a bf16 model, whose one-token steps round differently.
        model.config.dtype = torch.float32
        model.config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        GenerationConfig(
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id, do_sample=False,
        ).save_pretrained(out)
        (out / "training.json").write_text(json.dumps(extra, indent=2) + "\n")

    def run(self) -> None:
        s = self.settings
        torch.manual_seed(s.seed)
        random.seed(s.seed)
        started = time.monotonic()
        tokenizer, tokens = self.tokenizer_and_tokens()

        torch.manual_seed(s.seed)
        target = LlamaForCausalLM(llama_config(TARGET_SHAPE, s, tokenizer))
        self.log(f"target: {sum(p.numel() for p in target.parameters()) / 1e6:.1f}M parameters")
        target = self._train("target", target, tokens, s.target_steps, s.target_lr)
        target_loss = self.held_out_loss(target, tokenizer)
        self.log(f"target held-out loss {target_loss:.4f}")

        torch.manual_seed(s.seed + 1)
        draft = LlamaForCausalLM(llama_config(DRAFT_SHAPE, s, tokenizer))
        self.log(f"draft: {sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M parameters")
        for p in target.parameters():
            p.requires_grad_(False)
        draft = self._train("draft", draft, tokens, s.draft_steps, s.draft_lr, teacher=target)
        draft_loss = self.held_out_loss(draft, tokenizer)
        self.log(f"draft held-out loss {draft_loss:.4f}")

        summary = {"settings": asdict(s), "wall_seconds": round(time.monotonic() - started),
                   "training_tokens": int(len(tokens))}
        self.export(target, tokenizer, "target", {**summary, "shape": asdict(TARGET_SHAPE),
                                                   "held_out_loss": round(target_loss, 4)})
        self.export(draft, tokenizer, "draft", {**summary, "shape": asdict(DRAFT_SHAPE),
                                                 "held_out_loss": round(draft_loss, 4)})
        write_prompts(self.out_dir / "prompts.jsonl")
        self.log(f"exported to {self.out_dir}")


def write_prompts(path: Path, count: int = 32, prompt_chars: int = 400, seed: int = 0) -> None:
    """Prompts cut from held-out stdlib files: code the pair never trained on."""
    _, held_out = corpus.split(corpus.source_files())
    rng = random.Random(seed)
    rows = []
    for relative, text in rng.sample(held_out, min(count, len(held_out))):
        lines = text.splitlines(keepends=True)
        start = rng.randrange(0, max(1, len(lines) - 30))
        taken = []
        while start < len(lines) and sum(map(len, taken)) < prompt_chars:
            taken.append(lines[start])
            start += 1
        prompt = "".join(taken)
        rows.append({"source": relative, "prompt": prompt})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
