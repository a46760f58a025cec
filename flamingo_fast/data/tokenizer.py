"""Tokenizers (HF `tokenizers` library) with Flamingo's two added special tokens.

Convention shared with the model (notes/common.md): for a base vocabulary of N ids, `<image>` = N and
`<|endofchunk|>` = N + 1, so `vocab_size = N + 2` (HF Llama + 2 added tokens, as in OpenFlamingo).

Two ways to get one:
- `load_tokenizer(path)`: a Llama-style `tokenizer.json` (file or folder), e.g. from a HF checkpoint. Llama 3.2
  Vision's (Mllama) already ends with its image token `<|image|>` at id N, the id `<image>` gets here: it is
  renamed `<image>` (so the samples' markers map to it) and only `<|endofchunk|>` is appended;
- `build_word_tokenizer(words)`: a tiny lowercase word-level tokenizer (punctuation split off), used
  by the embedded shapes data. Its ids: `<pad>` 0, `<s>` 1, `</s>` 2, `<unk>` 3, the sorted words, then
  `<image>`, `<|endofchunk|>`.
`Tokenizer.save(folder)` writes `tokenizer.json` plus `special_tokens_map.json` (HF file names), and
`load_tokenizer(folder)` reads them back with identical ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from flamingo_fast.data.sample import EOC_TOKEN, IMAGE_TOKEN

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

WORD_SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}

# Role names tried, in order, when a tokenizer.json comes without a special_tokens_map.json
# (Llama 1/2 use <s> </s> <unk>; Llama 3 uses <|begin_of_text|> <|end_of_text|> and has no unk).
_ROLE_CANDIDATES = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>"),
    "eos": ("</s>", "<|end_of_text|>", "<eos>"),
    "unk": ("<unk>",),
    "pad": ("<pad>", "<PAD>", "[PAD]", "<|finetune_right_pad_id|>"),  # the last: Llama 3.1+ (Mllama's pad_token_id)
}
MLLAMA_IMAGE_TOKEN = "<|image|>"


class Tokenizer:
    """Thin wrapper around `tokenizers.Tokenizer` exposing the ids the model and collator need.

    `encode` never adds bos/eos (the collator adds bos itself, so both tokenizer kinds behave alike).
    Without a pad token, padding uses unk (or eos): padded positions are masked anyway.
    """

    def __init__(self, hf_tokenizer: HFTokenizer, bos: str, eos: str, unk: str | None = None, pad: str | None = None):
        if not isinstance(hf_tokenizer, HFTokenizer):
            raise TypeError(f"hf_tokenizer must be a tokenizers.Tokenizer, got {type(hf_tokenizer).__name__}")
        self._tok = hf_tokenizer
        self._add_flamingo_tokens()
        self.special_tokens = {"bos": bos, "eos": eos, "unk": unk, "pad": pad or unk or eos}
        ids = {}
        for role, token in self.special_tokens.items():
            if token is None:
                continue
            token_id = self._tok.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{role} token {token!r} is not in the tokenizer's vocabulary")
            ids[role] = token_id
        self.bos_id: int = ids["bos"]
        self.eos_id: int = ids["eos"]
        self.pad_id: int = ids["pad"]
        self.unk_id: int | None = ids.get("unk")

    def _add_flamingo_tokens(self) -> None:
        size = self._tok.get_vocab_size(with_added_tokens=True)
        image_id, eoc_id = self._tok.token_to_id(IMAGE_TOKEN), self._tok.token_to_id(EOC_TOKEN)
        # Both missing: append both. Only `<|endofchunk|>` missing after a last `<image>` (Mllama's): append it.
        missing = (IMAGE_TOKEN, EOC_TOKEN) if image_id is None and eoc_id is None else \
            (EOC_TOKEN,) if eoc_id is None and image_id == size - 1 else ()
        if missing:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
            size += len(missing)
            image_id, eoc_id = self._tok.token_to_id(IMAGE_TOKEN), self._tok.token_to_id(EOC_TOKEN)
        if (image_id, eoc_id) != (size - 2, size - 1):
            raise ValueError(
                f"{IMAGE_TOKEN} and {EOC_TOKEN} must be the last two ids ({size - 2}, {size - 1}) of a "
                f"vocabulary of {size}; found ids {image_id} and {eoc_id}"
            )
        self.image_token_id: int = image_id
        self.eoc_token_id: int = eoc_id
        self.vocab_size: int = size
        self.base_vocab_size: int = size - 2

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        return self._tok

    @property
    def special_ids(self) -> set[int]:
        ids = {self.bos_id, self.eos_id, self.pad_id, self.image_token_id, self.eoc_token_id}
        return ids | ({self.unk_id} if self.unk_id is not None else set())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids plus each token's (start, end) character span in `text`."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True, stop_at_end: bool = False) -> str:
        """Text of `ids`. stop_at_end: cut at the first `<|endofchunk|>` or eos (end of a generated answer);
        skip_special_tokens: drop pad/bos/eos/unk/`<image>`/`<|endofchunk|>` from the text."""
        ids = [int(i) for i in ids]
        if stop_at_end:
            for position, token_id in enumerate(ids):
                if token_id in (self.eoc_token_id, self.eos_id):
                    ids = ids[:position]
                    break
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / TOKENIZER_FILE))
        roles = {f"{role}_token": token for role, token in self.special_tokens.items() if token is not None}
        (folder / SPECIAL_TOKENS_FILE).write_text(json.dumps(roles, indent=2) + "\n")
        return folder

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, image_token_id={self.image_token_id}, "
            f"eoc_token_id={self.eoc_token_id}, pad/bos/eos={self.pad_id}/{self.bos_id}/{self.eos_id})"
        )


def _read_roles(folder: Path) -> dict[str, str]:
    path = folder / SPECIAL_TOKENS_FILE
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    roles = {}
    for role in ("bos", "eos", "unk", "pad"):
        value = raw.get(f"{role}_token")
        if isinstance(value, dict):  # HF also writes {"content": "<s>", "lstrip": ...}
            value = value.get("content")
        if isinstance(value, str):
            roles[role] = value
    return roles


def _mllama_image_token_renamed(tok: HFTokenizer) -> HFTokenizer:
    """A tokenizer whose last id is `<|image|>` (Llama 3.2 Vision's) with that token renamed `<image>`: the same
    id, which is where this project puts `<image>` (module docstring). Any other tokenizer is returned as is."""
    size = tok.get_vocab_size(with_added_tokens=True)
    if tok.token_to_id(MLLAMA_IMAGE_TOKEN) != size - 1 or tok.token_to_id(IMAGE_TOKEN) is not None:
        return tok
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        if added["content"] == MLLAMA_IMAGE_TOKEN:
            added["content"] = IMAGE_TOKEN
    renamed = HFTokenizer.from_str(json.dumps(data))
    if renamed.token_to_id(IMAGE_TOKEN) != size - 1:
        raise ValueError(f"cannot rename {MLLAMA_IMAGE_TOKEN} to {IMAGE_TOKEN}: it is not only an added token")
    return renamed


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a `tokenizer.json` (a file, or a folder holding one, optionally with special_tokens_map.json).

    Works for HF Llama checkpoints and for folders written by `Tokenizer.save`. `<image>` and
    `<|endofchunk|>` are appended as the last two ids unless already there (a Llama 3.2 Vision tokenizer's
    last `<|image|>` becomes `<image>`: module docstring).
    """
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} at {path}")
    hf_tokenizer = _mllama_image_token_renamed(HFTokenizer.from_file(str(file)))
    roles = _read_roles(file.parent)
    for role, candidates in _ROLE_CANDIDATES.items():
        if role not in roles:
            found = next((t for t in candidates if hf_tokenizer.token_to_id(t) is not None), None)
            if found is not None:
                roles[role] = found
    for role in ("bos", "eos"):
        if role not in roles:
            raise ValueError(f"cannot find the {role} token of {file}; add a {SPECIAL_TOKENS_FILE} naming it")
    return Tokenizer(hf_tokenizer, bos=roles["bos"], eos=roles["eos"], unk=roles.get("unk"), pad=roles.get("pad"))


def build_word_tokenizer(words: Sequence[str]) -> Tokenizer:
    """A lowercase word-level tokenizer over `words` (punctuation marks may be words too).

    Text is lowercased, split on whitespace, and every punctuation character becomes its own token,
    so "Short answer:red" -> ["short", "answer", ":", "red"]. Unknown words map to `<unk>`.
    """
    vocab = dict((token, i) for i, token in enumerate(WORD_SPECIAL_TOKENS.values()))
    for word in sorted({w.lower() for w in words}):
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"words must be non-empty and contain no whitespace, got {word!r}")
        if word in vocab or word in (IMAGE_TOKEN, EOC_TOKEN):
            raise ValueError(f"{word!r} is a reserved special token and cannot be a word")
        vocab[word] = len(vocab)
    hf_tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token=WORD_SPECIAL_TOKENS["unk"]))
    hf_tokenizer.normalizer = normalizers.Lowercase()
    hf_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w\s]"), behavior="isolated")]
    )
    hf_tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in WORD_SPECIAL_TOKENS.values()]
    )
    return Tokenizer(hf_tokenizer, **WORD_SPECIAL_TOKENS)
