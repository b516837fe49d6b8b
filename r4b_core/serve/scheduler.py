"""Which sequences run in the next engine step, and which KV blocks they hold (no tensors here).

One step = one batched decode forward over every running sequence that has a single pending token, plus
prefill chunks of the sequences still prefilling (oldest first; the engine runs them as one packed forward),
sized so that decode tokens + chunk tokens stay within ``token_budget``. So a long prompt is prefilled a chunk
per step while the running streams keep decoding (chunked prefill), instead of stalling them for its whole
prefill, and short prompts admitted together are all prefilled in their first step (the next decode batch is
full at once).

A sequence's state is ``token_ids`` (prompt, then the generated tokens) and ``num_computed`` (positions
whose K/V are in its blocks). ``pending = len(token_ids) - num_computed``: 1 means "decode the last token",
more means "prefill"; a fresh request starts with pending = its prompt minus the cached prefix.

Admission (FIFO, at most ``max_running`` sequences): the longest run of full blocks whose content hash is
in the prefix cache is taken as computed; blocks for the rest of the prompt are allocated at once, so a
request is admitted only when its whole prompt fits. Growth: a decoding sequence gets a new block when its
next position starts one. When no block is free (after evicting unreferenced cached blocks), the most
recently admitted running sequence is preempted: its blocks go back to the pool (their full blocks stay
in the prefix cache) and it returns to the head of the queue with everything generated so far, to be
recomputed as a longer prompt (vLLM's recompute preemption). Nothing is lost; a request that would not
fit the pool alone is refused at submit time (``Engine.check_request``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from r4b_core.models.paged_kv_cache import blocks_for_tokens
from r4b_core.serve.block_pool import BlockPool, block_hashes


@dataclass(eq=False)
class Sequence:
    """The engine's state of one request (``request`` is its EngineRequest)."""

    request: Any
    token_ids: list[int]
    prompt_len: int
    image_starts: dict[int, bytes] = field(default_factory=dict)  # position -> image digest
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # digests of its full blocks, in order
    registered: int = 0  # full blocks already offered to the prefix cache
    preemptions: int = 0
    cached_tokens: int = 0  # prompt positions found in the prefix cache at the last admission
    prompt_logits: list = field(default_factory=list)  # per-chunk logits [T_chunk, V] (prompt_logprobs only)

    @property
    def pending(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass
class StepPlan:
    decode: list[Sequence]
    # (sequence, end): each chunk is token_ids[sequence.num_computed:end]
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)


class Scheduler:
    def __init__(self, pool: BlockPool, *, max_running: int, token_budget: int) -> None:
        self.pool, self.max_running, self.token_budget = pool, max_running, token_budget
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order
        self.preemptions = 0

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    # ------------------------------------------------------------------------------------------
    def _hashes(self, seq: Sequence) -> list[bytes]:
        """Digests of every full block of ``seq.token_ids`` (extends the ones already computed)."""
        n_full = len(seq.token_ids) // self.block_size
        if len(seq.hashes) < n_full:
            parent = seq.hashes[-1] if seq.hashes else b""
            seq.hashes += block_hashes(seq.token_ids, self.block_size, seq.image_starts, len(seq.hashes), parent)
        return seq.hashes

    def _try_admit(self, seq: Sequence) -> bool:
        # the last token is never taken from the cache: its logits are what the prefill is for
        full = (len(seq.token_ids) - 1) // self.block_size
        if getattr(seq.request, "prompt_logprobs", None) is not None:
            full = 0  # every prompt position's logits are wanted: nothing may be skipped
        hit = self.pool.match(self._hashes(seq)[:full])
        need = blocks_for_tokens(len(seq.token_ids), self.block_size) - len(hit)
        if need > self.pool.num_free:
            self.pool.free(hit)
            return False
        seq.blocks = hit + self.pool.allocate(need)
        seq.num_computed = len(hit) * self.block_size
        seq.registered = len(hit)
        seq.cached_tokens = seq.num_computed
        return True

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into ``running`` while they fit (FIFO: the head blocks the rest)."""
        admitted = []
        while self.waiting and len(self.running) < self.max_running:
            if not self._try_admit(self.waiting[0]):
                break
            seq = self.waiting.popleft()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _preempt_one(self, keep: Sequence) -> Sequence | None:
        """Preempt the most recently admitted running sequence other than ``keep`` (or ``keep`` itself
        when it is alone)."""
        victims = [s for s in self.running if s is not keep] or [keep]
        victim = victims[-1]
        self.release(victim)
        victim.num_computed, victim.preemptions = 0, victim.preemptions + 1
        victim.prompt_logits = []
        self.preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def plan(self) -> tuple[StepPlan, list[Sequence]]:
        """The next step's work, and the sequences preempted to make room for it."""
        preempted: list[Sequence] = []
        decode: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running or seq.pending != 1:
                continue
            while seq in self.running and seq.num_computed // self.block_size >= len(seq.blocks):
                if self.pool.num_free:
                    seq.blocks += self.pool.allocate(1)
                else:
                    preempted.append(self._preempt_one(seq))
            if seq in self.running:
                decode.append(seq)
        decode = [s for s in decode if s in self.running]
        plan = StepPlan(decode)
        room = max(self.token_budget - len(decode), 0)
        for seq in self.running:
            if room <= 0:
                break
            if seq.pending > 1:
                end = min(len(seq.token_ids), seq.num_computed + room)
                plan.prefills.append((seq, end))
                room -= end - seq.num_computed
        return plan, preempted

    def computed(self, seq: Sequence, n: int) -> None:
        """``n`` more positions of ``seq`` are in its blocks; offer newly full blocks to the prefix cache."""
        seq.num_computed += n
        full = min(seq.num_computed, len(seq.token_ids)) // self.block_size
        if full > seq.registered:
            hashes = self._hashes(seq)
            for b in range(seq.registered, min(full, len(hashes))):
                self.pool.register(seq.blocks[b], hashes[b])
            seq.registered = min(full, len(hashes))

    def release(self, seq: Sequence, *, forget: bool = False) -> None:
        """Give ``seq``'s blocks back (finished, cancelled or preempted) and drop it from ``running``."""
        if seq in self.running:
            self.running.remove(seq)
        self.pool.free(seq.blocks, forget=forget)
        seq.blocks, seq.registered = [], 0
