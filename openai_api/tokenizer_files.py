"""What the HTTP front reads of the target's tokenizer, without torch or transformers: the chat template and
the special tokens a template sees (tokenizer_config.json, chat_template.jinja, special_tokens_map.json), and
a prompt's token count as the orchestrator's `tokenizer(text)` makes it (tokenizer.json through `tokenizers`).

It only reads files: it knows nothing about HTTP, the orchestrator, or how a template is rendered.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

log = logging.getLogger(__name__)

# The named special tokens transformers passes to every chat template (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def locate(name: str) -> Path | None:
    """The local directory holding tokenizer `name` (a path, or a hub id already in the local HF cache)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # transformers brings it; a front installed without it reads local directories only
        return None
    for filename in ("tokenizer_config.json", "tokenizer.json"):
        try:
            cached = try_to_load_from_cache(name, filename)
        except ValueError:  # not a valid hub id either
            return None
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken as a dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _templates(directory: Path, config: dict) -> dict[str, str]:
    """Every chat template by name, as transformers finds them: chat_template.jinja and
    additional_chat_templates/*.jinja first, else tokenizer_config.json's `chat_template` (a string, or a list
    of {name, template})."""
    found: dict[str, str] = {}
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        found["default"] = jinja.read_text(encoding="utf-8")
    extra = directory / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            found[file.stem] = file.read_text(encoding="utf-8")
    if found:
        return found
    configured = config.get("chat_template")
    if isinstance(configured, str):
        return {"default": configured}
    if isinstance(configured, list):
        return {t["name"]: t["template"] for t in configured if isinstance(t, dict) and "name" in t and "template" in t}
    return {}


@dataclass
class TokenizerFiles:
    source: str  # what was asked for (a path or hub id), for messages
    directory: Path | None
    chat_template: str | None = None
    # Why there is no template (None when there is one): for the 400 a chat request gets.
    no_template_reason: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # what a template sees: bos_token, eos_token, ...
    tokenizer: Tokenizer | None = None  # None: prompt tokens cannot be counted here
    adds_bos: bool = False  # `tokenizer(text)` puts the BOS id in front of the text's own ids

    @classmethod
    def load(cls, name: str) -> TokenizerFiles:
        directory = locate(name)
        if directory is None:
            return cls(name, None, no_template_reason=(
                f"the tokenizer {name!r} is not a local directory (nor a hub id in the local cache), so its chat "
                "template cannot be read; start the server with --tokenizer DIR"))
        config = _read_json(directory / "tokenizer_config.json")
        legacy = _read_json(directory / "special_tokens_map.json")
        special = {}
        for key in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(key)) or _token_text(legacy.get(key))
            if text is not None:
                special[key] = text
        if isinstance(config.get("extra_special_tokens"), dict):  # model-specific names (image_token, ...)
            special.update({k: t for k, v in config["extra_special_tokens"].items() if (t := _token_text(v))})
        files = cls(name, directory, special_tokens=special)
        templates = _templates(directory, config)
        if "default" in templates:
            files.chat_template = templates["default"]
        elif templates:
            files.no_template_reason = (f"the tokenizer at {directory} has chat templates named {sorted(templates)} "
                                        "but none named 'default'")
        else:
            files.no_template_reason = (
                f"the model has no chat template (none in {directory / 'tokenizer_config.json'} or "
                f"{directory / 'chat_template.jinja'}); use /v1/completions, or give the server a tokenizer "
                "directory that has one (--tokenizer DIR)")
        if (directory / "tokenizer.json").is_file():
            files.tokenizer = _backend(directory / "tokenizer.json")
        files.adds_bos = _adds_bos(files.tokenizer, config, special.get("bos_token"))
        return files

    def count(self, text: str) -> int | None:
        """Tokens of `text` as the orchestrator's `tokenizer(text)` makes them (special tokens included);
        None when this tokenizer cannot be loaded here."""
        if self.tokenizer is None:
            return None
        return len(self.tokenizer.encode(text).ids)

    def prompt_text(self, rendered: str) -> str:
        """A rendered chat as the text to send. HF's apply_chat_template tokenizes the rendered text without
        adding special tokens; the orchestrator tokenizes the text as `tokenizer(text)` does, which adds a BOS
        where this tokenizer adds one. A template that writes the BOS itself would then get two: drop the
        template's, so that the ids are the same as apply_chat_template(tokenize=True)'s."""
        bos = self.special_tokens.get("bos_token")
        if self.adds_bos and bos and rendered.startswith(bos):
            return rendered[len(bos):]
        return rendered


def _backend(path: Path) -> Tokenizer:
    """tokenizer.json as transformers (5.x) runs it: its own post-processor (transformers ignores
    tokenizer_config.json's add_bos_token / add_eos_token when tokenizer.json exists), no truncation or padding."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _adds_bos(tokenizer: Tokenizer | None, config: dict, bos: str | None) -> bool:
    if bos is None:
        return False
    if tokenizer is None:  # no tokenizer.json: the config's flag is all there is
        return bool(config.get("add_bos_token"))
    bos_id = tokenizer.token_to_id(bos)
    with_special = tokenizer.encode("a").ids
    return bos_id is not None and bool(with_special) and with_special[0] == bos_id \
        and tokenizer.encode("a", add_special_tokens=False).ids[:1] != [bos_id]
