"""A model's fast tokenizer and chat template, without importing transformers.

Importing transformers costs 0.6 s before anything is loaded (its lazy module table and
huggingface_hub's HTTP clients): a quarter of a resumed `chatkv ask` in a fresh process,
which otherwise needs nothing from it (engine/leanload.py). What chatkv uses of
transformers' fast tokenizer is small: encode (control tokens recognised or split), decode,
the chat template rendered to text, and a few ids. `LeanTokenizer` does the same with the
`tokenizers` library and jinja2, from a state the last transformers load captured
(`capture`): the backend tokenizer exactly as transformers set it up (serialised by the
backend itself), the template, the special tokens the template is given. `capture` checks
that the two agree on probe chats and texts, and refuses a tokenizer they do not (another
tokenizer class, decode clean-up, a template using transformers' own tags): that model then
loads through transformers. Nothing here is pickled; the state is JSON.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Sequence
from typing import Any

STATE_FORMAT = "1"  # bump when the state's fields or their meaning change
# transformers' switch that cleans up a BPE tokenizer's decoded text after all
_FORCED_BPE_CLEANUP = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"

# Probes `capture` renders and encodes with both tokenizers: roles, a system prompt, a
# generation prompt or none, control-token text, whitespace and non-ASCII text.
_PROBE_CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are terse.\n"},
        {"role": "user", "content": "What is 2+2?  "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "<|im_start|>system\n\ue000x\ue001 \u00e9\u4e2d\U0001f600"},
    ],
]
_PROBE_TEXTS = [
    "Hello, world!",
    "  leading and trailing  \n\n\ttabs",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "caf\u00e9 na\u00efve \u4e2d\u6587 \U0001f600 \u0645\u0631\u062d\u0628\u0627",
    "def f(x):\n    return x**2  # 1,234.5e-6",
    "It isn't here , is it ? No . ",  # what decode clean-up would change
    " ".join(f"word{i}" for i in range(600)),  # past any truncation a tokenizer file may set
]


class LeanTokenizer:
    """transformers' fast tokenizer, as far as chatkv uses it (see the module doc)."""

    def __init__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(state["backend"])
        # A tokenizer file's truncation and padding come back with it; transformers turns them
        # off for every encode chatkv asks of it (no max_length, no padding), and so does this.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.chat_template: str = state["chat_template"]
        self.special_tokens_map: dict[str, Any] = state["special_tokens_map"]
        self.eos_token_id: int | None = state["eos_token_id"]
        self.pad_token_id: int | None = state["pad_token_id"]
        self._template: Any = None
        self._lock = threading.Lock()  # encode flips a flag on the shared backend tokenizer

    def encode(
        self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False
    ) -> list[int]:
        """Token ids of `text`; with `split_special_tokens` control-token text is split into
        ordinary tokens (as transformers does it: the backend's encode_special_tokens)."""
        with self._lock:
            self._tok.encode_special_tokens = split_special_tokens
            ids: list[int] = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text: str = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def get_vocab(self) -> dict[str, int]:
        vocab: dict[str, int] = self._tok.get_vocab(with_added_tokens=True)
        return vocab

    def apply_chat_template(
        self,
        conversation: Sequence[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> str | list[int]:
        """The chat rendered as transformers renders it (its jinja environment, the special
        tokens as variables); its ids (control tokens recognised) with `tokenize`."""
        if not conversation:
            raise ValueError(
                "Cannot apply chat template to an empty conversation. Provide at least one message."
            )
        if self._template is None:
            self._template = _compile(self.chat_template)
        messages = [{k: v for k, v in m.items() if v is not None} for m in conversation]
        text: str = self._template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens_map,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def capture(tok: Any) -> tuple[dict[str, Any] | None, str]:
    """(state, "") for a LeanTokenizer that does what transformers' `tok` does, or (None, why
    not). Never raises."""
    try:
        from transformers import PreTrainedTokenizerFast

        if type(tok) is not PreTrainedTokenizerFast:
            return None, f"tokenizer class {type(tok).__name__}"
        template = tok.chat_template
        if not isinstance(template, str):
            return None, "the chat template is not a single template"
        bpe = type(tok.backend_tokenizer.model).__name__ == "BPE"
        forced = getattr(tok, _FORCED_BPE_CLEANUP, False)
        if tok.clean_up_tokenization_spaces and (not bpe or forced):
            return None, "decoding cleans up tokenization spaces"
        if getattr(tok, "split_special_tokens", False):
            return None, "the tokenizer splits special tokens by default"
        state = {
            "format": STATE_FORMAT,
            "backend": _without_truncation(tok.backend_tokenizer.to_str()),
            "chat_template": template,
            "special_tokens_map": json.loads(json.dumps(tok.special_tokens_map)),
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        lean = LeanTokenizer(state)
        for chat in _PROBE_CHATS:
            for gen in (False, True):
                want = tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
                if lean.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False) != want:
                    return None, "the chat template renders differently outside transformers"
        for text in _PROBE_TEXTS:
            for split in (False, True):
                want_ids = list(tok.encode(text, add_special_tokens=False, split_special_tokens=split))
                if lean.encode(text, add_special_tokens=False, split_special_tokens=split) != want_ids:
                    return None, "the backend tokenizer encodes differently outside transformers"
            if lean.encode(text) != list(tok.encode(text)):  # with the special tokens added
                return None, "the backend tokenizer adds special tokens differently outside transformers"
                for skip in (False, True):
                    if lean.decode(want_ids, skip) != tok.decode(want_ids, skip_special_tokens=skip):
                        return None, "the backend tokenizer decodes differently outside transformers"
    except Exception as e:  # whatever the tokenizer does instead: transformers' load keeps serving it
        return None, f"the tokenizer could not be captured ({e})"
    return state, ""


def _without_truncation(backend: str) -> str:
    """The serialised backend tokenizer with no truncation or padding (see LeanTokenizer):
    the same state whatever the tokenizer was last asked to do."""
    parsed = json.loads(backend)
    parsed["truncation"] = parsed["padding"] = None
    return json.dumps(parsed, ensure_ascii=False)


def digest(state: dict[str, Any]) -> str:
    """The name a captured state is kept under: its content's hash."""
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:32]


def _compile(template: str) -> Any:
    """`template` compiled in the jinja environment transformers renders chat templates in
    (utils/chat_template_utils.py, 5.x: sandboxed, trim_blocks and lstrip_blocks, loop
    controls, its tojson, raise_exception, strftime_now, dict and namespace guards).
    Its `{% generation %}` tag (assistant masks, for training) is not known here: such a
    template fails to compile, and `capture` refuses it."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    "Chat templates cannot store underscore-prefixed attributes on a namespace, "
                    f"but got {name!r}."
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)
