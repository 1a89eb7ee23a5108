"""A tokenizer's chat template rendered as transformers' `apply_chat_template(tokenize=False)` renders it:
Jinja's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, loop controls, `{% generation %}`
blocks, the `tojson` filter without HTML escaping, and the globals `raise_exception`, `strftime_now`,
`dict` and `namespace`; the template sees `messages`, `add_generation_prompt`, `tools`, `documents` and the
special tokens (`bos_token`, `eos_token`, ...).

Templates come from model repositories, so they are untrusted code: the sandbox keeps them from Python's
internals. This module knows nothing about HTTP or tokenization.
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning travels under; templates read the first (transformers fills it from the others).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its own raise_exception) or failed while rendering it."""


class _GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks; rendering
    keeps the text as it is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_keep"), [], [], body).set_lineno(lineno)

    def _keep(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Dict:
    """`dict(...)` for templates, without the type's own attributes."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing attribute names that start with an underscore."""

    def __init__(*args, **kwargs):  # Jinja's own signature trick: `namespace(self=...)` still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationBlocks, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env


def _with_reasoning_aliases(message: dict) -> dict:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        """Compiles `source` (jinja2.TemplateSyntaxError when it does not compile)."""
        self.template = _environment().from_string(source)
        self.special_tokens = dict(special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        # As transformers does: keys whose value is None are dropped (templates test for presence).
        chat = [_with_reasoning_aliases({k: v for k, v in m.items() if v is not None}) for m in messages]
        try:
            return self.template.render(messages=chat, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as error:
            raise ChatTemplateError(str(error)) from None
        except RecursionError:
            raise ChatTemplateError("the template recursed too deeply") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, MemoryError) as error:
            raise ChatTemplateError(f"{type(error).__name__}: {error}") from None
