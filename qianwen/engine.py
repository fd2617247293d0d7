"""Continuous batching (the server's engine; in core so that any stage with many prompts can use it).

One thread owns the model and a KV cache of `max_batch` rows of `max_len` slots (the budget every request
shares). A request joins the running batch between two decoding steps (its prompt is prefilled into a free row;
the n choices of one prompt share that prefill) and leaves it the step it finishes, or the step after its client
goes away, so a long reply never holds a short one up. Live rows are kept at the front of the cache: one
decoding step is one forward pass over a view of those rows, each row at its own position. Beyond `max_batch`
running and `max_queue` waiting, `submit` refuses with `Overloaded`.

Prefix caching: the keys and values of every prompt prefilled and of every finished reply (with its prompt) are
kept within a byte budget (`qianwen.prefix_cache`). A prompt that an entry covers but for its last token skips
its prefill: its row gets the cached keys and values and joins the next decoding step with that token. One
whose first half or more is cached prefills only the rest. Dynamic NTK fixes a row's rotary base from its
prompt's length, so prompts past the training length are neither matched nor kept there."""

from __future__ import annotations

import collections
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from qianwen.generate import OutputText, Sampling, sample_rows, uniforms
from qianwen.model import Transformer
from qianwen.prefix_cache import Entry, PrefixCache
from qianwen.tokenizer import Tokenizer


class Overloaded(RuntimeError):
    """Every batch row is busy and the queue is full."""


@dataclass(frozen=True)
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k likeliest
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What one decoding step added to one choice."""

    text: str  # new text safe to show (a possible stop string is held back until it cannot be one)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", or "error" (then `text` says what went wrong)


class Job:
    """One choice being generated. `emit` is called from the engine's thread."""

    def __init__(self, prompt: list[int], params: Params, index: int, tokenizer: Tokenizer, stop_ids, emit):
        self.prompt, self.params, self.index, self.emit = prompt, params, index, emit
        self.output = OutputText(tokenizer, frozenset(stop_ids), params.stop)
        # Any integer is a seed (the API bounds none; torch takes 64 bits): a huge or negative one wraps around.
        seed = (params.seed + index) % 2**64 if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.counts: collections.Counter[int] = collections.Counter()
        self.bias = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            self.bias = torch.tensor(ids), torch.tensor(values)
        # Greedy with nothing to adjust: the engine takes the argmax of the whole batch at once.
        self.plain = params.temperature == 0 and params.logprobs is None and self.bias is None
        self.plain = self.plain and not (params.presence_penalty or params.frequency_penalty)
        self.length = 0  # tokens in the cache row
        self.next_token = -1  # sampled (or the prompt's last token when its prefill was cached), not yet fed
        self.sampled: list[int] = []  # every id picked, stop ids included
        self.tag = None  # the submitter's label (the engine process's request id)
        self.cancelled = False

    def cancel(self) -> None:
        """Called from any thread: the engine drops the job before its next step."""
        self.cancelled = True

    @property
    def generated(self) -> int:
        """Tokens of the reply so far."""
        return len(self.output.ids)


def hand_over(deliver: Callable | None, events: list) -> None:
    """A step's (job, event) pairs to `deliver` in one call, or else to each job's `emit`."""
    if not events:
        return
    if deliver is not None:
        deliver(events)
    else:
        for job, event in events:
            job.emit(event)


def check_request(prompt: Sequence[int], params: Params, n: int, max_batch: int, max_len: int) -> None:
    if not 1 <= n <= max_batch:
        raise ValueError(f"n must be between 1 and the server's --max-batch {max_batch}, got {n}.")
    Sampling(temperature=params.temperature, top_p=params.top_p)  # its checks, with their messages
    if not prompt or len(prompt) + params.max_tokens > max_len:
        raise ValueError(f"a {len(prompt)}-token prompt and max_tokens {params.max_tokens} do not fit {max_len}.")


class Engine:
    PREFILL_TOKENS = 16384  # prompts prefilled together pad to at most this many tokens in all
    PARTIAL_REUSE_TOKENS = 16  # a cached prefix shorter than this (or than half the prompt) is prefilled anyway

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        max_len: int | None = None,
        deliver: Callable[[list[tuple[Job, Event]]], None] | None = None,
        prefix_cache_bytes: int | None = None,
    ):
        """`deliver`, when given, receives each step's events in one call (from the engine's thread), e.g. to hand
        them to an event loop at once; without it, each job's `emit` is called for its own events.
        `prefix_cache_bytes`: the prefix cache's budget (None: a quarter of the KV cache's size, on a GPU at most
        half of its memory left free by the cache; 0: none)."""
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}.")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = min(max_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.stop_ids = [*tokenizer.chat_stop_ids, tokenizer.eod_id]
        c = model.config
        self.cache_bytes = 2 * c.num_layers * max_batch * c.num_kv_heads * self.max_len * c.head_dim
        self.cache_bytes *= model.embed.weight.element_size()
        try:
            self.cache = model.new_cache(max_batch, self.max_len)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            raise ValueError(
                f"the KV cache for {max_batch} rows of {self.max_len} tokens needs {self.cache_bytes / 2**30:.1f} GiB, "
                f"which this device cannot allocate ({str(exc).splitlines()[0][:120]}); lower --max-batch or "
                "--max-model-len."
            ) from None
        if model.config.use_dynamic_ntk:
            self.cache.alpha = torch.ones(max_batch, device=self.cache.k.device)
        self.device = self.cache.k.device
        budget = self.cache_bytes // 4 if prefix_cache_bytes is None else prefix_cache_bytes
        if prefix_cache_bytes is None and self.device.type == "cuda":
            # The entries are allocated as they come: by default they may take half of what the cache left free.
            budget = min(budget, torch.cuda.mem_get_info(self.device)[0] // 2)
        self.prefix = PrefixCache(budget) if budget > 0 else None
        self.active: list[Job] = []  # job i owns cache row i
        self._admitting = 0  # jobs taken off the queue and not yet in `active`
        self.waiting: collections.deque[list[Job]] = collections.deque()
        self.deliver = deliver
        self._outbox: list[tuple[Job, Event]] = []
        self.steps = self.generated = self.cancelled = 0  # decoding steps, tokens sampled, jobs dropped unfinished
        self.busy_seconds = 0.0  # in prefills and decoding steps
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qianwen-engine", daemon=True)
        self._thread.start()

    @property
    def prefix_budget(self) -> int:
        return self.prefix.budget if self.prefix else 0

    def submit(
        self, prompt: Sequence[int], params: Params, n: int, emit: Callable[[Job, Event], None], tags=None
    ) -> list[Job]:
        """Queue `n` choices for one prompt; `emit(job, event)` receives each step's output. `tags`, one per
        choice, become the jobs' `tag` before the engine can see them."""
        check_request(prompt, params, n, self.max_batch, self.max_len)
        jobs = [Job(list(prompt), params, i, self.tokenizer, self.stop_ids, None) for i in range(n)]
        for job, tag in zip(jobs, tags or [None] * n, strict=True):
            job.emit = lambda event, job=job: emit(job, event)
            job.tag = tag
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down.")
            queued = sum(map(len, self.waiting))
            if len(self.active) + self._admitting + queued + n > self.max_batch + self.max_queue:
                raise Overloaded(
                    f"all {self.max_batch} batch rows are busy and {queued} choices are queued "
                    f"(the limit is {self.max_queue}); retry later."
                )
            self.waiting.append(jobs)
            self._cond.notify()
        return jobs

    @property
    def alive(self) -> bool:
        """Whether the decoding thread still runs (the server's /health says so)."""
        return self._thread.is_alive() and not self._closed

    @property
    def load(self) -> dict[str, int]:
        return {
            "running": len(self.active),
            "waiting": sum(map(len, self.waiting)),
            "max_batch": self.max_batch,
            "steps": self.steps,
            "busy_seconds": round(self.busy_seconds, 3),
            "generated_tokens": self.generated,
            "cancelled": self.cancelled,
            "prefix_cache_hits": self.prefix.hits if self.prefix else 0,
            "prefix_cache_reused_tokens": self.prefix.reused_tokens if self.prefix else 0,
        }

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- the engine's thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.waiting and not self.active:
                    self._cond.wait()
                if self._closed:
                    return
                admitted = []
                while (
                    self.waiting and len(self.active) + sum(map(len, admitted)) + len(self.waiting[0]) <= self.max_batch
                ):
                    admitted.append(self.waiting.popleft())
                self._admitting = sum(map(len, admitted))
            started = time.perf_counter()
            try:
                self._drop_cancelled()
                groups = []
                for jobs in admitted:
                    live = [j for j in jobs if not j.cancelled]
                    self.cancelled += len(jobs) - len(live)
                    self._admitting -= len(jobs) - len(live)
                    if live:
                        groups.append(live)
                misses = []
                for group in groups:
                    cached, entry = self._cached_prefix(group[0].prompt)
                    if cached and cached == len(group[0].prompt) - 1:
                        self._join(group, entry)
                    elif cached:
                        self._prefill([group], cached, entry)
                    else:
                        misses.append(group)
                for chunk in self._prefill_chunks(misses):
                    self._prefill(chunk)
                if self.active:
                    self._step()
                self.busy_seconds += time.perf_counter() - started
                self._flush()
            except Exception as exc:  # one failing batch must not take the server down
                traceback.print_exc()
                admitted_jobs = [j for jobs in admitted for j in jobs if j not in self.active]
                self._fail_all(f"generation failed: {type(exc).__name__}: {exc}", admitted_jobs)

    def _prefill_chunks(self, groups: list[list[Job]]) -> list[list[list[Job]]]:
        """The admitted prompts in runs whose padded batch stays within PREFILL_TOKENS (one prompt at least)."""
        chunks: list[list[list[Job]]] = []
        for group in groups:
            run = [*chunks[-1], group] if chunks else [group]
            if chunks and len(run) * max(len(g[0].prompt) for g in run) <= self.PREFILL_TOKENS:
                chunks[-1] = run
            else:
                chunks.append([group])
        return chunks

    def _cached_prefix(self, prompt: list[int]) -> tuple[int, Entry | None]:
        """How much of the prompt's prefill the prefix cache saves (at most all but its last token, whose logits
        are needed), and the entry; (0, None) when too little to be worth a prefill of its own."""
        if self.prefix is None or not self._keepable(len(prompt)):
            return 0, None
        n, entry = self.prefix.match(prompt)
        n = min(n, len(prompt) - 1)
        if n <= 0 or (n < len(prompt) - 1 and (n < self.PARTIAL_REUSE_TOKENS or 2 * n < len(prompt))):
            return 0, None
        self.prefix.hits += 1
        self.prefix.reused_tokens += n
        return n, entry

    def _keepable(self, prompt_length: int) -> bool:
        """Whether a row's keys are the same whatever the prompt: not so under dynamic NTK past the training
        length, where the prompt's length sets the rotary base of every key."""
        config = self.model.config
        return not config.use_dynamic_ntk or prompt_length <= config.seq_length

    def _place(self, row: int, entry: Entry, n: int) -> None:
        self.cache.k[:, row, :, :n] = entry.k[:, :, :n]
        self.cache.v[:, row, :, :n] = entry.v[:, :, :n]
        self.cache.seen[row] = n
        if self.cache.alpha is not None:
            self.cache.alpha[row] = 1.0

    def _join(self, group: list[Job], entry: Entry) -> None:
        """Choices whose prompt is cached but for its last token: their rows get the cached keys and values and
        join the next decoding step with that token, which gives their first logits."""
        for job in group:
            n = len(job.prompt) - 1
            self._place(len(self.active), entry, n)
            job.length, job.next_token = n, job.prompt[-1]
            self.active.append(job)
            self._admitting -= 1

    def _keep(self, row: int, tokens: list[int]) -> None:
        """Put a row's first len(tokens) keys and values in the prefix cache."""
        n = len(tokens)
        self.prefix.add(tokens, self.cache.k[:, row, :, :n].clone(), self.cache.v[:, row, :, :n].clone())

    @torch.inference_mode()
    def _prefill(self, groups: list[list[Job]], start: int = 0, entry: Entry | None = None) -> None:
        """Prefill several prompts in one forward pass (each group is one prompt's n choices): right-padded, so
        that every row's tokens sit at slots 0..length-1 as decoding expects, the pads beyond a row's length
        masked until its own tokens overwrite them. A choice beyond the first gets a copy of its prompt's row.
        Under load this replaces a forward pass per request: 16 requests arriving together are prefilled in
        one. With `start`, one prompt whose first `start` tokens are the prefix cache's `entry`: only the rest
        runs."""
        first, cache = len(self.active), self.cache
        lengths = torch.tensor([len(g[0].prompt) for g in groups])
        T = int(lengths.max()) - start
        ids = torch.zeros((len(groups), T), dtype=torch.long)
        for r, group in enumerate(groups):
            ids[r, : lengths[r] - start] = torch.tensor(group[0].prompt[start:])
        mask = None
        if bool((lengths - start < T).any()):  # positions, and the NTK factor, count each row's own tokens only
            mask = (torch.arange(T)[None] < (lengths - start)[:, None]).long().to(self.device)
        if entry is not None:
            self._place(first, entry, start)
        else:
            cache.seen[first : first + len(groups)] = 0
        view = cache.rows(first, first + len(groups))
        view.length = start
        hidden = self.model.hidden_states(ids.to(self.device), mask, view)
        last = hidden[torch.arange(len(groups), device=self.device), (lengths - 1 - start).to(self.device)]
        logits = self.model.lm_head(last).float()
        extra = first + len(groups)  # rows of the prompts' first choices come first, then the other choices
        for r, group in enumerate(groups):
            home, n = first + r, int(lengths[r])
            for offset, job in enumerate(group):
                row = home if offset == 0 else extra
                if offset:
                    cache.k[:, row, :, :n] = cache.k[:, home, :, :n]
                    cache.v[:, row, :, :n] = cache.v[:, home, :, :n]
                    extra += 1
                cache.seen[row] = n
                if cache.alpha is not None:
                    cache.alpha[row] = view.alpha[r] if view.alpha is not None else 1.0
                job.length = n
            if self.prefix is not None and self._keepable(n):
                self._keep(home, group[0].prompt)
        # `active` lists jobs in row order: the first choices, then the others in the order their rows were given.
        self.active += [g[0] for g in groups] + [j for g in groups for j in g[1:]]
        admitted = [job for group in groups for job in group]
        rows = logits[[r for r, group in enumerate(groups) for _ in group]]
        for job, row_logits, token in zip(admitted, rows, self._pick(admitted, rows), strict=True):
            self._admitting -= 1
            self._advance(job, row_logits, token)

    @torch.inference_mode()
    def _step(self) -> None:
        jobs = self.active
        tokens = torch.tensor([[j.next_token] for j in jobs], dtype=torch.long, device=self.device)
        span = max(j.length for j in jobs) + 1
        view = self.cache.rows(0, len(jobs), span)
        slots = view.seen.clone()
        logits = self.model.decode_step(tokens, view, slots).float()
        self.cache.seen[: len(jobs)] += 1
        self.steps += 1
        for job, row_logits, token in zip(list(jobs), logits, self._pick(jobs, logits), strict=True):
            job.length += 1
            self._advance(job, row_logits, token)
        self._drop_finished()

    def _pick(self, jobs: list[Job], logits: torch.Tensor) -> list[int]:
        """Each job's next token from its row of `logits` [jobs, V], whose rows take the job's logit bias and
        penalties in place first (the log-probabilities a job asks for are of those). The greedy rows are picked by
        one max and the sampled ones by one `sample_rows` over all of them, each row with its own temperature,
        top-p and seeded draw: the same tokens as row by row, where 16 sampled requests made the step 1.4x slower
        than 16 greedy ones at an 8,192-id vocabulary."""
        for i, job in enumerate(jobs):
            if not job.plain:
                self._adjust(job, logits[i])
        tokens = [0] * len(jobs)
        greedy = [i for i, job in enumerate(jobs) if job.params.temperature == 0]
        if greedy:
            picked = (logits if len(greedy) == len(jobs) else logits[greedy]).max(-1).indices.tolist()
            for i, token in zip(greedy, picked, strict=True):
                tokens[i] = token
        sampled = [i for i, job in enumerate(jobs) if job.params.temperature > 0]
        if sampled:
            # Each request's seeded generator lives on the CPU: its draw is made there, then all move at once.
            cpu = torch.device("cpu")
            u = torch.cat([uniforms(1, jobs[i].generator, cpu) for i in sampled]).to(self.device)
            settings = torch.tensor([[jobs[i].params.temperature, jobs[i].params.top_p] for i in sampled])
            settings = settings.to(self.device)
            rows = logits if len(sampled) == len(jobs) else logits[sampled]
            picked = sample_rows(rows, settings[:, :1], settings[:, 1:], u)
            for i, token in zip(sampled, picked.tolist(), strict=True):
                tokens[i] = token
        return tokens

    def _advance(self, job: Job, logits: torch.Tensor, token: int) -> None:
        """Hand over the job's picked token (from its logits [V], adjusted) and note whether it is done."""
        p = job.params
        logprobs = []
        if p.logprobs is not None and token not in job.output.stop_ids:
            lp = logits.log_softmax(-1)
            top = lp.topk(p.logprobs) if p.logprobs else None
            pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
            logprobs.append(TokenLogprob(token, float(lp[token]), pairs))
        job.counts[token] += 1
        self.generated += 1
        job.next_token = token
        job.sampled.append(token)
        text = job.output.add(token)
        if not job.output.done and len(job.output.ids) >= p.max_tokens:
            text += job.output.finish("length")
        self._outbox.append((job, Event(text, logprobs, job.output.finish_reason if job.output.done else None)))

    @staticmethod
    def _adjust(job: Job, logits: torch.Tensor) -> None:
        """The job's logit bias and presence/frequency penalties (OpenAI's definitions) applied to its row [V] in
        place."""
        p = job.params
        if job.bias is not None:
            ids, values = (t.to(logits.device) for t in job.bias)
            logits.index_put_((ids,), values.to(logits.dtype), accumulate=True)
        if job.counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(job.counts), device=logits.device)
            counts = torch.tensor(list(job.counts.values()), dtype=logits.dtype, device=logits.device)
            logits.index_put_((ids,), logits[ids] - p.presence_penalty - p.frequency_penalty * counts)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        hand_over(self.deliver, outbox)

    def _drop_finished(self) -> None:
        self._remove(self._gone)

    def _drop_cancelled(self) -> None:
        self._remove(lambda j: j.cancelled and self._gone(j))

    def _gone(self, job: Job) -> bool:
        if job.cancelled and not job.output.done:
            self.cancelled += 1
        return job.cancelled or job.output.done

    def _remove(self, gone: Callable[[Job], bool]) -> None:
        """Free the rows of finished jobs, moving the last live row into each hole so live rows stay in front."""
        i = 0
        while i < len(self.active):
            if not gone(self.active[i]):
                i += 1
                continue
            done = self.active[i]
            if self.prefix is not None and done.output.done and self._keepable(len(done.prompt)):
                self._keep(i, (done.prompt + done.sampled)[: done.length])  # the next turn of a chat begins so
            last = len(self.active) - 1
            if i != last:
                moved, cache = self.active[last], self.cache
                n = moved.length
                cache.k[:, i, :, :n] = cache.k[:, last, :, :n]
                cache.v[:, i, :, :n] = cache.v[:, last, :, :n]
                cache.seen[i] = cache.seen[last]
                if cache.alpha is not None:
                    cache.alpha[i] = cache.alpha[last]
                self.active[i] = moved
            self.active.pop()

    def _fail_all(self, message: str, admitted: list[Job]) -> None:
        """End every running job, and those admitted but not yet running (a failed prefill), with an error. The
        events go the way every event goes (`deliver` hands them to the server's event loop, thread-safely)."""
        for job in [*self.active, *admitted]:
            if not job.output.done:
                job.output.done = True
                self._outbox.append((job, Event(message, [], "error")))
        self.active.clear()
        self._admitting = 0
        self._flush()
