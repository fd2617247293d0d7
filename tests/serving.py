"""A chat model small enough to train in seconds that has learned a few conversations by heart (one of them a
ReAct tool call), and a real uvicorn server around it on 127.0.0.1, for the serving tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import qianwen
from qianwen.agent.react import build_prompt
from qianwen.config import ModelConfig
from qianwen.model import Transformer
from qianwen.tokenizer import Tokenizer

MULTIPLY = {
    "type": "function",
    "function": {
        "name": "multiply",
        "description": "Multiply two integers exactly.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
TOOL_QUESTION = "What is 12345 times 6789?"
THOUGHT = "The numbers are large, so I will use the tool."
ARGUMENTS = {"a": 12345, "b": 6789}
PRODUCT = "83810205"
FINAL = "12345 times 6789 is 83810205."
HELLO, HELLO_REPLY = "Hello", "Hi there! How can I help you today?"
COUNT, COUNT_REPLY = "Count to five.", "one, two, three, four, five."

CONVERSATIONS = [
    [
        {"role": "user", "content": build_prompt(TOOL_QUESTION, [MULTIPLY])},
        {
            "role": "assistant",
            "content": f'Thought: {THOUGHT}\nAction: multiply\nAction Input: {{"a": 12345, "b": 6789}}\n'
            f"Observation: {PRODUCT}\nThought: I now know the final answer\nFinal Answer: {FINAL}",
        },
    ],
    [{"role": "user", "content": HELLO}, {"role": "assistant", "content": HELLO_REPLY}],
    [{"role": "user", "content": COUNT}, {"role": "assistant", "content": COUNT_REPLY}],
]


def small_tokenizer(full: Tokenizer, ranks: int = 3000) -> Tokenizer:
    """Qwen's first `ranks` merges (a valid BPE on its own) and its special tokens after them."""
    return Tokenizer({b: r for b, r in full.ranks.items() if r < ranks})


def train_memorizer(tok: Tokenizer, out: Path) -> Path:
    """Train until every conversation is reproduced greedily; save as a model directory."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
    )
    model = Transformer(config)
    model.init_weights(0)
    seqs = [tok.render_chat(c, add_generation_prompt=False) for c in CONVERSATIONS]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_id)
    labels = torch.full((len(seqs), width), -100)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s) - 1] = torch.tensor(s[1:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(400):
        loss = F.cross_entropy(model(ids).flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    model.eval()
    qianwen.save(model, tok, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir: Path, **options):
    """A uvicorn server in a thread serving `model_dir` as "tiny"; yields its base URL."""
    import uvicorn

    from qianwen.serve.app import create_app

    model, tok = qianwen.load(model_dir)
    app = create_app(model, tok, "tiny", **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
