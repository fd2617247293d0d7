"""The `qianwen` command line: each command against the library (and transformers) as reference, and every
user error as one `error:` line with exit status 2, in process and as a real subprocess. `qianwen run` has its
own file, test_run.py."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import qianwen
from qianwen.cli import main
from qianwen.config import ModelConfig
from qianwen.tokenizer import DEFAULT_SYSTEM, Tokenizer, qwen_vocabulary

# The real Qwen ids (151,851) so text prompts work; tiny everywhere else so saving stays fast.
CONFIG = ModelConfig(
    vocab_size=151851,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    seq_length=512,
    max_position_embeddings=1024,
)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(qwen_vocabulary())


@pytest.fixture(scope="module")
def model() -> qianwen.Transformer:
    m = qianwen.Transformer(CONFIG)
    m.init_weights(0)
    return m.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, tokenizer):
    out = tmp_path_factory.mktemp("checkpoint")
    qianwen.save(model, tokenizer, out)
    return out


def run_cli(*args: str, env: dict | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qianwen.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def assert_one_error_line(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------
# User errors


def _missing(tmp_path, checkpoint):
    return ["generate", "--model", str(tmp_path / "no-such-dir"), "--prompt", "hi"]


def _not_a_checkpoint(tmp_path, checkpoint):
    (tmp_path / "notes.txt").write_text("not a model")
    return ["generate", "--model", str(tmp_path), "--prompt", "hi"]


def _unknown_config_key(tmp_path, checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "flux_capacitor": 1.21}))
    return ["chat", "--model", str(tmp_path)]


def _bad_dtype(tmp_path, checkpoint):
    return ["generate", "--model", str(checkpoint), "--dtype", "fp64", "--prompt", "hi"]


def _reward_model(tmp_path, checkpoint):
    for f in checkpoint.iterdir():  # the directory `qianwen rm` writes says so in config.json
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((checkpoint / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForSequenceClassification"]}))
    return ["generate", "--model", str(tmp_path), "--prompt", "hi"]


def _bad_port(tmp_path, checkpoint):
    return ["serve", "--model", str(checkpoint), "--port", "99999"]  # asyncio's bind raised OverflowError


USER_ERRORS = [_missing, _not_a_checkpoint, _unknown_config_key, _bad_dtype, _reward_model, _bad_port]


@pytest.mark.parametrize("case", USER_ERRORS, ids=lambda f: f.__name__.strip("_"))
def test_user_errors_in_process(case, tmp_path, checkpoint, capsys):
    assert main(case(tmp_path, checkpoint)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_error_line(err)


@pytest.mark.parametrize("case", USER_ERRORS, ids=lambda f: f.__name__.strip("_"))
def test_user_errors_as_subprocess(case, tmp_path, checkpoint):
    result = run_cli(*case(tmp_path, checkpoint))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert_one_error_line(result.stderr)


def test_error_messages_name_the_problem(tmp_path, checkpoint, capsys):
    for case, words in [
        (_missing, "does not exist"),
        (_not_a_checkpoint, "config.json"),
        (_unknown_config_key, "flux_capacitor"),
        (_bad_dtype, "--dtype"),
        (_reward_model, "is a reward model (Qwen2ForSequenceClassification)"),
        (_bad_port, "--port: must be a TCP port from 1 to 65535, got 99999"),
    ]:
        main(case(tmp_path, checkpoint))
        assert words in capsys.readouterr().err


def test_serve_refuses_an_address_in_use_before_loading(checkpoint, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use); give another --port" in err


def test_bad_sampling_option_fails_before_loading(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--top-p", "1.5", "--prompt", "x"]) == 2
    assert "top_p" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# generate


def test_generate_prints_what_the_library_generates(checkpoint, model, tokenizer, capsys):
    expected = qianwen.generate(model, tokenizer, PROMPT, 12)
    assert main(["generate", "--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "12"]) == 0
    streamed = capsys.readouterr().out
    assert (
        main(["generate", "--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "12", "--no-stream"]) == 0
    )
    assert streamed == capsys.readouterr().out == expected.text + "\n"
    assert expected.text


def test_generate_reads_the_prompt_from_stdin(checkpoint, model, tokenizer, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    assert main(["generate", "--model", str(checkpoint), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == qianwen.generate(model, tokenizer, PROMPT, 8).text + "\n"


def test_generate_honours_stop_strings(checkpoint, model, tokenizer, capsys):
    full = qianwen.generate(model, tokenizer, PROMPT, 12).text
    stop = full[len(full) // 2 :][:2]
    expected = qianwen.generate(model, tokenizer, PROMPT, 12, stop=[stop]).text
    assert (
        main(["generate", "--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "12", "--stop", stop])
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"
    assert stop not in expected


def test_generate_chat_wraps_the_prompt_as_a_chatml_user_turn(checkpoint, model, tokenizer, capsys):
    chat_ids = tokenizer.render_chat([{"role": "user", "content": "Hello!"}])
    assert tokenizer.decode(chat_ids).endswith("<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")
    expected = qianwen.generate(model, tokenizer, chat_ids, 10, stop_ids=tokenizer.chat_stop_ids + [tokenizer.eod_id])
    assert main(["generate", "--model", str(checkpoint), "--prompt", "Hello!", "--chat", "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert out == expected.text + "\n"
    assert out != qianwen.generate(model, tokenizer, "Hello!", 10).text + "\n"


def test_generate_sampling_is_reproducible_with_a_seed(checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "8"]
    sampled = [*args, "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--seed", "3"]
    assert main(sampled) == 0
    first = capsys.readouterr().out
    assert main(sampled) == 0
    assert capsys.readouterr().out == first


# ---------------------------------------------------------------------------
# chat


def replies_for(model, tokenizer, conversation: list[tuple[str, str]], max_new_tokens: int):
    """What chat should print and the prompt sizes it should report, computed with the library.
    `conversation` is (system prompt, message) with None as the system after a reset marker."""
    history, replies, sizes = [], [], []
    for system, message in conversation:
        if message is None:
            history = []
            continue
        messages = [{"role": "system", "content": system}, *history, {"role": "user", "content": message}]
        ids = tokenizer.render_chat(messages)
        reply = qianwen.generate(model, tokenizer, ids, max_new_tokens).text
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
        replies.append(reply)
        sizes.append(len(ids))
    return replies, sizes


def test_chat_keeps_history_and_obeys_commands(checkpoint, model, tokenizer, capsys, monkeypatch):
    lines = ["hello", "and again", "/reset", "hello", "/system Be brief.", "hello", "/quit", "never sent"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    conversation = [
        (DEFAULT_SYSTEM, "hello"),
        (DEFAULT_SYSTEM, "and again"),
        (DEFAULT_SYSTEM, None),
        (DEFAULT_SYSTEM, "hello"),
        ("Be brief.", None),
        ("Be brief.", "hello"),
    ]
    replies, sizes = replies_for(model, tokenizer, conversation, 6)
    assert out == "".join(r + "\n" for r in replies)
    reported = [int(n) for n in re.findall(r"\[(\d+) prompt tokens", err)]
    assert reported == sizes
    assert sizes[1] > sizes[0] == sizes[2] != sizes[3]  # history grows; /reset and /system clear it
    assert "error" not in err


def test_chat_drops_a_message_too_long_and_goes_on(checkpoint, model, tokenizer, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 1100 + "\nhello\n"))
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    (expected,), (size,) = replies_for(model, tokenizer, [(DEFAULT_SYSTEM, "hello")], 6)
    assert out == expected + "\n"
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[0]]
    assert f"[{size} prompt tokens; 1 turn(s) in history]" in err


def test_chat_trims_old_turns_to_fit_the_window(checkpoint, capsys, monkeypatch):
    # Three ~300-token messages with 500 new tokens allowed: the window (1024) holds only the latest.
    message = "word " * 300
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{message}\n{message}\n{message}\n"))
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "500", "--stop", "\n", " "]) == 0
    reported = [int(n) for n in re.findall(r"\[(\d+) prompt tokens", capsys.readouterr().err)]
    assert len(reported) == 3
    assert all(n <= 1024 - 500 for n in reported)


def test_chat_refuses_max_new_tokens_that_fill_the_window(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["chat", "--model", str(checkpoint)]) == 0  # the default 512 of 1024 leaves room
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "1024"]) == 2
    assert_one_error_line(capsys.readouterr().err)


def test_chat_through_a_pipe(checkpoint, model, tokenizer):
    result = run_cli("chat", "--model", str(checkpoint), "--max-new-tokens", "4", stdin="hello\n/quit\n")
    assert result.returncode == 0, result.stderr
    (expected,), _ = replies_for(model, tokenizer, [(DEFAULT_SYSTEM, "hello")], 4)
    assert result.stdout == expected + "\n"


# ---------------------------------------------------------------------------
# convert


def write_qwen_v1(model: qianwen.Transformer, out) -> None:
    """A Qwen v1 checkpoint of `model`, named as QWEN_SPEC.md section 1 lists (w2 is the gate)."""
    sd, cfg = model.state_dict(), model.config
    tensors = {
        "transformer.wte.weight": sd["embed.weight"],
        "transformer.ln_f.weight": sd["norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_layers):
        ours, v1 = f"layers.{i}.", f"transformer.h.{i}."
        gate, up = sd[ours + "mlp.gate_up.weight"].chunk(2)
        tensors |= {
            v1 + "ln_1.weight": sd[ours + "attn_norm.weight"],
            v1 + "ln_2.weight": sd[ours + "mlp_norm.weight"],
            v1 + "attn.c_attn.weight": sd[ours + "attn.qkv.weight"],
            v1 + "attn.c_attn.bias": sd[ours + "attn.qkv.bias"],
            v1 + "attn.c_proj.weight": sd[ours + "attn.proj.weight"],
            v1 + "mlp.w1.weight": up,
            v1 + "mlp.w2.weight": gate,
            v1 + "mlp.c_proj.weight": sd[ours + "mlp.down.weight"],
        }
    out.mkdir()
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, out / "model.safetensors")
    config = {
        "model_type": "qwen",
        "architectures": ["QWenLMHeadModel"],
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": 2 * cfg.intermediate_size,
        "kv_channels": cfg.head_dim,
        "layer_norm_epsilon": cfg.rms_norm_eps,
        "rotary_emb_base": cfg.rope_base,
        "rotary_pct": 1.0,
        "seq_length": cfg.seq_length,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": False,
        "no_bias": True,
        "bf16": False,
    }
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(qwen_vocabulary(), out / "qwen.tiktoken")


def test_convert_qwen_v1_to_a_directory_transformers_loads(tmp_path, model, tokenizer, capsys):
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    write_qwen_v1(model, tmp_path / "v1")
    assert main(["convert", str(tmp_path / "v1"), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "config.json" in out and "tokenizer.json" in out

    hf = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("千问 converts Qwen v1 checkpoints.")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    text = "def f(x):\n    return x ** 2  # 千问"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == tokenizer.encode(text)


def test_convert_can_change_dtype_and_refuses_to_overwrite(tmp_path, checkpoint, capsys):
    assert main(["convert", str(checkpoint), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert qianwen.load(tmp_path / "bf16")[0].embed.weight.dtype == torch.bfloat16
    capsys.readouterr()
    assert main(["convert", str(checkpoint), str(tmp_path / "bf16")]) == 2
    assert_one_error_line(capsys.readouterr().err)
    assert main(["convert", str(checkpoint), str(checkpoint), "--force"]) == 2
    assert "source" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# download


def test_download_offline_ends_with_one_sentence(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = run_cli("download", "Qwen/Qwen-1_8B", str(tmp_path / "qwen"), env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_error_line(result.stderr)
    assert "Qwen/Qwen-1_8B" in result.stderr and "network" in result.stderr and "by hand" in result.stderr
