"""lm-evaluation-harness on qianwen checkpoints: a registered lm-eval model `qianwen` and `qianwen eval --harness
lm-eval`.

    lm_eval --model qianwen --model_args pretrained=runs/tiny/base,device=cpu,dtype=float32,batch_size=8 ...

(after `import qianwen.eval.lm_eval_adapter`, which registers the name) or, from the command line,

    qianwen eval --harness lm-eval --model runs/tiny/base --tasks hellaswag,my_task include_path=my_tasks/

Requests are scored the way lm-eval's own `hf` backend scores them, so the numbers agree with it: the same
tokenisation of (context, continuation) pairs, the same left truncation to the model's window, the same rolling
windows for perplexity, and <|endoftext|> as the context of an empty prompt. What differs is the work done:

- requests that share a context (a multiple-choice question's options) run it once: its KV cache is copied to
  each option, and only the options run after it; options that begin alike (" 12", " 13") share those tokens;
- the output head and softmax run only at the distinct positions being scored, rather than over every position
  of the batch (with Qwen's 152k vocabulary most of the cost);
- requests are sorted by length and batched; generation decodes with the KV cache through `qianwen.generate`,
  left-padded, stopping at the task's `until` strings or max_gen_toks.
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
from qianwen.checkpoint import require_language_model
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
        require_language_model(pretrained)
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
        """(sum of log-probabilities, greedy?) of each continuation. Requests with the same context (the options
        of a multiple-choice question) share one pass over it: the context runs once, its KV cache is copied to
        each continuation, and only the continuations run after it."""
        inputs = [self._input(context, continuation) for _, context, continuation in requests]
        # Dynamic NTK fixes each row's rotary base from its length at prefill, so a context run alone would not
        # see the base that the whole request sees; such a model scores each request in one pass.
        share = not self.model.config.use_dynamic_ntk
        groups: dict[tuple[int, ...] | int, tuple[int, list[int]]] = {}
        for i, ((_, _, continuation), ids) in enumerate(zip(requests, inputs)):
            cut = len(ids) - len(continuation) + 1
            groups.setdefault(tuple(ids[:cut]) if share else i, (cut, []))[1].append(i)
        units = [
            (cut, members[j : j + self.batch_size])
            for cut, members in groups.values()
            for j in range(0, len(members), self.batch_size)
        ]
        units.sort(key=lambda u: (-max(len(inputs[m]) for m in u[1]), u[1][0]))  # longest first, as lm-eval does
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="qianwen loglikelihood", file=sys.stderr)
        batch: list[tuple[int, list[int]]] = []
        for k, unit in enumerate(units):
            batch.append(unit)
            rows = sum(len(m) for _, m in batch)
            if k + 1 < len(units) and rows + len(units[k + 1][1]) <= self.batch_size:
                continue
            members = [m for _, ms in batch for m in ms]
            targets = [requests[m][2] for m in members]
            for m, answer in zip(members, self._score(batch, [inputs[m] for m in members], targets)):
                results[m] = answer
                if requests[m][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[m][0], answer)
            bar.update(len(members))
            batch = []
        bar.close()
        return results  # type: ignore[return-value]

    def _input(self, context: list[int], continuation: list[int]) -> list[int]:
        """The ids the model reads for one request: the last token is only ever a target, and what does not fit
        the window is dropped from the left."""
        if not continuation or len(continuation) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens cannot be scored in a {self.max_length}-token "
                "window; the task's continuations must be non-empty and fit max_length."
            )
        return (context + continuation)[-(self.max_length + 1) :][:-1]

    @torch.inference_mode()
    def _score(
        self, units: Sequence[tuple[int, list[int]]], inputs: list[list[int]], targets: list[list[int]]
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy?) of each member of `units` ((prefix length, members): members share the first
        prefix-length ids of their inputs), given the members' inputs and continuations in order."""
        if any(len(m) > 1 for _, m in units):
            hidden, where = self._shared_hidden(units, inputs)
        else:
            hidden = self._plain_hidden(inputs, [len(t) for t in targets])
            where = torch.arange(hidden.shape[0], device=hidden.device)
        # The output head and the softmax over the 152k vocabulary are most of the cost: each runs once per
        # distinct position. log_softmax subtracts the max first, which keeps fp32 as exact as the hf backend.
        logprobs = F.log_softmax(self.model.lm_head(hidden).float(), dim=-1)
        flat = torch.tensor([t for ts in targets for t in ts], device=logprobs.device)
        picked = logprobs[where, flat]
        # A max is a fifth of an argmax's time on a CPU; argmax runs only where the target reaches the max, so
        # that a tie goes to the first maximum, as in the hf backend's greedy check.
        greedy = picked == logprobs.amax(-1)[where]
        tied = greedy.nonzero()[:, 0]
        greedy[tied] = logprobs[where[tied]].argmax(-1) == flat[tied]
        sizes = [len(t) for t in targets]
        return [
            (float(lp.sum()), bool(g.all())) for lp, g in zip(picked.split(sizes), greedy.split(sizes), strict=True)
        ]

    def _plain_hidden(self, inputs: list[list[int]], scored: list[int]) -> torch.Tensor:
        """Hidden states at the last `scored[i]` positions of each input, each input in its own row."""
        width = max(map(len, inputs))
        batch = torch.full((len(inputs), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        # Right padding needs no attention mask: in a causal model a real token never attends to a later one.
        # Dynamic NTK does: without it each row's rotary base would follow the padded width, not its length.
        mask = mask.to(self.device) if self.model.config.use_dynamic_ntk else None
        hidden = self.model.hidden_states(batch.to(self.device), mask)
        rows = torch.cat([torch.full((n,), i) for i, n in enumerate(scored)])
        columns = torch.cat([torch.arange(len(ids) - n, len(ids)) for ids, n in zip(inputs, scored)])
        return hidden[rows.to(self.device), columns.to(self.device)]

    def _shared_hidden(
        self, units: Sequence[tuple[int, list[int]]], inputs: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states at the distinct scored positions of the members, and for each member's each scored
        position (in order) its index among them. Each unit's prefix runs once (left-padded, into a KV cache);
        then, on a copy of its prefix's cache, each distinct tail (the continuation but its last token) that is
        not the start of a longer one (right-padded). Options that begin alike (" 12", " 13") share positions."""
        rows: list[tuple[int, tuple[int, ...]]] = []  # (unit, tail) run after the unit's prefix
        row_of: list[int] = []
        for g, (cut, members) in enumerate(units):
            tails = [tuple(inputs[len(row_of) + i][cut:]) for i in range(len(members))]
            mine: list[int] = []
            for tail in sorted(set(tails), key=len, reverse=True):
                if not any(rows[r][1][: len(tail)] == tail for r in mine):
                    mine.append(len(rows))
                    rows.append((g, tail))
            row_of += [next(r for r in mine if rows[r][1][: len(t)] == t) for t in tails]
        # Column 0 of a row is its prefix's last position; column j the tail's j-th token.
        positions: dict[tuple[int, tuple[int, ...]], int] = {}
        where, gather = [], []
        for r, ids in zip(row_of, inputs):
            g, tail = rows[r]
            for j in range(len(ids) - units[g][0] + 1):
                key = (g, tail[:j])
                if key not in positions:
                    positions[key] = len(gather)
                    gather.append((r, j))
                where.append(positions[key])

        first = [sum(len(m) for _, m in units[:g]) for g in range(len(units))]  # a member of each unit
        prefixes = [inputs[first[g]][:cut] for g, (cut, _) in enumerate(units)]
        width, tail_width = max(map(len, prefixes)), max(len(t) for _, t in rows)
        ids = torch.full((len(prefixes), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            ids[row, width - len(prefix) :] = torch.tensor(prefix)
            mask[row, width - len(prefix) :] = 1
        cache = self.model.new_cache(len(prefixes), width + tail_width) if tail_width else None
        last = self.model.hidden_states(ids.to(self.device), mask.to(self.device), cache)[:, -1]
        index = torch.tensor([g for g, _ in rows], device=self.device)
        hidden = last[index][:, None]
        if tail_width:
            ids = torch.full((len(rows), tail_width), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), tail_width), dtype=torch.long)
            for row, (_, tail) in enumerate(rows):
                ids[row, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                mask[row, : len(tail)] = 1
            tails = self.model.hidden_states(ids.to(self.device), mask.to(self.device), cache.select(index))
            hidden = torch.cat([hidden, tails], dim=1)
        r, j = torch.tensor(gather).T.to(self.device)
        return hidden[r, j], torch.tensor(where, device=self.device)

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
