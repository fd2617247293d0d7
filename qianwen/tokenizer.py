"""The Qwen tokenizer: byte-level BPE run by tiktoken, plus ChatML (QWEN_SPEC.md
sections 3 and 4).

Reads a `qwen.tiktoken` vocabulary or the byte-level BPE files that Qwen2-format
checkpoints ship (`tokenizer.json`, or `vocab.json` + `merges.txt`), and writes
both, so `transformers.AutoTokenizer` gives the same ids.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from pathlib import Path

import regex
import tiktoken

PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_NAMES = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")
VOCAB_FILE = "qwen.tiktoken"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TokenizerError(ValueError):
    """A vocabulary file that cannot be read; the message says which and why."""


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, used by HF byte-level BPE files."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _to_unicode(token: bytes) -> str:
    # Latin-1 turns each byte into the character of the same number, which the table then maps (in C).
    return token.decode("latin-1").translate(_byte_to_unicode())


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[int, int]:
    """The inverse of `_byte_to_unicode` for str.translate; a character below 256 that stands for no byte maps
    past Latin-1, so that encoding the result fails on it as on any other foreign character."""
    table = {ord(c): b for b, c in _byte_to_unicode().items()}
    return {**{i: 0xFFFF for i in range(256)}, **table}


def _from_unicode(text: str, where: str) -> bytes:
    try:
        return text.translate(_unicode_to_byte()).encode("latin-1")
    except UnicodeEncodeError:
        raise TokenizerError(
            f"{where}: token {text!r} is not byte-level BPE; qianwen reads GPT-2-style byte-level vocabularies only."
        ) from None


def qwen_vocabulary() -> Path:
    """The real qwen.tiktoken that the dashscope package ships (found without importing dashscope)."""
    spec = importlib.util.find_spec("dashscope")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken" if spec else None
    if path is None or not path.is_file():
        raise TokenizerError(
            "the Qwen vocabulary comes from the dashscope package, which is missing or has no "
            "resources/qwen.tiktoken; install it with `pip install 'dashscope>=1.20'`."
        )
    return path


_LOADED: OrderedDict[tuple, Tokenizer] = OrderedDict()


def _load_once(cls: type, files: list[Path], build: Callable[[], Tokenizer]) -> Tokenizer:
    """What `build` makes of `files`, made once per process for each content of them (the last few kept): a run
    on a real Qwen checkpoint reads its 151,851-token vocabulary in every stage, at 0.5 s a time (half of it
    tiktoken building its encoder), and a tokenizer never changes once made, so the same object can serve."""
    key = (cls, *(f.read_bytes() if f.is_file() else None for f in files))
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    tok = _LOADED[key] = build()
    while len(_LOADED) > 4:
        _LOADED.popitem(last=False)
    return tok


class Tokenizer:
    """Qwen's tokenizer. `encode` treats special-token text as plain text unless
    `allowed_special` names it, so user content can never forge a control token.
    Immutable once made: loads of the same files share one."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None, pattern: str = PATTERN):
        if special_tokens is None:
            special_tokens = {name: len(ranks) + i for i, name in enumerate(SPECIAL_NAMES)}
        self.ranks = ranks
        self.special_tokens = dict(special_tokens)
        self.pattern = pattern
        self._enc = tiktoken.Encoding(
            "qwen", pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self._special_ids = set(self.special_tokens.values())
        self._id_to_special = {i: s for s, i in self.special_tokens.items()}
        self._max_id = max([*ranks.values(), *self.special_tokens.values()])
        self._known_ids = len(ranks) + len(self.special_tokens) == self._max_id + 1
        self._regex: regex.Pattern | None = None
        self._files: dict[str, str] | None = None  # what `save` writes, made on the first save

    # -- loading ------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """A `.tiktoken` file, a `tokenizer.json`, a `vocab.json` (with `merges.txt`
        beside it) or a directory holding any of these."""
        path = Path(path)
        if path.is_dir():
            for name in (VOCAB_FILE, "tokenizer.json", "vocab.json"):
                if (path / name).is_file():
                    return cls.from_file(path / name)
            found = sorted(path.glob("*.tiktoken"))
            if found:
                return cls.from_file(found[0])
            raise TokenizerError(
                f"{path} has no tokenizer: expected {VOCAB_FILE}, tokenizer.json or vocab.json + merges.txt."
            )
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist.")
        if path.name.endswith(".json") and path.name != "vocab.json":
            return _load_once(cls, [path], lambda: cls._from_tokenizer_json(path))
        if path.name == "vocab.json":
            merges, config = path.with_name("merges.txt"), path.with_name("tokenizer_config.json")
            return _load_once(cls, [path, merges, config], lambda: cls._from_vocab_merges(path, merges))
        return _load_once(cls, [path, path.with_name("special_tokens.json")], lambda: cls._from_tiktoken(path))

    @classmethod
    def _from_tiktoken(cls, path: Path) -> Tokenizer:
        ranks: dict[bytes, int] = {}
        seen: set[int] = set()
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    token, rank = base64.b64decode(token, validate=True), int(rank)
                except ValueError:
                    raise TokenizerError(
                        f"{path}:{lineno} is not 'base64(token) rank'; is this a tiktoken vocabulary?"
                    ) from None
                # tiktoken panics on repeated tokens or ranks, with a PanicException that `except Exception` misses.
                if token in ranks or rank in seen:
                    what = f"token {token!r}" if token in ranks else f"rank {rank}"
                    raise TokenizerError(f"{path}:{lineno} repeats {what}; each token and rank must appear once.")
                ranks[token] = rank
                seen.add(rank)
        missing = sum(bytes([b]) not in ranks for b in range(256))
        if missing:
            # Without every single byte, tiktoken panics on the first text that needs a missing one.
            raise TokenizerError(
                f"{path} lacks {missing} of the 256 single-byte tokens that byte-level BPE needs; is it empty or truncated?"
            )
        specials = None
        sidecar = path.with_name("special_tokens.json")
        if sidecar.is_file():
            specials = json.loads(sidecar.read_text())
        return cls(ranks, specials)

    @classmethod
    def _from_tokenizer_json(cls, path: Path) -> Tokenizer:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            model = data["model"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json file.") from None
        if model.get("type") != "BPE":
            raise TokenizerError(f"{path} holds a {model.get('type')} model; qianwen reads byte-level BPE only.")
        merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        pattern = _find_split_pattern(data.get("pre_tokenizer")) or PATTERN
        return cls(_ranks_from_bpe(model["vocab"], merges, str(path)), specials or None, pattern)

    @classmethod
    def _from_vocab_merges(cls, vocab_path: Path, merges_path: Path) -> Tokenizer:
        if not merges_path.is_file():
            raise TokenizerError(f"{vocab_path} needs {merges_path.name} beside it.")
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        merges = [
            line.split(" ")
            for line in merges_path.read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#version")
        ]
        specials = {}
        config = vocab_path.with_name("tokenizer_config.json")
        if config.is_file():
            decoder = json.loads(config.read_text()).get("added_tokens_decoder", {})
            specials = {v["content"]: int(k) for k, v in decoder.items()}
        return cls(_ranks_from_bpe(vocab, merges, str(vocab_path)), specials or None)

    # -- properties -------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids (BPE ranks + special tokens)."""
        return self._max_id + 1

    @property
    def eod_id(self) -> int:
        return self.special_tokens[ENDOFTEXT]

    @property
    def pad_id(self) -> int:
        return self.eod_id

    @property
    def im_start_id(self) -> int:
        return self.special_tokens[IM_START]

    @property
    def im_end_id(self) -> int:
        return self.special_tokens[IM_END]

    @property
    def chat_stop_ids(self) -> list[int]:
        """Ids that end a ChatML reply."""
        return [i for i in (self.special_tokens.get(IM_END), self.special_tokens.get(IM_START)) if i is not None]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    # -- encoding ---------------------------------------------------------------

    def encode(self, text: str, allowed_special: Iterable[str] | str = ()) -> list[int]:
        """NFC-normalise and encode. Special-token text is plain text unless it
        is in `allowed_special` (a set of token strings, or "all")."""
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        allowed = self._allowed(allowed_special)
        try:
            return self._enc.encode(text, allowed_special=allowed, disallowed_special=())
        except ValueError:
            # tiktoken's regex engine gives up on ~1M-character whitespace runs;
            # the `regex` module splits the same pieces without a backtrack limit.
            return self._encode_slow(text, allowed)

    def encode_batch(
        self, texts: Sequence[str], allowed_special: Iterable[str] | str = (), num_threads: int = 8
    ) -> list[list[int]]:
        allowed = self._allowed(allowed_special)
        # The NFC check runs in the workers, not up front: it holds the GIL but tiktoken's encode
        # releases it, so one thread's check overlaps another's encoding (serially it cost ~10%).
        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(partial(self.encode, allowed_special=allowed), texts))

    def _allowed(self, allowed_special) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not special tokens of this tokenizer.")
        return allowed

    def _encode_slow(self, text: str, allowed: set[str]) -> list[int]:
        if self._regex is None:
            self._regex = regex.compile(self.pattern)
        segments = [text]
        if allowed:
            specials = "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True))
            segments = re.split(f"({specials})", text)
        ids: list[int] = []
        for i, segment in enumerate(segments):
            if i % 2:
                ids.append(self.special_tokens[segment])
                continue
            for piece in self._regex.findall(segment):
                data = piece.encode("utf-8")
                rank = self.ranks.get(data)
                ids.extend([rank] if rank is not None else self._enc._encode_single_piece(data))
        return ids

    # -- decoding ---------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text for ids; invalid UTF-8 becomes U+FFFD and never raises."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        if self._known_ids and all(0 <= i <= self._max_id for i in ids):
            return self._enc.decode_bytes(ids)
        return b"".join(self.token_bytes(i) for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one id; ids with no token (embedding padding) give U+FFFD."""
        try:
            return self._enc.decode_single_token_bytes(token_id)
        except (KeyError, ValueError, OverflowError):
            return "\ufffd".encode()

    def stream(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    # -- chat -------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        max_tokens: int | None = None,
        default_system: str = DEFAULT_SYSTEM,
    ) -> list[int]:
        """ChatML ids for OpenAI-style messages. Message text is encoded with no
        special tokens allowed. With `max_tokens`, the oldest exchanges (a turn
        and the assistant replies to it) after the system prompt are dropped
        until the prompt fits; the system prompt and the last message are kept."""
        turns = self.chat_turns(messages, default_system)
        nl = self.encode("\n")
        blocks = [self._turn_ids(role, content, nl) for role, content in turns]
        tail = [self.im_start_id, *self.encode("assistant"), *nl] if add_generation_prompt else []
        if max_tokens is not None:
            # Each block after the first costs its ids plus the "\n" joining it.
            cost = [len(b) + len(nl) for b in blocks]
            total = sum(cost) - len(nl) + (len(nl) + len(tail) if tail else 0)
            keep_from = 1
            while total > max_tokens:
                # Drop a whole exchange (a turn and the assistant replies to it), never a question
                # without its answer, and never the exchange that holds the last message.
                end = keep_from + 1
                while end < len(turns) and turns[end][0] == "assistant":
                    end += 1
                if end >= len(turns):
                    break
                total -= sum(cost[keep_from:end])
                keep_from = end
            blocks = blocks[:1] + blocks[keep_from:]
        ids: list[int] = []
        for i, block in enumerate(blocks):
            if i:
                ids.extend(nl)
            ids.extend(block)
        if tail:
            ids.extend(nl + tail)
        return ids

    def chat_text(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The ChatML text `render_chat` encodes (for display and templates)."""
        return self.decode(self.render_chat(messages, add_generation_prompt))

    def chat_turns(self, messages: Sequence[dict], default_system: str = DEFAULT_SYSTEM) -> list[tuple[str, str]]:
        """(role, content) of OpenAI-style messages, checked, with the default system prompt first if none."""
        turns = [self._turn(i, m) for i, m in enumerate(messages)]
        if not turns or turns[0][0] != "system":
            turns.insert(0, ("system", default_system))
        return turns

    def _turn_ids(self, role: str, content: str, nl: list[int]) -> list[int]:
        return [self.im_start_id, *self.encode(role), *nl, *self.encode(content), self.im_end_id]

    @staticmethod
    def _turn(index: int, message: dict) -> tuple[str, str]:
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {index} must be an object with a 'role' and 'content'.")
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"message {index} has role {role!r}; use one of {', '.join(ROLES)}.")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # OpenAI content parts
            try:
                content = "".join(part["text"] for part in content if part.get("type") == "text")
            except (TypeError, KeyError, AttributeError):
                raise ValueError(f"message {index} has content parts without 'text'.") from None
        elif not isinstance(content, str):
            raise ValueError(f"message {index} content must be a string, got {type(content).__name__}.")
        return role, content

    # -- saving -----------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike, model_max_length: int = 32768) -> None:
        """Write `qwen.tiktoken` plus Hugging Face files (tokenizer.json,
        vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)."""
        from qianwen.hf_tokenizer import hf_files, write_hf_config
        from qianwen.util import atomic_write

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Made once per tokenizer, which never changes: a training run writes the same files with every
        # checkpoint, and making them takes 3 s at Qwen's 151,851 tokens.
        if self._files is None:
            lines = sorted(self.ranks.items(), key=lambda kv: kv[1])
            vocab = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in lines)
            self._files = {VOCAB_FILE: vocab, **hf_files(self)}
        for name, text in self._files.items():
            atomic_write(out / name, text)
        standard = {name: len(self.ranks) + i for i, name in enumerate(SPECIAL_NAMES)}
        sidecar = out / "special_tokens.json"
        if self.special_tokens != standard:
            atomic_write(sidecar, json.dumps(self.special_tokens, indent=1))
        elif sidecar.exists():
            sidecar.unlink()  # a leftover would override the standard ids on the next load
        write_hf_config(self, out, model_max_length)


class StreamDecoder:
    """Turns ids into text as they arrive, holding back bytes of a character
    split across tokens so a stream never shows a broken character."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self._pending = b""

    def push(self, token_id: int) -> str:
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        data = self._pending + self.tokenizer.token_bytes(token_id)
        cut = _complete_utf8_prefix(data)
        self._pending = data[cut:]
        return data[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        data, self._pending = self._pending, b""
        return data.decode("utf-8", errors="replace")


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of `data` without a trailing incomplete UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII)
            need = (
                1
                if byte < 0x80
                else 2
                if byte >> 5 == 0b110
                else 3
                if byte >> 4 == 0b1110
                else 4
                if byte >> 3 == 0b11110
                else 1
            )
            return len(data) - back if need > back else len(data)
    return len(data)


def _ranks_from_bpe(vocab: dict[str, int], merges: list[list[str]], where: str) -> dict[bytes, int]:
    """tiktoken ranks from a byte-level BPE vocabulary. tiktoken merges the pair
    whose result has the lowest rank, so ids can serve as ranks only if every
    merge produces a token ranked after both parts and merges come in rank order."""
    ranks = {_from_unicode(token, where): int(i) for token, i in vocab.items()}
    last = -1
    for pair in merges:
        if len(pair) != 2:
            raise TokenizerError(f"{where}: merge {pair!r} is not a pair of tokens.")
        left, right = pair
        merged = vocab.get(left + right)
        if merged is None or merged < vocab.get(left, merged) or merged < vocab.get(right, merged) or merged < last:
            raise TokenizerError(
                f"{where}: merge {left!r} + {right!r} is out of rank order, so this vocabulary cannot run on tiktoken."
            )
        last = merged
    return ranks


def _find_split_pattern(pre_tokenizer: dict | None) -> str | None:
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "Split":
        return pre_tokenizer.get("pattern", {}).get("Regex")
    for child in pre_tokenizer.get("pretokenizers", []) or []:
        found = _find_split_pattern(child)
        if found:
            return found
    return None
