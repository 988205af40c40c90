"""What flows through one PPO step, in order: the RL prompt rows (``rl_prompts.jsonl`` read with one-line errors,
the deterministic order they are used in, their rollout micro-batches and seeds, and the ``RewardInput`` of a response
to one), the ``Sample`` a rollout engine returns, the ``Rollout`` record of a step's micro-batches in flight, and the
typed ``Batch``: the one thing the step passes from phase to phase. No Ray in here.

A ``Batch`` has one row per response. Each field has a kind, which says how rows are cut, trimmed and joined:

  sequence  ``[B, L]``  prompt + response, right padded          (``input_ids``, ``attention_mask``)
  row       ``[B]``     one value per response                    (``prompt_lens``, ``group``, ``finished``, and once
                        the rewards are in ``scores`` and ``dropped``)
  token     ``[B, R]``  one value per response token, 0 on padding (``response_ids``, ``response_mask`` and every
                        log-prob, value, KL, advantage and weight added on the way to the gradient)
  info      ``list``    one Python object per row, driver side only (``samples``, and ``results``: each row's
                        ``RewardResult``, as OpenRLHF's ``Experience.info``); the learner ranks get ``for_learner()``

The fields after ``rollout_logprobs`` are ``None`` until a phase fills them: the learner ranks add
``behaviour_logprobs``, ``old_logprobs`` (unless the training forward supplies them), ``ref_logprobs`` (not with a
zero KL coefficient) and ``values``; the reward plane ``scores``, ``dropped`` and ``results`` (``with_rewards``); the
driver ``kl``, ``advantages``, ``returns``, ``rollout_weights`` and ``loss_mask``
(``medrl.ppo.algos.advantages_and_weights``).
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medrl.errors import UsageError
from medrl.jsonl import read_jsonl
from medrl.models.chat import conversation
from medrl.models.generation import Sample
from medrl.reward.types import RewardInput, RewardResult

SEQUENCE, ROW, TOKEN, INFO = "sequence", "row", "token", "info"


# --------------------------------------------------------------------------- RL prompts
def load_prompts(path: Path) -> list[dict]:
    """Rows of ``rl_prompts.jsonl`` (id, prompt, reference, risk, source, language, category, expected_behavior,
    messages, rubrics, example_tags)."""
    rows = read_jsonl(path, ("id", "prompt"), "run `medrl prepare` first (same config) to write the RL prompts")
    if not rows:
        raise UsageError(f"{path}: no RL prompts")
    return rows


def prompts_at(rows: list[dict], position: int, count: int, seed: int) -> list[dict]:
    """``count`` prompts starting at global ``position`` of an endless stream: every epoch (pass over ``rows``) is a
    fresh shuffle seeded by (seed, epoch), so the order depends on the position alone (exact resume)."""
    n = len(rows)
    out = []
    for pos in range(position, position + count):
        order = list(range(n))
        random.Random(seed * 7919 + pos // n).shuffle(order)
        out.append(rows[order[pos % n]])
    return out


def micro_batches(texts: list[str], size: int, seed: int, step_no: int
                  ) -> tuple[list[list[tuple[int, str]]], list[int]]:
    """Rendered prompts in rollout micro-batches of ``size`` ``(index, text)`` pairs, and one sampling seed per
    micro-batch from (run seed, step, micro-batch): the same step draws the same samples after a resume."""
    indexed = list(enumerate(texts))
    chunks = [indexed[start:start + size] for start in range(0, len(indexed), size)]
    return chunks, [(seed * 1_000_003 + step_no * 1_009 + c) % 2**31 for c in range(len(chunks))]


def prompt_turns(record: dict) -> list[dict]:
    """The conversation a policy answers for an RL prompt row (its turns, the last one its ``prompt``)."""
    return conversation(record, record["prompt"])


def reward_input(record: dict, step_no: int, sample_index: int, response: str) -> RewardInput:
    """What the reward plane gets for one response to ``record`` (id ``prompt-id:step:sample``): a conversation
    row brings its turns as the policy saw them, and its rubric."""
    return RewardInput(id=f"{record['id']}:{step_no}:{sample_index}", prompt=record["prompt"], response=response,
                       reference=record.get("reference"), risk=record.get("risk") or "low",
                       expected_behavior=record.get("expected_behavior"), language=record.get("language"),
                       label=record.get("label"), options=record.get("options"),  # ground truth for the verifier
                       messages=tuple(prompt_turns(record)) if record.get("messages") else None,
                       rubrics=tuple(record["rubrics"]) if record.get("rubrics") else None)


# --------------------------------------------------------------------------- samples and the batch
def _kind(kind: str, optional: bool = False):
    return field(default=None, metadata={"kind": kind}) if optional else field(metadata={"kind": kind})


@dataclass
class Batch:
    input_ids: torch.Tensor = _kind(SEQUENCE)
    attention_mask: torch.Tensor = _kind(SEQUENCE)
    prompt_lens: torch.Tensor = _kind(ROW)
    group: torch.Tensor = _kind(ROW)
    """``Sample.prompt_index`` of each row: the rows of one prompt form a GRPO/RLOO group."""
    finished: torch.Tensor = _kind(ROW)
    """bool: the response ended by itself (not cut at ``max_new_tokens``)."""
    response_ids: torch.Tensor = _kind(TOKEN)
    response_mask: torch.Tensor = _kind(TOKEN)
    """1.0 on response tokens the policy sampled (float: it weights token sums); 0 on padding and on a
    consultation's patient turns (``Sample.policy_mask``), which are context, never trained on or compared."""
    rollout_logprobs: torch.Tensor = _kind(TOKEN)
    """The rollout engine's log-probs of the sampled tokens."""
    samples: list[Sample] | None = _kind(INFO, optional=True)
    """The rows' ``Sample``s (text, indices, a consultation's dialogue): for ``samples.jsonl``."""
    scores: torch.Tensor | None = _kind(ROW, optional=True)
    """The reward plane's R of each row (float32, as the advantages read it)."""
    dropped: torch.Tensor | None = _kind(ROW, optional=True)
    """bool: the reward plane left the row unscored (``RewardResult.dropped``): out of its group and the loss."""
    results: list[RewardResult] | None = _kind(INFO, optional=True)
    """Each row's ``RewardResult`` (components, judge status, cost): the step's reward metrics and samples."""
    old_logprobs: torch.Tensor | None = _kind(TOKEN, optional=True)
    """Live learner weights before the update: the proximal policy the PPO ratio is clipped around. None when the
    update is one optimizer step without a critic and the samples are stale (``proximal_pass_needed``): the
    training forward's own log-probs, detached, are then the proximal ones."""
    behaviour_logprobs: torch.Tensor | None = _kind(TOKEN, optional=True)
    """The learner's log-probs under the adapter version that drew the sample (= old without async rollout)."""
    ref_logprobs: torch.Tensor | None = _kind(TOKEN, optional=True)
    """Adapter disabled: the reference policy of the KL penalty."""
    values: torch.Tensor | None = _kind(TOKEN, optional=True)
    kl: torch.Tensor | None = _kind(TOKEN, optional=True)
    advantages: torch.Tensor | None = _kind(TOKEN, optional=True)
    returns: torch.Tensor | None = _kind(TOKEN, optional=True)
    rollout_weights: torch.Tensor | None = _kind(TOKEN, optional=True)
    """The rollout correction's per-token weight of ``pi_behaviour / pi_engine`` (``ppo.rollout_correction``; None
    with mode ``none``)."""
    loss_mask: torch.Tensor | None = _kind(TOKEN, optional=True)
    """The response tokens the losses see: ``response_mask`` without the truncated responses under
    ``ppo.mask_truncated``."""
    pad_id: int = field(default=0, metadata={"kind": None})
    """Token id in the padding of ``input_ids`` / ``response_ids`` (masked out everywhere it is read)."""

    @classmethod
    def pack(cls, samples: list[Sample], pad_id: int) -> "Batch":
        """Right-padded tensors from samples, in their order, the samples kept with their rows; ``rollout_logprobs`` 0
        where samples carry none."""
        n = len(samples)
        width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
        resp_width = max(max(len(s.response_ids) for s in samples), 1)
        batch = cls(input_ids=torch.full((n, width), pad_id, dtype=torch.long),
                    attention_mask=torch.zeros(n, width, dtype=torch.long),
                    prompt_lens=torch.tensor([len(s.prompt_ids) for s in samples], dtype=torch.long),
                    group=torch.tensor([s.prompt_index for s in samples], dtype=torch.long),
                    finished=torch.tensor([s.finished for s in samples], dtype=torch.bool),
                    response_ids=torch.full((n, resp_width), pad_id, dtype=torch.long),
                    response_mask=torch.zeros(n, resp_width, dtype=torch.float32),
                    rollout_logprobs=torch.zeros(n, resp_width, dtype=torch.float32), samples=list(samples),
                    pad_id=pad_id)
        for i, s in enumerate(samples):
            seq = s.prompt_ids + s.response_ids
            batch.input_ids[i, :len(seq)] = torch.tensor(seq)
            batch.attention_mask[i, :len(seq)] = 1
            r = len(s.response_ids)
            batch.response_ids[i, :r] = torch.tensor(s.response_ids)
            batch.response_mask[i, :r] = torch.tensor(s.policy_mask, dtype=torch.float32) if s.policy_mask else 1
            if s.logprobs:
                batch.rollout_logprobs[i, :r] = torch.tensor(s.logprobs)
        return batch

    # ------------------------------------------------------------------ fields
    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["kind"] not in (None, INFO) and getattr(self, f.name) is not None}

    def replace(self, **fields) -> "Batch":
        """A copy with these fields set (the tensors are shared, not copied)."""
        return dataclasses.replace(self, **fields)

    def with_rewards(self, results: list[RewardResult]) -> "Batch":
        """The rows with their rewards (``results`` in row order): ``scores``, ``dropped`` and the results."""
        return self.replace(scores=torch.tensor([r.reward for r in results]),
                            dropped=torch.tensor([r.dropped for r in results], dtype=torch.bool), results=list(results))

    def for_learner(self) -> "Batch":
        """The tensors only: the learner ranks never read the samples or reward results."""
        return self.replace(**{f.name: None for f in dataclasses.fields(self) if f.metadata["kind"] == INFO})

    def to(self, device: torch.device | str) -> "Batch":
        return self.replace(**{k: v.to(device) for k, v in self.tensors().items()})

    @property
    def seq_tokens(self) -> torch.Tensor:
        """Prompt + response tokens of each row ``[B]``: what a forward pass over the row costs."""
        return self.attention_mask.sum(1)

    # ------------------------------------------------------------------ rows
    def take(self, rows: torch.Tensor) -> "Batch":
        """These rows, in this order, with the padding columns they do not need trimmed off."""
        width = int(self.seq_tokens[rows].max()) if len(rows) else 0
        resp_width = max(int((self.seq_tokens[rows] - self.prompt_lens[rows]).max()) if len(rows) else 0, 1)
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["kind"] is None or value is None:
                continue
            if f.metadata["kind"] == INFO:
                out[f.name] = [value[i] for i in rows.tolist()]
                continue
            value = value[rows]
            out[f.name] = value[:, :width] if f.metadata["kind"] == SEQUENCE else \
                value[:, :resp_width] if f.metadata["kind"] == TOKEN else value
        return self.replace(**out)

    def shard_rows(self, n_shards: int) -> list[torch.Tensor]:
        """Row indices (ascending) of ``n_shards`` shards of exactly ``len(self) / n_shards`` rows each, their
        prompt + response token counts balanced: every learner rank must run the same number of micro-batches and
        optimizer steps (DeepSpeed and DDP collectives pair up call by call), and no rank should wait for one that
        got all the long responses. Greedy: longest row first, onto the shard with the fewest tokens that has room
        (ties: the lower shard index). One shard: the rows in their order."""
        n = len(self)
        if n % n_shards:
            raise ValueError(f"{n} rows do not split into {n_shards} equal shards")
        if n_shards == 1:
            return [torch.arange(n)]
        size = n // n_shards
        tokens = self.seq_tokens.tolist()
        shards: list[list[int]] = [[] for _ in range(n_shards)]
        load = [0] * n_shards
        for row in sorted(range(n), key=lambda i: (-tokens[i], i)):
            k = min((k for k in range(n_shards) if len(shards[k]) < size), key=lambda k: (load[k], k))
            shards[k].append(row)
            load[k] += tokens[row]
        return [torch.tensor(sorted(rows), dtype=torch.long) for rows in shards]

    def put_rows(self, rows: list[torch.Tensor], parts: list[dict[str, torch.Tensor]]) -> "Batch":
        """A copy with the token fields computed shard by shard (``parts[k]``: fields of the rows ``rows[k]``, as wide as
        that shard's longest response) put back at their rows, 0 past each row's width."""
        out = {}
        for name in parts[0]:
            full = torch.zeros(len(self), self.response_ids.shape[1], dtype=parts[0][name].dtype)
            for shard_rows, part in zip(rows, parts):
                full[shard_rows, :part[name].shape[1]] = part[name]
            out[name] = full
        return self.replace(**out)


@dataclass
class Rollout:
    """The rollout micro-batches of one step: dispatched to the engines (``pending``: call -> chunk index), each
    handed to the reward pool as it finishes; ``batch`` once all are in."""

    step_no: int
    records: list[dict]
    end_position: int  # data position after this step's prompts
    version: int  # adapter version sampling it
    adapter_ref: object  # an ObjectRef to its tensors: kept alive while a restarted engine may need them
    pending: dict
    started: float
    # filled as micro-batches finish: samples, their reward inputs and reward calls (already submitted)
    samples: list[Sample] = field(default_factory=list)
    reward_inputs: list[RewardInput] = field(default_factory=list)
    reward_refs: list = field(default_factory=list)
    restarts: int = 0
    actor_generate_s: float = 0.0
    finished: float = 0.0
    batch: Batch | None = None

    def add(self, out: dict, restarted: bool, reward_inputs: list[RewardInput], reward_refs: list) -> None:
        """A finished micro-batch (an engine's ``generate`` answer, ``restarted``: by a new actor): its samples,
        timings, their reward inputs and the reward calls already submitted."""
        self.restarts += restarted
        self.actor_generate_s += out["generate_s"]
        self.samples += out["samples"]
        self.reward_inputs += reward_inputs
        self.reward_refs += reward_refs
        self.finished = time.perf_counter()

    def pack(self, pad_id: int) -> None:
        """Samples (and their reward inputs and calls) ordered by (prompt, sample), whatever order the micro-batches
        finished in; their tensors in ``batch``."""
        key = [(s.prompt_index, s.sample_index) for s in self.samples]
        order = sorted(range(len(key)), key=key.__getitem__)
        self.samples, self.reward_inputs, self.reward_refs = (
            [xs[i] for i in order] for xs in (self.samples, self.reward_inputs, self.reward_refs))
        self.batch = Batch.pack(self.samples, pad_id)
