"""Hugging Face tokenizer files for a qianwen Tokenizer, so that
`transformers.AutoTokenizer.from_pretrained(dir)` gives the same ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from qianwen.tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END, _to_unicode
from qianwen.util import atomic_write

if TYPE_CHECKING:
    from qianwen.tokenizer import Tokenizer


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two lower-ranked tokens, ordered by the
    rank of the result. Merging by that order is what tiktoken does: it joins
    the adjacent pair whose concatenation has the lowest rank."""
    found = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None and left < rank and right < rank:
                found.append((rank, left, right, token[:cut], token[cut:]))
    found.sort()
    return [(a, b) for _, _, _, a, b in found]


def write_hf_config(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    """tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    eos = IM_END if IM_END in tok.special_tokens else ENDOFTEXT
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "bos_token": None,
        "eos_token": eos,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "special": True,
                "normalized": False,
                "lstrip": False,
                "rstrip": False,
                "single_word": False,
            }
            for s, i in specials
        },
    }
    atomic_write(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
    special_map = {"eos_token": eos, "pad_token": ENDOFTEXT}
    atomic_write(out / "special_tokens_map.json", json.dumps(special_map, indent=2))


def hf_files(tok: Tokenizer) -> dict[str, str]:
    """tokenizer.json, vocab.json and merges.txt, as text."""
    vocab = {_to_unicode(token): rank for token, rank in tok.ranks.items()}
    merges = [(_to_unicode(a), _to_unicode(b)) for a, b in bpe_merges(tok.ranks)]
    # ignore_merges: a piece that is itself a token maps straight to it, as in tiktoken.
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in specials])
    for content, token_id in specials:
        if hf.token_to_id(content) != token_id:
            raise ValueError(f"special token {content} would get id {hf.token_to_id(content)} instead of {token_id}.")

    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    return {
        "tokenizer.json": hf.to_str(pretty=True),
        "vocab.json": json.dumps(dict(ordered), ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
    }
