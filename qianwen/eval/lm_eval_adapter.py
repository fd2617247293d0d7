"""lm-evaluation-harness on qianwen checkpoints: a registered lm-eval model `qianwen` and `qianwen eval --harness
lm-eval`.

    lm_eval --model qianwen --model_args pretrained=runs/tiny/base,device=cpu,dtype=float32,batch_size=8 ...

(after `import qianwen.eval.lm_eval_adapter`, which registers the name) or, from the command line,

    qianwen eval --harness lm-eval --model runs/tiny/base --tasks hellaswag,my_task include_path=my_tasks/

Requests are scored the way lm-eval's own `hf` backend scores them, so the numbers agree with it: the same
tokenisation of (context, continuation) pairs, the same left truncation to the model's window, the same rolling
windows for perplexity, and <|endoftext|> as the context of an empty prompt. What differs is the work done:
requests are sorted by length and batched (right-padded), the output head runs only at the positions being
scored rather than over every position of the batch (with Qwen's 152k vocabulary most of the cost), and
generation decodes with the KV cache through `qianwen.generate`, left-padded, stopping at the task's `until`
strings or max_gen_toks.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, normalize_gen_kwargs
from tqdm import tqdm

import qianwen
from qianwen.tokenizer import CHAT_TEMPLATE
from qianwen.util import atomic_write

log = logging.getLogger(__name__)

_DTYPES = {"auto": None, "float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16"}
_DTYPES |= {"float16": "fp16", "fp16": "fp16"}
_SAMPLING_KEYS = {"do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "until", "max_gen_toks"}

HARNESS_OPTIONS = ("include_path", "num_fewshot")

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (strings or None, context ids, continuation ids)


@register_model("qianwen")
class QianwenLM(TemplateLM):
    """A qianwen, Hugging Face Qwen2 or Qwen v1 checkpoint as an lm-eval model (`--model qianwen`)."""

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        prefix_token_id: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ValueError("the qianwen model takes a fixed batch_size; pass a number such as batch_size=8.")
        if str(dtype) not in _DTYPES:
            raise ValueError(f"dtype={dtype} is not one of {', '.join(_DTYPES)}.")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer = qianwen.load(pretrained, dtype=_DTYPES[str(dtype)], device=self._device)
        self.model.eval()
        self.pretrained = str(pretrained)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self._prefix_token_id = int(prefix_token_id) if prefix_token_id is not None else None
        self.compile = compile if isinstance(compile, bool) else str(compile).lower() in ("true", "1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")

    # -- what lm-eval asks of a model ------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod_id

    @property
    def prefix_token_id(self) -> int:
        # Qwen has no BOS: documents are separated by <|endoftext|>, so that is what precedes an empty context.
        return self._prefix_token_id if self._prefix_token_id is not None else self.tokenizer.eod_id

    @property
    def tokenizer_name(self) -> str:
        return f"qianwen:{self.pretrained}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return CHAT_TEMPLATE if chat_template else ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.chat_text(chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        config = self.model.config
        return {"model_num_parameters": config.num_params, "model_dtype": str(self.model.embed.weight.dtype)}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    # -- scoring ---------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, greedy?) of each continuation. Requests that differ only in a last
        one-token continuation share one forward pass, as in lm-eval's `hf` backend."""
        order = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
            group_by="contexts",
            group_fn=lambda r: r[1] + r[2][:-1],
        )
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="qianwen loglikelihood", file=sys.stderr)
        for chunk in order.get_batched(n=self.batch_size):
            for (strings, context, continuation), logprobs in zip(chunk, self._continuation_logprobs(chunk)):
                greedy_ids = logprobs.argmax(-1)
                for strings_, cont, lp in order.get_cache(
                    req_str=strings, cxt_toks=context, cont_toks=continuation, logits=logprobs[None]
                ):
                    cont = torch.tensor(cont, device=lp.device)
                    answer = (
                        float(lp[0, -len(cont) :].gather(-1, cont[:, None]).sum()),
                        bool((greedy_ids[-len(cont) :] == cont).all()),
                    )
                    results.append(answer)
                    if strings_ is not None:
                        self.cache_hook.add_partial("loglikelihood", strings_, answer)
                    bar.update(1)
        bar.close()
        return order.get_original(results)

    @torch.inference_mode()
    def _continuation_logprobs(self, chunk: Sequence[Request]) -> list[torch.Tensor]:
        """Log-probabilities [continuation length, vocab] at each request's continuation positions."""
        inputs, scored = [], []
        for _, context, continuation in chunk:
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens cannot be scored in a {self.max_length}-token "
                    "window; the task's continuations must be non-empty and fit max_length."
                )
            # The last token is only ever a target; what does not fit the window is dropped from the left.
            ids = (context + continuation)[-(self.max_length + 1) :][:-1]
            inputs.append(ids)
            scored.append(range(len(ids) - len(continuation), len(ids)))
        width = max(map(len, inputs))
        batch = torch.full((len(inputs), width), self.tokenizer.pad_id, dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, : len(ids)] = torch.tensor(ids)
        # Right padding needs no attention mask: in a causal model a real token never attends to a later one.
        hidden = self.model.hidden_states(batch.to(self.device))
        rows = torch.cat([torch.full((len(r),), i) for i, r in enumerate(scored)]).to(self.device)
        columns = torch.cat([torch.tensor(r) for r in scored]).to(self.device)
        logprobs = F.log_softmax(self.model.lm_head(hidden[rows, columns]).float(), dim=-1)
        return list(logprobs.split([len(r) for r in scored]))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of max_length that each predict new tokens
        with as much context as fits (lm-eval's rolling windows); all windows of all documents are batched."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            pieces = utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(utils.make_disjoint_window, pieces):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched KV-cached decoding of each request's context until one of its `until` strings, an end
        token (<|endoftext|>, <|im_end|>, <|im_start|>) or max_gen_toks new tokens; the text before the stop."""
        args = [req.args for req in requests]
        encoded = {context: self.tok_encode(context) for context, _ in args}
        order = Collator(
            args,
            sort_fn=lambda a: (-len(encoded[a[0]]), a[0]),
            group_by="gen_kwargs",
            group_fn=lambda a: a[1],
        )
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="qianwen generate_until", file=sys.stderr)
        for chunk in order.get_batched(n=self.batch_size):
            contexts, kwargs = zip(*chunk)
            settings = normalize_gen_kwargs(kwargs[0], self.max_gen_toks)
            unknown = sorted(set(settings) - _SAMPLING_KEYS)
            if unknown:
                log.warning("qianwen: generation settings %s are not supported and are ignored.", unknown)
            max_new = int(settings["max_gen_toks"])
            room = self.max_length - max_new
            if room < 1:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in {self.max_length} tokens.")
            prompts = [encoded[c][-room:] or [self.prefix_token_id] for c in contexts]
            sampled = bool(settings.get("do_sample")) and float(settings.get("temperature", 0.0)) > 0
            completions = qianwen.generate(
                self.model,
                self.tokenizer,
                prompts,
                max_new,
                stop=[s for s in settings["until"] if s] or None,
                temperature=float(settings.get("temperature", 0.0)) if sampled else 0.0,
                top_p=float(settings.get("top_p", 1.0)) if sampled else 1.0,
                top_k=int(settings.get("top_k", 0)) if sampled else 0,
                repetition_penalty=float(settings.get("repetition_penalty", 1.0)),
                compile=self.compile,
            )
            for context, gen_kwargs, completion in zip(contexts, kwargs, completions):
                results.append(completion.text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), completion.text)
                bar.update(1)
        bar.close()
        return order.get_original(results)


def run_harness(args) -> int:
    """`qianwen eval --harness lm-eval`: `args.model` (a checkpoint directory), `args.tasks` (comma-separated lm-eval
    task names), `limit`, `out`, `batch_size`, `device`, `dtype`, and KEY=VALUE `options`: include_path=DIR (a
    folder of local task YAMLs) and num_fewshot=N. Prints lm-eval's results table; with `out`, writes the results
    and per-sample logs as JSON. Returns 0."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    options = {}
    for item in getattr(args, "options", None) or []:
        key, sep, value = item.partition("=")
        if not sep or key not in HARNESS_OPTIONS:
            raise ValueError(f"{item!r} is not an lm-eval option; the options are include_path=DIR and num_fewshot=N.")
        options[key] = value
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} holds no config.json; pass --model a checkpoint directory.")
    tasks = [t.strip() for t in str(args.tasks).split(",") if t.strip()] if args.tasks else []
    if not tasks:
        raise ValueError("no lm-eval task named; pass --tasks, e.g. --tasks hellaswag,arc_easy.")
    include = options.get("include_path")
    if include and not Path(include).is_dir():
        raise ValueError(f"include_path={include} is not a directory; give the folder holding the task YAMLs.")
    try:
        num_fewshot = int(options["num_fewshot"]) if "num_fewshot" in options else None
    except ValueError:
        raise ValueError(f"num_fewshot={options['num_fewshot']} is not an integer.") from None
    # Indexing lm-eval's thousands of built-in YAMLs takes seconds; tasks that are all local skip it.
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(not manager.match_tasks([t]) for t in tasks):
        manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ValueError(
            f"lm-eval has no task {', '.join(map(repr, unknown))}; `lm_eval ls tasks` lists them, and "
            "include_path=DIR adds local YAML tasks."
        )
    lm = QianwenLM(
        str(model_dir),
        device=getattr(args, "device", None),
        dtype=getattr(args, "dtype", None) or "auto",
        batch_size=getattr(args, "batch_size", None) or 8,
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=getattr(args, "limit", None),
        task_manager=manager,
        log_samples=bool(getattr(args, "out", None)),
    )
    print(make_table(results))
    out = getattr(args, "out", None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(out), json.dumps(results, indent=2, default=str, ensure_ascii=False) + "\n")
        print(f"wrote {out}")
    return 0
