"""How PPO's models read a step's replies: one row per prompt holding the prompt once and each of its replies
after it, or one row per reply.

Every pass of a PPO step (the reward, the reference, old and new log-probabilities and values) reads the same
prompts and replies. With `samples_per_prompt` replies to a prompt, laying each prompt's replies out as branches
of one row (the prompt, then reply 1, reply 2, ... under `branch_mask`) runs the prompt once for all of them;
the tiny recipe's prompts are about as long as its replies. A reply token's log-probability is read from the
state before it: the previous token of its branch, or the prompt's last token for its first. The outputs are
laid out as the replies' own rows (`Rollout.tokens`, `Rollout.mask`), so the rest of PPO sees no difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    per_row: int  # replies per row: samples_per_prompt when shared, else 1

    @classmethod
    def build(cls, replies: list[list[int]], prompt_lengths: list[int], per_prompt: int, share: bool, pad_id: int):
        """`replies[n]` = prompt + reply (the reply never empty), consecutive runs of `per_prompt` replies sharing
        a prompt; with share=False each reply is a row of its own."""
        k = per_prompt if share else 1
        width = max(map(len, replies))
        groups = [range(g, g + k) for g in range(0, len(replies), k)]
        rowlen = [prompt_lengths[g[0]] + sum(len(replies[n]) - prompt_lengths[n] for n in g) for g in groups]
        T = max(rowlen)
        ids = torch.full((len(groups), T), pad_id, dtype=torch.long)
        segments = torch.full((len(groups), T), -1, dtype=torch.long)
        source = torch.zeros((len(replies), width - 1), dtype=torch.long)
        last = torch.zeros((len(groups), k), dtype=torch.long)
        for r, group in enumerate(groups):
            p = prompt_lengths[group[0]]
            ids[r, :p] = torch.tensor(replies[group[0]][:p])
            segments[r, :p] = 0
            end = p
            for b, n in enumerate(group):
                reply = replies[n][p:]
                ids[r, end : end + len(reply)] = torch.tensor(reply)
                segments[r, end : end + len(reply)] = b + 1 if share else 0
                # targets p-1 .. p+len-2 of the reply's own row: the prompt's last state, then its own tokens
                source[n, p - 1] = p - 1
                source[n, p : p + len(reply) - 1] = torch.arange(end, end + len(reply) - 1)
                end += len(reply)
                last[r, b] = end - 1
        return cls(Rows(ids, branch_mask(segments) if share else None, source, last), k)

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
        return Layout(Rows(rows.ids.to(device), tree, rows.source.to(device), rows.last.to(device)), self.per_row)
