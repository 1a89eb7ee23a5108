"""The drafters a draft service can host (`specdec serve draft --drafter`), behind one seam (base.py).

A new drafter is one module here and one line in DRAFTERS: its name, and how it is built from the service's
settings (serving/model_server.py: ModelServerSettings).
"""

from __future__ import annotations

from collections.abc import Callable

from draft_service.drafters.base import Drafter
from draft_service.drafters.chain import ChainDrafter
from draft_service.drafters.layer_skip import LayerSkipDrafter
from draft_service.drafters.model import ModelDrafter
from draft_service.drafters.ngram import NgramDrafter

DRAFTERS: dict[str, Callable[..., Drafter]] = {
    "model": ModelDrafter.from_settings,  # a small causal LM (--model), the default
    "ngram": NgramDrafter.from_settings,  # prompt lookup over the session's tokens; --model only for its vocabulary
    "layer-skip": LayerSkipDrafter.from_settings,  # the target (--model) with some layers skipped (--skip-layers)
}


def drafter_names(spec: str) -> list[str]:
    """`--drafter` as a list of registered names: one drafter, or a chain (comma-separated); ValueError else."""
    names = [name.strip() for name in spec.split(",")]
    unknown = [name for name in names if name not in DRAFTERS]
    if unknown or not names:
        raise ValueError(f"--drafter must be one of {', '.join(DRAFTERS)}, or several of them comma-separated (a "
                         f"chain); got {spec!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"--drafter names a drafter twice: {spec!r}")
    return names


def build_drafter(settings) -> Drafter:
    """The drafter the settings name (settings.drafter), built from them."""
    members = [DRAFTERS[name](settings) for name in drafter_names(settings.drafter)]
    return members[0] if len(members) == 1 else ChainDrafter(members)
