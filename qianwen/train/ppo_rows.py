"""How PPO's models read a step's replies: one row per prompt holding the prompt once and each of its replies
after it, or one row per reply.

Every pass of a PPO step (the reward, the reference, old and new log-probabilities and values) reads the same
prompts and replies. With `samples_per_prompt` replies to a prompt, a row holds a trunk (the prompt and the
tokens every reply begins with) and then each reply's rest as a branch under `branch_mask`, so the trunk runs
once for all of them; the tiny recipe's prompts are about as long as its replies. A reply token's
log-probability is read from the state before it: the previous token of its reply, or the prompt's last token
for its first. The outputs are laid out as the replies' own rows (`Rollout.tokens`, `Rollout.mask`), so the rest
of PPO sees no difference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qianwen.generate import common_prefix
from qianwen.model import branch_mask


@dataclass
class Rows:
    """What a model runs for some of a step's replies, and where each reply token's predicting state lies."""

    ids: torch.Tensor  # [G, T]: the tokens run, one row per prompt (shared) or per reply
    tree: torch.Tensor | None  # [G, T, T] branch mask where a row holds several replies; None: causal rows
    source: torch.Tensor  # [N, L-1]: for each target token of the replies' rows, its predicting state's column
    last: torch.Tensor  # [G, k]: the column of each reply's last token (what the reward model reads)

    @property
    def per_row(self) -> int:
        return len(self.source) // len(self.ids)

    def read(self, states: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """From per-column outputs [G, T, ...] of a model run on `ids`, those before the targets `where` [N, L-1]
        (a bool mask over the replies' rows), in row-major order: what `outputs_of_reply_rows[where]` would be."""
        reply_row = torch.arange(len(self.source), device=where.device)[:, None].expand_as(where)
        return states[reply_row[where] // self.per_row, self.source[where]]


@dataclass
class Layout:
    """All of a step's replies as Rows, and the Rows of any whole prompts' replies."""

    rows: Rows

    @property
    def per_row(self) -> int:
        """Replies per row: samples_per_prompt when shared, else 1."""
        return self.rows.per_row

    @classmethod
    def build(cls, replies: list[list[int]], prompt_lengths: list[int], per_prompt: int, share: bool, pad_id: int):
        """`replies[n]` = prompt + reply (the reply never empty), consecutive runs of `per_prompt` replies sharing
        a prompt; with share=False each reply is a row of its own. A shared row's trunk is the prompt and the
        tokens all its replies begin with (samples of one policy often start alike: 13 of the tiny recipe's 28
        reply tokens a pair), so each reply's branch holds only the rest; a reply the others extend ends inside
        the trunk and has no branch."""
        k = per_prompt if share else 1
        width = max(map(len, replies))
        groups = [range(g, g + k) for g in range(0, len(replies), k)]
        rows, sources, last = [], torch.zeros((len(replies), width - 1), dtype=torch.long), []
        for group in groups:
            p = prompt_lengths[group[0]]
            tails = [replies[n][p:] for n in group]
            c = min(common_prefix(tails[0], tail) for tail in tails) if share else 0
            ids, segments = replies[group[0]][: p + c], [0] * (p + c)
            ends = []
            for b, (n, tail) in enumerate(zip(group, tails)):
                # the column of each reply token: in the trunk, then in its own branch
                columns = list(range(p, p + c)) + list(range(len(ids), len(ids) + len(tail) - c))
                ids, segments = ids + tail[c:], segments + [b + 1] * (len(tail) - c)
                # a target's predicting state: the previous reply token's column, the prompt's last for the first
                sources[n, p - 1 : p - 1 + len(tail)] = torch.tensor([p - 1] + columns[:-1])
                ends.append(columns[-1])
            rows.append((ids, segments))
            last.append(ends)
        T = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        segments = torch.full((len(rows), T), -1, dtype=torch.long)
        for r, (row, segs) in enumerate(rows):
            ids[r, : len(row)], segments[r, : len(row)] = torch.tensor(row), torch.tensor(segs)
        tree = branch_mask(segments) if share else None
        return cls(Rows(ids, tree, sources, torch.tensor(last)))

    def select(self, replies: torch.Tensor) -> Rows:
        """The Rows of `replies` (indices of the step's replies), which must be whole prompts' runs in order."""
        k = self.per_row
        groups = replies[::k] // k
        if len(replies) != len(groups) * k or not torch.equal(
            replies, (groups[:, None] * k + torch.arange(k)).flatten()
        ):
            raise ValueError("a shared-prompt row's replies are read together: select whole prompts' replies.")
        rows = self.rows
        tree = rows.tree[groups] if rows.tree is not None else None
        return Rows(rows.ids[groups], tree, rows.source[replies], rows.last[groups])

    def to(self, device) -> Layout:
        rows = self.rows
        tree = rows.tree.to(device) if rows.tree is not None else None
        return Layout(Rows(rows.ids.to(device), tree, rows.source.to(device), rows.last.to(device)))
