"""The layer-skip drafter (self-speculative decoding; Draft & Verify, Zhang et al., ACL 2024): the draft service
loads the TARGET checkpoint and drafts with some of its decoder layers skipped. No second model to train or ship;
lossless, because the verify service scores every draft with the whole target.

Skipping is the lean runtime's (serving/runtimes/lean.py: LeanLlama.skipping): the kept layers run in order on the
residual stream, which passes a skipped layer by unchanged, and a session's KV cache holds the kept layers' keys and
values only (kept / total of the target's per token). Drafting is the model drafter's loop (model.py: propose_batch)
on that runner, so sessions batch ragged as the model drafter's do, greedy drafts are the argmax, and sampled ones
come with draft_probs through the one logits -> probs transform (speculation/sampling.py).

Which layers: `--skip-layers 2,4` (0-based), `@FILE` (a set a search saved), or `auto`: the search in skip_search.py
on held-out prompts, whose choice is logged and can be saved (`--skip-layers-save FILE`) for the next start.

Llama-family models only (what the lean runtime supports); others are refused at startup. Through the HF forward it
would mean rebuilding each architecture's layer list and renumbering its cache layers, and checking every
architecture that the result is the model with those layers removed: not done.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from draft_service.drafters.model import ModelDrafter
from serving.runtimes import make_runtime
from serving.model_loading import LoadedModel, load_model

log = logging.getLogger(__name__)

# The shipped prompt set of a source checkout (models/prompts.jsonl: prompts cut from files the reference pair never
# trained on). The search takes its second half: `specdec bench` and the demo use the first prompts, so a search
# run with the defaults never chooses on the prompts a benchmark then measures.
DEFAULT_SEARCH_PROMPTS = Path(__file__).resolve().parents[2] / "models" / "prompts.jsonl"
DEFAULT_SEARCH_COUNT = 16
MAX_SEARCH_PROMPTS = 32  # of a file given with --skip-search-prompts, the first this many


def parse_skip_layers(spec: str) -> list[int] | str:
    """`--skip-layers` before the model is known: "auto", "@FILE", or distinct non-negative integers (returned
    sorted); ValueError with what is wrong otherwise. The range is checked against the model (check_skip)."""
    spec = spec.strip()
    if spec == "auto" or spec.startswith("@"):
        return spec
    parts = [part.strip() for part in spec.split(",")]
    if not spec or any(not part.lstrip("-").isdigit() for part in parts):
        raise ValueError(f"--skip-layers takes 0-based layer indices separated by commas (e.g. 2,4), auto or @FILE; "
                         f"got {spec!r}")
    layers = [int(part) for part in parts]
    if len(set(layers)) != len(layers):
        raise ValueError(f"--skip-layers names a layer twice: {spec!r}")
    return sorted(layers)


def check_skip(layers: list[int], num_layers: int, what: str = "--skip-layers") -> list[int]:
    """The layers if they are a skip set of a model with num_layers decoder layers; ValueError else."""
    outside = [layer for layer in layers if not 0 <= layer < num_layers]
    if outside:
        raise ValueError(f"{what}: the model has {num_layers} decoder layers (0..{num_layers - 1}); "
                         f"{', '.join(map(str, outside))} is out of range")
    if len(set(layers)) == num_layers:
        raise ValueError(f"{what} skips all {num_layers} layers; keep at least one")
    if not layers:
        raise ValueError(f"{what} skips no layer: that drafts with the whole target (--drafter model --model TARGET "
                         "does that, at no gain)")
    return sorted(set(layers))


def read_saved(path: str, num_layers: int) -> list[int]:
    """The skip set a search saved (save_choice), checked against this model."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--skip-layers @{path}: cannot read a saved skip set ({error})") from error
    layers = saved.get("skip_layers") if isinstance(saved, dict) else None
    if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise ValueError(f"--skip-layers @{path}: expected a JSON object with skip_layers, a list of layer indices")
    if saved.get("num_layers", num_layers) != num_layers:
        raise ValueError(f"--skip-layers @{path}: saved for a model of {saved['num_layers']} layers; this one has "
                         f"{num_layers}")
    return check_skip(layers, num_layers, f"--skip-layers @{path}")


def save_choice(path: str, model: str, report) -> None:
    """The search's choice as JSON (what `--skip-layers @FILE` reads), written whole or not at all."""
    chosen = report.chosen
    record = {"skip_layers": list(chosen.skip), "num_layers": report.num_layers, "model": model,
              "alpha": round(chosen.alpha, 4), "cost_ratio": round(chosen.cost_ratio, 4), "gamma": chosen.gamma,
              "predicted_speedup": round(chosen.predicted_speedup, 4), "prompts": report.prompts,
              "positions": report.positions, "search_s": round(report.seconds, 1)}
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, target)


def search_prompts(settings, tokenizer) -> list[list[int]]:
    """The held-out prompts the search runs on, as token ids."""
    path = settings.skip_search_prompts
    given = path is not None
    path = Path(path) if given else DEFAULT_SEARCH_PROMPTS
    if not path.is_file():
        raise ValueError(f"--skip-layers auto searches on held-out prompts: no file at {path}" + (
            "" if given else " (the default, a source checkout's models/prompts.jsonl); name one with "
                             "--skip-search-prompts FILE (JSONL, one {\"prompt\": ...} per line)"))
    try:
        texts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--skip-search-prompts {path}: expected JSONL, one {{\"prompt\": ...}} per line "
                         f"({type(error).__name__}: {error})") from error
    texts = [text for text in texts if isinstance(text, str) and text]
    texts = texts[:MAX_SEARCH_PROMPTS] if given else texts[-DEFAULT_SEARCH_COUNT:]
    if not texts:
        raise ValueError(f"--skip-search-prompts {path} holds no prompt")
    return [tokenizer(text)["input_ids"] for text in texts]


class LayerSkipDrafter(ModelDrafter):
    kind = "layer-skip"

    def __init__(self, loaded: LoadedModel, runner, skip: list[int], num_layers: int):
        super().__init__(loaded, runner)  # runner: the lean runner of the kept layers
        self.skip = sorted(skip)
        self.num_layers = num_layers
        self.description = f"layer-skip(skip={','.join(map(str, self.skip))} of {num_layers})"

    @classmethod
    def from_settings(cls, settings) -> LayerSkipDrafter:
        """--model names the TARGET's checkpoint; --skip-layers which of its layers to skip (a plain
        ModelServerSettings, with none of the layer-skip fields, means auto)."""
        from transformers import AutoConfig, AutoTokenizer

        from serving.runtimes import lean as lean_llama

        spec = parse_skip_layers(settings.skip_layers)
        save = settings.skip_layers_save
        if save and spec != "auto":
            raise ValueError("--skip-layers-save writes what --skip-layers auto chooses; with a given set there is "
                             "nothing to save")
        if settings.runtime == "hf":
            raise ValueError("--drafter layer-skip runs on the lean runtime (--runtime auto or lean), not hf")
        config = AutoConfig.from_pretrained(settings.model)
        if not lean_llama.supports(config):
            raise ValueError(f"--drafter layer-skip supports Llama-family models (model_type llama, default RoPE, "
                             f"SiLU MLP without bias: what the lean runtime runs); {settings.model} is "
                             f"{getattr(config, 'model_type', '?')!r}")
        num_layers = config.num_hidden_layers
        if isinstance(spec, list):
            skip = check_skip(spec, num_layers)
        elif spec.startswith("@"):
            skip = read_saved(spec[1:], num_layers)
        else:
            skip = None
        loaded = load_model(settings.model, settings.device, settings.dtype)
        full = make_runtime(loaded.model, loaded.device, "lean")
        if skip is None:
            from draft_service.drafters.skip_search import search

            prompts = search_prompts(settings, AutoTokenizer.from_pretrained(settings.model))
            log.info("layer-skip: searching %d layers for the skip set with the highest predicted speedup on %d "
                     "held-out prompts", num_layers, len(prompts))
            report = search(full, prompts)
            log.info("layer-skip: %s", report.summary())
            if report.chosen.predicted_speedup <= 1.0:
                log.warning("layer-skip: no skip set is predicted to pay on this model and machine (best x%.3f): "
                            "every round costs more than the target alone saves", report.chosen.predicted_speedup)
            skip = list(report.chosen.skip)
            if save:
                save_choice(save, settings.model, report)
                log.info("layer-skip: saved the chosen set to %s (start with --skip-layers @%s)", save, save)
        return cls(loaded, full.skipping(skip), skip, num_layers)
