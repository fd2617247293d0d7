"""Decoding: stop handling and streaming on a scripted model, and sampling
against small reference implementations."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import qianwen
from qianwen.config import ModelConfig
from qianwen.generate import Sampling, _penalise, filter_logits, sample, sample_rows, uniforms
from qianwen.model import Transformer
from qianwen.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    import dashscope

    return Tokenizer.from_file(os.path.join(os.path.dirname(dashscope.__file__), "resources", "qwen.tiktoken"))


class Scripted(Transformer):
    """Emits a fixed list of ids, one per decoding step, whatever the prompt."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__(ModelConfig(vocab_size=vocab, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8))
        self.script, self.step = script, 0

    def forward(self, input_ids, attention_mask=None, cache=None, last_only=False):
        if cache is None or cache.length == 0:  # a new prompt
            self.step = 0
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self._next(input_ids.shape[0])[:, None]

    def decode_step(self, tokens, cache, slot):
        return self._next(tokens.shape[0])

    def _next(self, batch: int) -> torch.Tensor:
        logits = torch.zeros(batch, self.config.vocab_size)
        logits[:, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return logits


def scripted(tok, text_pieces: list[str]) -> Scripted:
    ids = [i for piece in text_pieces for i in tok.encode(piece)]
    return Scripted(ids, tok.vocab_size)


def test_stop_string_split_across_tokens_is_caught(tok):
    pieces = ["Hello", " wor", "ld", " and", " ST", "OP", " hidden", " text"]
    model = scripted(tok, pieces)
    n = len(model.script)
    done = qianwen.generate(model, tok, [1, 2], n, stop="STOP")
    assert done.text == "Hello world and " and done.finish_reason == "stop"
    shown = list(qianwen.stream(model, tok, [1, 2], n, stop=["STOP", "never"]))
    assert "".join(shown) == "Hello world and "
    assert not any(piece.endswith(("S", "ST")) for piece in shown)  # no partial stop string ever shown


def test_held_back_text_is_released_when_no_stop_follows(tok):
    model = scripted(tok, ["a", " ST", "ORM", " b"])
    shown = list(qianwen.stream(model, tok, [1], len(model.script), stop=["STOP"]))
    assert "".join(shown) == "a STORM b"


def test_stop_ids_end_the_reply_and_are_not_returned(tok):
    model = scripted(tok, ["Sure", "!", "<|im_end|>", "junk"])
    model.script[2] = tok.im_end_id
    done = qianwen.generate(model, tok, [1], 10)
    assert done.text == "Sure!" and done.finish_reason == "stop"
    assert tok.im_end_id not in done.token_ids
    length = qianwen.generate(model, tok, [1], 2)
    assert length.finish_reason == "length" and length.text == "Sure!"


def test_streamed_multibyte_characters_are_never_broken(tok):
    model = Scripted([tok.ranks[bytes([b])] for b in "你好, 🤖!".encode()], tok.vocab_size)  # a byte per step
    shown = list(qianwen.stream(model, tok, [1], len(model.script)))
    assert "".join(shown) == "你好, 🤖!" and all("\ufffd" not in s for s in shown)


def test_prompt_plus_new_tokens_past_the_limit_is_a_clear_error(tok):
    model = Transformer(
        ModelConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2, max_position_embeddings=16)
    )
    with pytest.raises(ValueError, match=r"10 tokens and max_new_tokens is 7, 17 in all, past the model's limit of 16"):
        qianwen.generate(model, None, list(range(10)), 7)


def test_sampling_is_reproducible_with_a_seed():
    model = Transformer(ModelConfig(vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16))
    model.init_weights(0)
    model.eval()
    kwargs = dict(temperature=1.5, top_p=0.9, seed=123, stop_ids=[])
    a = qianwen.generate(model, None, [1, 2, 3], 20, **kwargs).token_ids
    assert a == qianwen.generate(model, None, [1, 2, 3], 20, **kwargs).token_ids
    assert a != qianwen.generate(model, None, [1, 2, 3], 20, **{**kwargs, "seed": 124}).token_ids


def _nucleus_reference(logits: np.ndarray, top_k: int, top_p: float) -> set[int]:
    order = np.argsort(-logits, kind="stable")
    keep = order[:top_k] if top_k else order
    probs = np.exp(logits[keep] - logits[keep].max())
    probs /= probs.sum()
    cumulative = np.cumsum(probs)
    cut = int(np.searchsorted(cumulative, top_p, side="left")) + 1
    return set(keep[:cut].tolist())


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (5, 1.0), (8, 0.7), (0, 0.999), (3, 0.1)])
def test_top_k_top_p_keep_exactly_the_reference_set(top_k, top_p):
    logits = np.random.default_rng(top_k).normal(size=(1, 40)).astype(np.float32) * 2
    kept = filter_logits(torch.from_numpy(logits), Sampling(temperature=0.7, top_k=top_k, top_p=top_p))
    assert set(torch.isfinite(kept[0]).nonzero().flatten().tolist()) == _nucleus_reference(
        logits[0] / 0.7, top_k, top_p
    )


def test_nucleus_from_sorted_values_equals_the_sort_and_scatter_reference():
    """numpy's sort of the values alone gives the same nucleus as sorting ids with torch and scattering back."""

    def by_torch_sort(logits: torch.Tensor, top_p: float) -> torch.Tensor:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        return logits.scatter(-1, order, ordered.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf")))

    gen = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 4.0, 12.0):
        logits = torch.randn(16, 4096, generator=gen) * scale
        for top_p in (0.1, 0.9, 0.999):
            assert torch.equal(
                filter_logits(logits, Sampling(temperature=1.0, top_p=top_p)), by_torch_sort(logits, top_p)
            )
    # A tie at the floor keeps every tied token (a sort would keep those it happened to rank first).
    tied = torch.tensor([[3.0, 1.0, 1.0, 1.0, -2.0]])
    kept = filter_logits(tied, Sampling(temperature=1.0, top_p=0.8))
    assert torch.isfinite(kept).tolist() == [[True, True, True, True, False]]


def test_samples_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    s = Sampling(temperature=1.0, top_k=3)
    gen = torch.Generator().manual_seed(0)
    counts = np.bincount([int(sample(logits, s, gen)) for _ in range(4000)], minlength=5) / 4000
    expected = np.exp([2.0, 1.0, 0.5]) / np.exp([2.0, 1.0, 0.5]).sum()
    assert counts[3:].sum() == 0 and np.allclose(counts[:3], expected, atol=0.03)


def test_rows_sampled_together_draw_what_each_draws_alone():
    """The serving engine samples all its requests in one pass, each row with its own temperature, top-p and
    seeded generator: every row's id is the one `sample` draws for that row alone, over many draws."""
    gen = torch.Generator().manual_seed(0)
    settings = [(t, p) for t in (0.3, 0.7, 1.0, 1.6) for p in (1.0, 0.95, 0.5, 0.05)]
    for scale in (0.5, 3.0, 12.0):
        logits = torch.randn(len(settings), 3000, generator=gen) * scale
        for draw in range(25):
            seeds = [1000 * draw + i for i in range(len(settings))]
            alone = [
                int(sample(row[None], Sampling(temperature=t, top_p=p), torch.Generator().manual_seed(seed))[0])
                for row, (t, p), seed in zip(logits, settings, seeds, strict=True)
            ]
            u = torch.cat([uniforms(1, torch.Generator().manual_seed(seed), logits.device) for seed in seeds])
            together = sample_rows(logits, torch.tensor(settings)[:, :1], torch.tensor(settings)[:, 1:], u)
            assert together.tolist() == alone


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(2, 50)
    ids = torch.tensor([[1, 5, 5, 9], [0, 2, 3, 49]])
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(_penalise(logits, seen, 1.3), expected)


def test_bad_sampling_settings_are_rejected():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            Sampling(**bad)
