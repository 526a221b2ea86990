"""The suite's word-level tokenizer: one token per made-up word, family name, tag or symbol.

Built with the `tokenizers` library (WordLevel model, whitespace split, `<s>` prepended by the
post-processor) and saved as a transformers PreTrainedTokenizerFast with bos/eos/pad/unk and a
chat template that renders a user turn exactly like the plain prompt, so `--chat_template` and
plain tokenisation give the same ids. `Vocab` tokenises the suite's own text in pure Python with
the same result as the saved tokenizer (checked in tests), which keeps training data fast to build.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
# A user turn renders as "<s>" + content (what tokenizer(prompt) gives); an assistant turn as
# " " + content + "</s>" (what the response ids + eos give).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }}"
    "{{ eos_token }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token strings in id order; specials first (pad 0, bos 1, eos 2, unk 3)."""

    tokens: tuple[str, ...]

    def __post_init__(self):
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("duplicate tokens in the vocabulary")
        object.__setattr__(self, "_ids", {t: i for i, t in enumerate(self.tokens)})

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    @property
    def bos_id(self) -> int:
        return self._ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._ids[EOS]

    def id(self, token: str) -> int:
        return self._ids[token]

    def encode(self, text: str) -> list[int]:
        """Ids of the words of `text` (no specials); raises KeyError on an unknown word."""
        return [self._ids[w] for w in text.split()]

    def prompt_ids(self, prompt: str) -> list[int]:
        """== tokenizer(prompt)["input_ids"] of the saved tokenizer."""
        return [self.bos_id, *self.encode(prompt)]

    def response_ids(self, response: str) -> list[int]:
        """== tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]."""
        return [*self.encode(response), self.eos_id]


def make_vocab(words: Sequence[str]) -> Vocab:
    return Vocab(tuple(SPECIALS) + tuple(words))


def build_tokenizer(vocab: Vocab, model_max_length: int = 256) -> Any:
    """The transformers PreTrainedTokenizerFast for `vocab`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab.tokens)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab.bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(vocab: Vocab, out_dir: str | os.PathLike) -> None:
    """Writes tokenizer.json + tokenizer_config.json (+ chat template) into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer(vocab).save_pretrained(str(out_dir))
