"""`qianwen <command>`: one thin function per command; the work lives in the library and in the stage modules.

Every error a user can cause ends with one line, `error: <sentence>`, and exit status 2 (1 for a download
that could not reach the Hub or a `run` stage that failed its own check); never a stack trace.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

import qianwen
from qianwen.checkpoint import require_language_model
from qianwen.generate import Sampling
from qianwen.tokenizer import DEFAULT_SYSTEM, Tokenizer

DTYPES = {"auto": None, "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.tiktoken", "*.txt"]
CHAT_HELP = "commands: /reset clears the history, /system TEXT sets the system prompt (and resets), /quit ends."


class CommandError(Exception):
    """A command that cannot finish for a reason outside the program (the network, a failed check)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


class PromptTooLong(ValueError):
    """A chat message that does not fit the model's window even with no history."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse's default prints the whole usage block; one line is easier to read and to test.
        self.exit(2, f"error: {message}; see `{self.prog} --help`.\n")


# ---------------------------------------------------------------------------
# Shared options


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 1 to 65535, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--model", required=required, metavar="DIR", help="checkpoint directory (qianwen, HF Qwen2 or Qwen v1)"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps (default cpu)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weights dtype (default: as stored)")


def _add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="default 1 = off")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed for sampling")
    p.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR", help="stop strings")


def _sampling(args: argparse.Namespace) -> dict:
    """Options for qianwen.generate/stream, checked now so a bad value fails before any model work."""
    options = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    Sampling(**options)
    return {**options, "stop": args.stop or None}


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asks for a GPU but torch sees no CUDA device; use --device cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name} asks for Apple's GPU but MPS is not available; use --device cpu.")
    return device


def _load(args: argparse.Namespace):
    require_language_model(args.model)
    return qianwen.load(args.model, dtype=DTYPES[args.dtype], device=_device(args.device))


def _write_stream(deltas: Iterable[str], out=None) -> str:
    """Print text as it arrives; return all of it."""
    out = out or sys.stdout
    parts = []
    for delta in deltas:
        out.write(delta)
        out.flush()
        parts.append(delta)
    out.write("\n")
    out.flush()
    return "".join(parts)


def _read_stdin_prompt() -> str:
    if sys.stdin.isatty():
        print("reading the prompt from stdin; end it with Ctrl-D.", file=sys.stderr)
    text = sys.stdin.read()
    # `echo text | qianwen generate` adds a newline the user did not mean as part of the prompt.
    return text.removesuffix("\n").removesuffix("\r")


# ---------------------------------------------------------------------------
# generate


def cmd_generate(args: argparse.Namespace) -> int:
    options = _sampling(args)
    model, tok = _load(args)
    prompt = args.prompt if args.prompt is not None else _read_stdin_prompt()
    ids = tok.render_chat([{"role": "user", "content": prompt}]) if args.chat else tok.encode(prompt)
    # The default stop ids are the chat stops (<|im_end|>, <|im_start|>) plus <|endoftext|>, right for both modes.
    if args.no_stream:
        print(qianwen.generate(model, tok, ids, args.max_new_tokens, **options).text)
    else:
        _write_stream(qianwen.stream(model, tok, ids, args.max_new_tokens, **options))
    return 0


# ---------------------------------------------------------------------------
# chat


class LocalChat:
    """Replies from a model loaded in this process. A later `--url` backend (a qianwen server) only has
    to offer the same `reply(messages)` and `prompt_tokens` to plug into `chat_loop`."""

    def __init__(self, model, tokenizer, max_new_tokens: int, options: dict):
        window = model.config.max_position_embeddings
        if max_new_tokens >= window:
            raise ValueError(
                f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in this model's "
                f"{window}-token window; lower it."
            )
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.max_new_tokens, self.budget = max_new_tokens, window - max_new_tokens
        self.prompt_tokens = 0

    def reply(self, messages: list[dict]) -> Iterator[str]:
        ids = self.tokenizer.render_chat(messages, max_tokens=self.budget)
        if len(ids) > self.budget:
            raise PromptTooLong(
                f"that message makes a {len(ids)}-token prompt even without history, but only {self.budget} "
                f"tokens fit beside --max-new-tokens {self.max_new_tokens}; send something shorter."
            )
        self.prompt_tokens = len(ids)
        return qianwen.stream(self.model, self.tokenizer, ids, self.max_new_tokens, **self.options)


def chat_loop(backend, system: str, read_line: Callable[[], str | None], out=None, err=None) -> None:
    """Read messages and commands until /quit or end of input, streaming each reply to `out`."""
    out, err = out or sys.stdout, err or sys.stderr
    history: list[dict] = []
    while (line := read_line()) is not None:
        line = line.strip()
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command == "/quit":
                return
            system, reset = _chat_command(command, rest.strip(), system, err)
            if reset:
                history.clear()
        elif line:
            reply = _chat_turn(backend, [{"role": "system", "content": system}, *history], line, out, err)
            if reply is not None:
                history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
                print(f"[{backend.prompt_tokens} prompt tokens; {len(history) // 2} turn(s) in history]", file=err)


def _chat_command(command: str, rest: str, system: str, err) -> tuple[str, bool]:
    """The system prompt after a /command, and whether the history is to be cleared."""
    if command == "/reset":
        print("[history cleared]", file=err)
        return system, True
    if command == "/system" and rest:
        print(f"[system prompt set to {rest!r}; history cleared]", file=err)
        return rest, True
    if command == "/system":
        print(f"[the system prompt is {system!r}; /system TEXT changes it]", file=err)
    else:
        print(f"[unknown command {command}; {CHAT_HELP}]", file=err)
    return system, False


def _chat_turn(backend, messages: list[dict], line: str, out, err) -> str | None:
    """The reply to one message, or None (nothing kept) when the message does not fit or the server refuses it."""
    from qianwen.serve.client import Refused

    try:
        deltas = backend.reply([*messages, {"role": "user", "content": line}])
        return _write_stream(deltas, out)
    except (PromptTooLong, Refused) as exc:
        print(f"error: {exc}", file=err)
        return None
    except KeyboardInterrupt:
        # Ctrl-C stops this reply only; the chat goes on and the reply is not kept.
        print("\n[reply interrupted]", file=err)
        return None


def _read_line_from_stdin() -> Callable[[], str | None]:
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())

    def read_line() -> str | None:
        try:
            return input("> " if interactive else "")
        except EOFError:
            return None

    return read_line


def cmd_chat(args: argparse.Namespace) -> int:
    options = _sampling(args)
    if (args.model is None) == (args.url is None):
        raise ValueError("give --model DIR (a local model) or --url http://HOST:PORT (a running server), not both.")
    if args.url is not None:
        from qianwen.serve.client import RemoteChat

        backend = RemoteChat(args.url, args.api_key or os.environ.get("QIANWEN_API_KEY"), args.max_new_tokens, options)
    else:
        model, tok = _load(args)
        backend = LocalChat(model, tok, args.max_new_tokens, options)
    if sys.stdin.isatty():
        print(f"chatting with {args.model or args.url}; {CHAT_HELP}", file=sys.stderr)
    try:
        chat_loop(backend, args.system, _read_line_from_stdin())
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------
# serve


def _check_listen(host: str, port: int) -> None:
    """Fail before the model loads if the address cannot be listened on (uvicorn says so only afterwards)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ValueError(
            f"cannot listen on {host}:{port} ({reason}); give another --port, or a --host of this machine."
        ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from qianwen.serve.app import create_app

    _check_listen(args.host, args.port)
    name = args.served_name or Path(args.model).resolve().name
    api_key = args.api_key or os.environ.get("QIANWEN_API_KEY")
    prefix_bytes = None if args.prefix_cache_mb is None else int(args.prefix_cache_mb * 2**20)
    sizes = (args.max_batch, args.max_queue, args.max_model_len, prefix_bytes)
    if args.engine == "process":
        from qianwen.engine_process import EngineProcess, ModelSource

        require_language_model(args.model)
        tok = Tokenizer.from_file(args.model)
        source = ModelSource(args.model, DTYPES[args.dtype], _device(args.device))
        app = create_app(None, tok, name, api_key, engine=EngineProcess(source, *sizes))
    else:
        model, tok = _load(args)
        # The decoding thread and the event loop hand the GIL to each other once per token; Python's default 5 ms
        # switch interval would add up to that much to every streamed token.
        sys.setswitchinterval(0.0002)
        app = create_app(model, tok, name, api_key, *sizes)
    where = f"http://{args.host}:{args.port}"
    engine = app.state.engine
    print(
        f"serving {name!r} at {where}: chat page {where}/, OpenAI API {where}/v1; {engine.max_batch} rows of "
        f"{engine.max_len} tokens in the KV cache ({engine.cache_bytes / 2**30:.2f} GiB), "
        + (f"{engine.prefix_budget / 2**20:.0f} MiB of prefix cache" if engine.prefix_budget else "no prefix cache")
        + f", decoding in {'a process' if args.engine == 'process' else 'a thread'} of its own",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


# ---------------------------------------------------------------------------
# agent


def cmd_agent(args: argparse.Namespace) -> int:
    from qianwen.agent import run
    from qianwen.agent.tools import resolve

    if not args.question.strip():
        raise ValueError("the question is empty; give it as the last argument, in quotes.")
    tools = resolve([name.strip() for name in args.tools.split(",") if name.strip()])
    model, tok = _load(args)
    print(f"Question: {args.question}", flush=True)
    result = run(
        model,
        tok,
        args.question,
        tools=tools,
        max_steps=args.max_steps,
        max_new_tokens=args.max_new_tokens,
        on_event=lambda label, text: print(f"{label}: {text}", flush=True),
    )
    if result.finish_reason == "max_steps":
        print(f"[no answer within --max-steps {args.max_steps}]", file=sys.stderr)
    elif result.finish_reason == "length":
        print("[no answer: the model ran out of tokens (--max-new-tokens or its window)]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------
# tokenizer train


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from qianwen.bpe import train

    train(args.input, args.vocab_size, args.out, max_bytes=args.max_bytes, force=args.force)
    return 0


# ---------------------------------------------------------------------------
# data prep


def cmd_data_prep(args: argparse.Namespace) -> int:
    from time import perf_counter

    from qianwen.data.config import load_config
    from qianwen.data.prep import prep, summary

    # `--input a b key=value` puts the override among the paths; an item shaped KEY=VALUE that is no file is one.
    overrides = [i for i in args.input if _is_override(i) and not os.path.exists(i)]
    inputs = [i for i in args.input if i not in overrides]
    config = load_config(args.config, overrides + args.overrides)
    start = perf_counter()
    stats = prep(inputs, args.tokenizer, args.out, config, workers=args.workers)
    print(summary(stats, args.out, perf_counter() - start))
    return 0


def _is_override(item: str) -> bool:
    key, sep, _ = item.partition("=")
    return bool(sep) and key.replace(".", "_").isidentifier()


# ---------------------------------------------------------------------------
# data synthetic


def cmd_data_synthetic(args: argparse.Namespace) -> int:
    from time import perf_counter

    from qianwen.data.synthetic import SandboxError, make_all, summary

    # Options left out are absent (argparse.SUPPRESS), so make_all's defaults are the only ones.
    names = ("seed", "sft", "pairs", "pmp", "ppo", "eval_size", "flip", "corpus", "facts", "max_number", "tool_digits")
    given = {k: v for k, v in vars(args).items() if k in names}
    start = perf_counter()
    try:
        manifest = make_all(args.out, **given)
    except SandboxError as exc:
        raise CommandError(str(exc)) from None
    print(summary(manifest, args.out, perf_counter() - start))
    return 0


# ---------------------------------------------------------------------------
# convert, download, run


def cmd_convert(args: argparse.Namespace) -> int:
    src, out = Path(args.src_dir), Path(args.out_dir)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ValueError(f"OUT_DIR {out} is the source directory; give a new directory for the converted copy.")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ValueError(f"{out} is not empty; give a new directory, or --force to overwrite the files in it.")
    model, tok = qianwen.load(src, dtype=DTYPES[args.dtype])
    qianwen.save(model, tok, out, metadata={"converted_from": str(src)})
    written = sorted(p for p in out.iterdir() if p.is_file())
    print(f"wrote a Hugging Face Qwen2 checkpoint ({model.embed.weight.dtype}, {_count(model)} parameters) to {out}:")
    for path in written:
        print(f"  {path.name:28s} {path.stat().st_size / 1e6:10.2f} MB")
    return 0


def _count(model) -> str:
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def cmd_download(args: argparse.Namespace) -> int:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id=args.repo_id,
            revision=args.revision,
            local_dir=args.out_dir,
            allow_patterns=DOWNLOAD_PATTERNS,
            ignore_patterns=["*.py"],  # qianwen never runs a repository's remote code
        )
    except Exception as exc:
        raise CommandError(_download_failure(args, exc)) from None
    files = sorted(p.name for p in Path(path).iterdir() if p.is_file())
    print(f"downloaded {len(files)} file(s) of {args.repo_id} to {path}: {', '.join(files)}")
    print(f"try it: qianwen chat --model {path}")
    return 0


def _download_failure(args: argparse.Namespace, exc: Exception) -> str:
    """One sentence saying what failed and what to do about it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"could not download {args.repo_id}"
    by_hand = f"check the network, or copy the checkpoint directory to {args.out_dir} by hand"
    if isinstance(exc, GatedRepoError):
        return f"{what}: the repository is gated; accept its licence on huggingface.co and log in (`hf auth login`)."
    if isinstance(exc, RepositoryNotFoundError):
        return f"{what}: no such repository on the Hub (or it is private); check the name, e.g. Qwen/Qwen-1_8B."
    if isinstance(exc, RevisionNotFoundError):
        return f"{what}: the repository has no revision {args.revision!r}; check --revision."
    if constants.HF_HUB_OFFLINE:
        return f"{what}: HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it and {by_hand}."
    if isinstance(exc, LocalEntryNotFoundError | HfHubHTTPError | OSError):
        return f"{what}: the Hugging Face Hub is unreachable ({_root_cause(exc)}); {by_hand}."
    raise exc


def _root_cause(exc: BaseException) -> str:
    """The innermost error of a chain (the socket error under the Hub's wrapper), short enough for one line."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    text = " ".join(str(exc).split())
    return text if len(text) <= 120 else text[:117].rsplit(" ", 1)[0] + "..."


def cmd_run(args: argparse.Namespace) -> int:
    from qianwen.run import RunError, run
    from qianwen.train.loop import TrainingError

    try:
        run(args.out, recipe=args.recipe, overrides=args.overrides, seed=args.seed, start=args.start, only=args.only)
    except (RunError, TrainingError) as exc:
        raise CommandError(str(exc)) from None
    return 0


def _train(run: Callable[[], object]) -> int:
    """A training stage: a diverged run is exit status 1 with its message (bad settings are ValueErrors, 2)."""
    from qianwen.train.loop import TrainingError

    try:
        run()
    except TrainingError as exc:
        raise CommandError(str(exc)) from None
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from qianwen.train.pretrain import load_config, pretrain

    config, model_section = load_config(args.recipe, args.overrides)
    return _train(lambda: pretrain(config, model_section, resume=args.resume))


def cmd_sft(args: argparse.Namespace) -> int:
    from qianwen.train.sft import load_config, sft

    config = load_config(args.recipe, args.overrides)
    return _train(lambda: sft(config, resume=args.resume))


def cmd_rm(args: argparse.Namespace) -> int:
    from qianwen.train.reward import load_config, reward_model

    config = load_config(args.recipe, args.overrides)
    return _train(lambda: reward_model(config, resume=args.resume))


def cmd_ppo(args: argparse.Namespace) -> int:
    from qianwen.train.ppo import load_config, ppo

    config = load_config(args.recipe, args.overrides)
    return _train(lambda: ppo(config, resume=args.resume))


# ---------------------------------------------------------------------------
# eval


def cmd_eval(args: argparse.Namespace) -> int:
    if args.harness == "lm-eval":
        try:
            from qianwen.eval.lm_eval_adapter import run_harness
        except ModuleNotFoundError as exc:
            if exc.name == "qianwen.eval.lm_eval_adapter":
                raise ValueError("--harness lm-eval: the lm-eval adapter is not in this copy of qianwen.") from None
            raise ValueError(f"--harness lm-eval needs the {exc.name} package; pip install lm-eval.") from None
        return run_harness(args)
    from qianwen.eval import harness, tasks

    modules = {name: tasks.load(name) for name in tasks.resolve(args.tasks)}
    extra = harness.parse_extra(args.options)
    harness.check_extra(modules, extra)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise ValueError(f"--data-dir {args.data_dir} is not a directory; give the folder holding the benchmark files.")
    # Everything a user can get wrong is checked before the model loads, the output folder included.
    out = Path(args.out) if args.out else harness.default_out(args.model)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name for the summary, e.g. {out / 'scores.json'}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tok = _load(args)
    data_dir = Path(args.data_dir) if args.data_dir else None
    options = harness.TaskOptions(data_dir, args.limit, args.batch_size, args.seed)
    meta = {
        "model": str(Path(args.model).resolve()),
        "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
        "device": args.device,
        "data_dir": str(data_dir.resolve()) if data_dir else None,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "options": extra,
        "qianwen": qianwen.__version__,
    }
    done = harness.run_tasks(model, tok, modules, options, extra, lambda d: harness.write_outputs(out, d, meta))
    print(harness.markdown(done), end="")
    print(f"wrote {out}, {out.with_suffix('.md').name} and the per-sample logs beside it", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------
# Parser and entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qianwen",
        description="The Qwen recipe: tokenizer, data, pretraining, SFT, reward model, PPO, evaluation, tools.",
    )
    parser.add_argument("--version", action="version", version=f"qianwen {qianwen.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("generate", help="complete a prompt")
    _add_model_options(p)
    p.add_argument("--prompt", help="the prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a ChatML user turn")
    p.add_argument("--no-stream", action="store_true", help="print the completion once it is done")
    _add_sampling_options(p, max_new_tokens=128)
    p.set_defaults(func=cmd_generate)

    chat_help = "chat with a model, one message per line of stdin"
    p = commands.add_parser("chat", help=chat_help, description=f"{chat_help.capitalize()}; {CHAT_HELP}")
    _add_model_options(p, required=False)
    p.add_argument("--url", metavar="URL", help="chat with a running `qianwen serve` (or any OpenAI-compatible server)")
    p.add_argument("--api-key", metavar="KEY", help="the server's key (default: $QIANWEN_API_KEY)")
    p.add_argument("--system", default=DEFAULT_SYSTEM, metavar="TEXT", help="system prompt")
    _add_sampling_options(p, max_new_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser(
        "agent",
        help="answer a question with tools (ReAct), printing the trace as it runs",
        description="Answer a question with Qwen's ReAct prompt: the model thinks, calls tools (code_interpreter "
        "runs Python in a sandbox; calculator does exact arithmetic) and reads their results until it answers.",
    )
    _add_model_options(p)
    p.add_argument("question", metavar="QUESTION")
    p.add_argument("--tools", default="code_interpreter,calculator", metavar="NAMES", help="comma-separated tools")
    p.add_argument("--max-steps", type=_positive_int, default=8, metavar="N", help="model turns at most (default 8)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=512, metavar="N", help="per model turn")
    p.set_defaults(func=cmd_agent)

    p = commands.add_parser(
        "serve",
        help="serve a model over the OpenAI API, with a web chat page",
        description="An OpenAI-compatible server (chat and text completions, streaming, tools) with continuous "
        "batching, and a chat page at /.",
    )
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY", help="require this key as a Bearer token (default: $QIANWEN_API_KEY)")
    p.add_argument("--served-name", metavar="NAME", help="the model id clients ask for (default: the directory name)")
    p.add_argument("--max-batch", type=_positive_int, default=16, metavar="N", help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, metavar="N", help="choices waiting for a row before 429")
    p.add_argument("--max-model-len", type=_positive_int, metavar="N", help="context per row (default: the model's)")
    p.add_argument(
        "--prefix-cache-mb",
        type=_non_negative_float,
        metavar="MB",
        help="keys and values of past prompts and replies kept for prompts that begin with them "
        "(default: a quarter of the KV cache, on a GPU at most half its free memory; 0: off)",
    )
    p.add_argument(
        "--engine",
        default="process",
        choices=["process", "thread"],
        help="decode in a process of its own (default: the HTTP server's work never waits on it for Python's GIL) "
        "or in a thread of the server's",
    )
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("convert", help="write any supported checkpoint as a Hugging Face Qwen2 directory")
    p.add_argument("src_dir", metavar="SRC_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weights dtype (default: as stored)")
    p.add_argument("--force", action="store_true", help="write into OUT_DIR even if it holds files")
    p.set_defaults(func=cmd_convert)

    p = commands.add_parser("download", help="fetch a checkpoint from the Hugging Face Hub")
    p.add_argument("repo_id", metavar="REPO_ID", help="e.g. Qwen/Qwen-1_8B")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.set_defaults(func=cmd_download)

    p = commands.add_parser("tokenizer", help="tokenizer tools: `tokenizer train` learns a byte-level BPE vocabulary")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "train",
        help="learn a byte-level BPE vocabulary with Qwen's pre-tokenizer and special tokens",
        description="Learn a byte-level BPE vocabulary with Qwen's pre-tokenizer and special tokens; write "
        "qwen.tiktoken, Hugging Face tokenizer files and bpe.json (training metadata, and bytes per token on "
        "held-out text for the new vocabulary and for Qwen's).",
    )
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATH",
        help="text files or directories (default: this Python's standard-library sources)",
    )
    p.add_argument(
        "--vocab-size", type=int, required=True, metavar="N", help="ids in all, the 208 special tokens included"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the vocabulary")
    p.add_argument("--max-bytes", type=_positive_int, default=None, metavar="N", help="read at most N bytes of text")
    p.add_argument("--force", action="store_true", help="write into DIR even if it holds files")
    p.set_defaults(func=cmd_tokenizer_train)

    p = commands.add_parser(
        "data",
        help="data: `data prep` makes token shards from text and code; `data synthetic` writes checkable tasks",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "prep",
        help="normalise, deduplicate, filter and decontaminate a corpus, then tokenise it into shards",
        description="Normalise, deduplicate (exact and MinHash), filter, decontaminate and tokenise a corpus into "
        "uint32 shards with OUT/index.json and OUT/stats.json; a rerun resumes from finished shards. Settings come "
        "from --config, then KEY=VALUE overrides such as filters.profile=code or pack.val_fraction=0.05.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATH",
        help="files or directories of text, code, JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or Parquet "
        "(default: this Python's standard-library sources)",
    )
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="directory holding qwen.tiktoken")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the shards")
    p.add_argument("--config", metavar="FILE", help="TOML config (sections read, normalize, ..., pack)")
    p.add_argument(
        "--workers", type=int, default=None, metavar="N", help="worker processes (default min(CPUs, 4); 0 = none)"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_data_prep)

    p = actions.add_parser(
        "synthetic",
        help="write seeded tasks a program can check (arithmetic, instructions, tool use; English and Chinese)",
        description="Write SFT conversations, preference pairs (a noisy PMP set with flipped labels, a clean RM "
        "set), PPO prompts and held-out eval sets with answers, all JSONL, and OUT/manifest.json. Tool transcripts "
        "run their code in the sandbox. The same seed writes the same bytes.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the files")
    p.add_argument("--seed", type=int, metavar="S", help="default 0")
    p.add_argument("--sft", type=int, metavar="N", help="SFT conversations (default 2000)")
    p.add_argument("--pairs", type=int, metavar="N", help="clean preference pairs for RM fine-tuning (default 1000)")
    p.add_argument("--pmp", type=int, metavar="N", help="noisy preference pairs for PMP (default 4000)")
    p.add_argument("--ppo", type=int, metavar="N", help="PPO prompts (default 1000)")
    p.add_argument("--eval", type=int, dest="eval_size", metavar="N", help="records per held-out file (default 200)")
    p.add_argument("--flip", type=float, metavar="F", help="fraction of PMP labels swapped (default 0.1)")
    p.add_argument(
        "--corpus", type=int, metavar="N", help="examples written as pretraining text to OUT/corpus/ (default 0)"
    )
    p.add_argument(
        "--facts",
        type=int,
        metavar="N",
        help="practice sheets of arithmetic facts (7 × 4 = 28) written to OUT/corpus/ too (default 0)",
    )
    p.add_argument(
        "--max-number",
        type=int,
        metavar="N",
        help="cap on every number of an arithmetic problem, working and answer included (default 0 = none)",
    )
    p.add_argument("--tool-digits", type=int, metavar="D", help="digits of the tool problems' first factor (default 5)")
    p.set_defaults(func=cmd_data_synthetic)

    p = commands.add_parser(
        "run",
        help="run the recipe end to end: tokenizer, data, pretraining, SFT, reward model, PPO, evaluation, report",
        description="Stages tokenizer, data, pretrain, tasks, sft, rm, ppo, eval, sample, report into OUT; finished "
        "stages are skipped on a re-run. Override recipe keys as SECTION.KEY=VALUE (e.g. pretrain.steps=50; every "
        "key is in docs/RECIPES.md). Give a stage your own artefact instead with base=DIR (a Hugging Face Qwen model "
        "directory; pretraining is skipped), sft=DIR, rm=DIR or tokenizer=DIR|qwen: it is copied into OUT.",
    )
    p.add_argument("--recipe", default="tiny", help="a recipe name in qianwen/recipes/ or a .toml path (default tiny)")
    p.add_argument("--out", default="runs/tiny", help="run directory (default runs/tiny)")
    p.add_argument("--seed", type=int, default=0)
    stages = p.add_mutually_exclusive_group()
    stages.add_argument("--from", dest="start", metavar="STAGE", help="redo STAGE and every stage after it")
    stages.add_argument("--only", metavar="STAGE", help="redo STAGE alone, then render the report card again")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE|ARTEFACT=PATH")
    p.set_defaults(func=cmd_run)

    training = [
        (
            "pretrain",
            "next-token training on `qianwen data prep` shards (one process, or many under torchrun)",
            "[model] and [pretrain]; pretrain keys bare, e.g. lr=1e-3 data=runs/x/data, model keys as "
            "model.hidden_size=128",
            cmd_pretrain,
        ),
        (
            "sft",
            "supervised fine-tuning on ChatML conversations (JSONL of messages)",
            "[sft], e.g. model=runs/x/base data=chat.jsonl out=runs/x lr=1e-5 steps=500",
            cmd_sft,
        ),
        (
            "rm",
            "train a reward model on preference pairs: PMP on a large set, then fine-tuning on a clean one",
            "[rm], e.g. model=runs/x/sft pmp_data=pmp.jsonl data=pairs.jsonl out=runs/x steps=300",
            cmd_rm,
        ),
        (
            "ppo",
            "PPO-RLHF: policy and reference from SFT, value and reward from the reward model",
            "[ppo], e.g. policy=runs/x/sft reward_model=runs/x/rm prompts=prompts.jsonl out=runs/x steps=100",
            cmd_ppo,
        ),
    ]
    for name, summary, sections, func in training:
        description = f"Settings come from the recipe's {sections}; KEY=VALUE overrides follow the recipe."
        p = commands.add_parser(name, help=summary, description=description)
        p.add_argument("--recipe", metavar="NAME", help="a recipe name in qianwen/recipes/ (tiny ...) or a .toml path")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
        p.set_defaults(func=func)

    p = commands.add_parser(
        "eval",
        help="score a checkpoint on benchmarks (humaneval, gsm8k, mmlu, ceval, arith, tool, bpb, longctx)",
        description="Run each task of --tasks with the report's protocol and write a summary JSON (--out, default "
        "<model>/../eval/<model dir name>.json), <stem>.<task>.jsonl sample logs, the Markdown table <stem>.md and "
        "any plots beside it. Task options as KEY=VALUE (every task reading KEY) or TASK.KEY=VALUE, e.g. "
        "humaneval.n=20 temperature=0.8. --harness lm-eval runs lm-evaluation-harness tasks instead.",
    )
    _add_model_options(p)
    p.add_argument("--tasks", required=True, metavar="LIST", help="comma-separated task names")
    p.add_argument("--data-dir", metavar="DIR", help="folder of benchmark files (each task's docstring names its own)")
    p.add_argument(
        "--limit", type=_positive_int, metavar="N", help="at most N samples per task (per subject for mmlu, ceval)"
    )
    p.add_argument("--out", metavar="FILE", help="summary JSON (default <model>/../eval/<model dir name>.json)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="prompts per forward (default 8)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="for sampled generation (default 0)")
    p.add_argument("--harness", choices=["qianwen", "lm-eval"], default="qianwen", help="default qianwen")
    p.add_argument("options", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_eval)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror.lower()}."
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return exc.status
    except BrokenPipeError:
        # The reader went away (`| head`); say nothing more and keep Python quiet at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as exc:  # CheckpointError and TokenizerError are ValueErrors
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
