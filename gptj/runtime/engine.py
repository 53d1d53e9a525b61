"""The one generation engine behind the CLI, the Python API and the server: requests join and
leave a running batch at every step (continuous batching), each from submit() to its Completion.

A newcomer's prompt is prefilled in chunks between decode steps, so it does not stall the others
for long. Which cache row it takes, and how much of its prompt is already there, is the row
table's choice (gptj.runtime.rows); who steps, and in which thread, is driving's
(gptj.runtime.driving).
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gptj.device import module_device
from gptj.errors import InvalidRequest, QueueFull, ShuttingDown
from gptj.runtime import constraints, healing, runner
from gptj.runtime import speculative as speculation
from gptj.runtime.driving import Driving
from gptj.runtime.kv_cache import KVCache
from gptj.runtime.prefix_cache import DEFAULT_BYTES as PREFIX_STORE_BYTES
from gptj.runtime.prefix_cache import PrefixStore
from gptj.runtime.request import Completion, RequestHandle, StreamEvent, TokenInfo, _Request
from gptj.runtime.rows import Rows
from gptj.runtime.sampling import SamplingParams, apply_penalties, choose_token
from gptj.runtime.stops import StopMatcher
from gptj.tokenizer import StreamDecoder, Tokenizer


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 1,
        context_length: int | None = None,
        kv_dtype: torch.dtype = torch.float32,
        banned_token_ids: Sequence[int] = (),
        eos_token_ids: Sequence[int] = (),
        prefill_chunk: int = 512,
        max_queue: int = 64,
        prefix_cache: bool = True,
        prefix_cache_bytes: int = PREFIX_STORE_BYTES,
        speculative: str = "ngram",
        speculative_tokens: int = speculation.DEFAULT_TOKENS,
    ) -> None:
        if speculative not in speculation.MODES:
            raise ValueError(f"speculative: {speculative!r}; expected one of {', '.join(speculation.MODES)}")
        if not 1 <= speculative_tokens <= speculation.MAX_TOKENS:
            raise ValueError(f"speculative_tokens: {speculative_tokens}; expected 1..{speculation.MAX_TOKENS}")
        cfg = model.config
        self.model, self.tokenizer = model, tokenizer
        self.context_length = min(context_length or cfg.context_length, cfg.context_length)
        self.max_batch, self.prefill_chunk, self.max_queue = max_batch, prefill_chunk, max_queue
        self.kv_dtype = kv_dtype
        self.device = module_device(model)  # the KV cache and the inputs go where the weights are
        self.banned = torch.tensor(sorted(banned_token_ids), dtype=torch.long)
        self.eos_ids = {tokenizer.eos_token_id, *eos_token_ids}
        self.cache: KVCache | None = None  # allocated on first use
        # Prefix caching: rows keep their tokens for later requests (when enabled), and what a
        # row held moves to the store when another request takes the row.
        store = PrefixStore(prefix_cache_bytes) if prefix_cache and prefix_cache_bytes > 0 else None
        self.rows = Rows(max_batch, reuse=prefix_cache, store=store)
        self.active: list[_Request] = []
        self.waiting: queue.Queue[_Request] = queue.Queue()
        self.lock = threading.Lock()  # for in_flight and draining
        self.driving = Driving(self)
        self.draining = False  # shutting down: new requests are refused
        self.in_flight = 0  # submitted and not finished (the batch plus the queue), under `lock`
        # Speculative decoding (gptj.runtime.speculative): a lone decoding request drafts tokens
        # by prompt lookup and one pass checks them, where that pass gives every token the bits
        # of a one-token step (runner.exact_multi_token), so the text is the same with it off.
        self.speculative, self.speculative_tokens = speculative, speculative_tokens
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "cached_prompt_tokens": 0,
                      "drafted_tokens": 0, "accepted_tokens": 0}
        self.finish_reasons: dict[str, int] = {}  # finished requests by finish_reason
        self.token_times: deque[float] = deque(maxlen=200_000)  # when recent tokens were sampled

    @property
    def prefix_store(self) -> PrefixStore | None:
        return self.rows.store

    # ---- submitting -------------------------------------------------------------------------

    def prepare_prompt(self, prompt_ids: Sequence[int], params: SamplingParams) -> tuple[list[int], int]:
        """Checks that prompt + max_new_tokens fits the context; left-truncates when asked."""
        ids = list(prompt_ids)
        if not ids:
            raise InvalidRequest("prompt", "must not be empty")
        budget = self.context_length - params.max_new_tokens
        if budget < 1:
            raise InvalidRequest(
                "max_new_tokens",
                f"{params.max_new_tokens} leaves no room for the prompt in the context window of {self.context_length} tokens",
            )
        if len(ids) > budget:
            if not params.truncate_prompt:
                raise InvalidRequest(
                    "prompt",
                    f"{len(ids)} prompt tokens + {params.max_new_tokens} new tokens exceed the context window "
                    f"of {self.context_length} tokens (shorten the prompt, lower max_new_tokens, or allow truncation)",
                )
            # a model that expects BOS first keeps it (the text's start is what goes)
            tok = self.tokenizer
            keep = int(budget > 1 and tok.add_bos_token and ids[0] == tok.bos_token_id)
            return ids[:keep] + ids[len(ids) - budget + keep :], len(ids) - budget
        return ids, 0

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, timeout: float | None = None,
        cache_scope: str | None = None,
    ) -> RequestHandle:
        """Queues a request. `timeout`: seconds from now (queueing included) after which it ends
        with finish_reason "timeout". `cache_scope`: cached prefixes are shared only with requests
        of the same scope (a server gives each API key and cache_salt its own). Raises QueueFull
        when `max_batch` requests are running and `max_queue` more are waiting, ShuttingDown
        while `shutdown()` runs."""
        params.validate()
        ids, truncated = self.prepare_prompt(prompt_ids, params)
        # constrained output (gptj.runtime.constraints): the schema compiled now, a bad one refused
        # before queueing; its first token must begin the JSON, so no healing
        wanted = params.json_schema is not None and params.json_schema is not False  # ({} is any JSON)
        constraint = constraints.start(self.tokenizer, params.json_schema) if wanted else None
        heal = healing.plan(self.tokenizer, ids, params) if constraint is None else None
        if heal is not None:  # the first token brings the removed text back (gptj.runtime.healing)
            ids = ids[:-1]
        request = _Request(ids, params, time.monotonic() + timeout if timeout else None, truncated, cache_scope)
        request.heal, request.constraint = heal, constraint
        if params.seed is not None:
            try:
                request.generator = torch.Generator().manual_seed(params.seed)
            except (RuntimeError, OverflowError, ValueError, TypeError):
                raise InvalidRequest("seed", f"{params.seed} is out of range (-2**63 to 2**64 - 1)") from None
        request.decoder = StreamDecoder(self.tokenizer)
        request.stops = StopMatcher(params.stop)
        with self.lock:  # the check and the count together: concurrent submits cannot overshoot
            if self.draining:
                raise ShuttingDown()
            if self.in_flight >= self.max_batch + self.max_queue:
                raise QueueFull(self.max_queue)
            self.in_flight += 1
        self.waiting.put(request)
        return RequestHandle(request, self)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a place in the batch (cancelled ones left out)."""
        with self.waiting.mutex:
            return sum(1 for r in self.waiting.queue if r is not None and not r.cancelled)

    @property
    def batch_size(self) -> int:
        return len(self.active)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Tokens sampled per second over the last `window` seconds, all requests together."""
        since = time.monotonic() - window
        times = list(self.token_times)
        return sum(1 for t in times if t >= since) / window

    def shutdown(self, grace: float = 10.0) -> None:
        """Refuses new requests (ShuttingDown), lets the running and queued ones finish for up to
        `grace` seconds, then ends the rest with finish_reason "shutdown". Every request gets
        its Completion. A later submit starts the engine again."""
        with self.lock:
            self.draining = True
        try:
            end = time.monotonic() + grace
            while self.in_flight and time.monotonic() < end:
                if not self.drive_once():
                    time.sleep(0.02)
            self.stop()  # a driver in run() ends what is left and lets go of the engine
            end = time.monotonic() + 30
            while self.driving.elsewhere() and time.monotonic() < end:
                time.sleep(0.01)
            if not self.driving.elsewhere():
                with self.driving.step_lock:
                    self.end_all("shutdown")
        finally:
            with self.lock:
                self.draining = False
                self.driving.stopping = False

    # ---- driving (gptj.runtime.driving) -------------------------------------------------------

    def drive_once(self) -> bool:
        """One step in the calling thread, unless a driver thread runs or another thread is
        stepping (then False: the caller waits for its events instead)."""
        return self.driving.once()

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Drives the engine in this thread until shutdown() (or stop()): `gptj serve` runs it in
        the main thread, start_background() in a thread of its own. `on_ready` is called once
        this thread is the driver (e.g. to start the web server that submits requests)."""
        self.driving.run(on_ready)

    def start_background(self) -> None:
        """Starts a thread that drives the engine (for servers made in Python), unless one runs."""
        if self.driving.start_background():
            # Stop the thread before the interpreter tears torch down: a thread killed inside
            # torch at exit aborts the process ("terminate called ...").
            atexit.register(_stop_at_exit, weakref.ref(self))

    def stop(self) -> None:
        """Makes run() return after its current step (running requests end with "shutdown")."""
        self.driving.stop()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` (a forward pass outside generation, e.g. Model.logits) in the driving
        thread between steps, so that torch work stays in one thread; returns its result."""
        return self.driving.call(fn)

    def wake(self) -> None:
        """Ends a driver's wait for requests in admit()."""
        self.waiting.put(None)  # type: ignore[arg-type]

    # ---- admitting and stepping ----------------------------------------------------------------

    def step(self) -> None:
        """One step of the batch; an error fails the batch, never the driver."""
        try:
            self._step()
        except Exception as exc:  # never let one bad step kill the server: fail the batch
            for r in self.active:
                self.rows.forget(r.row)
                self._finish(r, "error", error=f"{type(exc).__name__}: {exc}")
            self.active.clear()

    def end_all(self, reason: str) -> None:
        """Ends every running and waiting request, so that no client waits for ever."""
        for r in list(self.active):
            self._retire(r, "cancelled" if r.cancelled else reason)
        while True:
            try:
                r = self.waiting.get_nowait()
            except queue.Empty:
                return
            if r is not None:
                self._finish(r, "cancelled" if r.cancelled else reason)

    def _purge_waiting(self) -> None:
        """Ends waiting requests that were cancelled or ran out of time, freeing their places."""
        now = time.monotonic()
        with self.waiting.mutex:
            gone = [r for r in self.waiting.queue
                    if r is not None and (r.cancelled or r.deadline is not None and now > r.deadline)]
            for r in gone:
                self.waiting.queue.remove(r)
        for r in gone:
            self._finish(r, "cancelled" if r.cancelled else "timeout")

    def admit(self, block: bool) -> None:
        """Moves waiting requests into the batch while it has room; `block`: waits for one."""
        self._retire_ended()  # a cancelled request's row is free (and its prefix reusable) at once
        while len(self.active) < self.max_batch:
            try:
                request = self.waiting.get(block=block)
            except queue.Empty:
                return
            if request is None:
                return
            block = False
            if request.cancelled:
                self._finish(request, "cancelled")
                continue
            if request.deadline is not None and time.monotonic() > request.deadline:
                self._finish(request, "timeout")
                continue
            try:
                self._assign_row(request)
            except Exception as exc:  # e.g. no memory for the cache: fail this one, keep serving
                self._finish(request, "error", error=f"{type(exc).__name__}: {exc}")
                continue
            self.active.append(request)

    def allocate_cache(self) -> KVCache:
        """The KV cache for `max_batch` rows of `context_length` tokens, allocated now if it is
        not yet (a server does it at start: its memory is then in use before the first request,
        and a machine without it fails at once, not on that request)."""
        if self.cache is None:
            from gptj.runtime.kv_cache import check_kv_cache_fits

            cfg = self.model.config
            shape = (cfg.n_layer, self.max_batch, cfg.n_kv_heads, self.context_length, cfg.head_dim)
            check_kv_cache_fits(*shape, self.kv_dtype, self.device)  # a clear error, not a 20 GB allocation
            self.cache = KVCache(*shape, self.kv_dtype, self.device)
        return self.cache

    def _assign_row(self, r: _Request) -> None:
        self.allocate_cache()
        if r.params.prompt_logprobs is not None:
            r.prompt_infos = [TokenInfo(r.prompt_ids[0])]
        # with the prompt's logprobs, every prompt position's logits are wanted: computed anew
        row, reuse = self.rows.take({a.row for a in self.active}, r.prompt_ids, r.cache_scope, self.cache,
                                    full_prefill=r.prompt_infos is not None)
        r.row, r.prefilled, r.cached = row, reuse, reuse
        self.stats["cached_prompt_tokens"] += reuse
        self._prompt_done(r)

    def _retire_ended(self) -> None:
        """Retires running requests that were cancelled or ran out of time."""
        now = time.monotonic()
        for r in list(self.active):
            if r.cancelled:
                self._retire(r, "cancelled")
            elif r.deadline is not None and now > r.deadline:
                self._retire(r, "timeout")

    def _step(self) -> None:
        self._purge_waiting()
        self._retire_ended()
        prefilling = [r for r in self.active if r.prefilled < r.prefill_target]
        decoding = [r for r in self.active if r.prefilled >= r.prefill_target]
        if prefilling and self._ragged_step(prefilling[0], decoding):
            return
        if prefilling:
            self._prefill_chunk(prefilling[0])
        decoding = [r for r in self.active if r.prefilled >= r.prefill_target]
        if decoding:
            self._decode(decoding)

    def _ragged_step(self, r: _Request, decoding: list[_Request]) -> bool:
        """One pass for the batch's decode tokens and a chunk of a newcomer's prompt beside them
        (each token at its own row and position): the weights are read once, not once for the
        chunk and again for the batch. False (nothing done) where the fused step does not serve
        or the chunk's own logits are wanted (the prompt's logprobs)."""
        if r.prompt_infos is not None or self.device.type != "cpu":
            return False
        chunk, fold = self._next_chunk(r, len(decoding))
        runs = [(d.row, [d.next_input]) for d in decoding] + [(r.row, chunk)]
        wanted = list(range(len(decoding))) + ([len(decoding) + len(chunk) - 1] if fold else [])
        logits = self._forward_runs(runs, torch.tensor(wanted, dtype=torch.long))
        if logits is None:
            return False
        r.prefilled += len(chunk)
        self.rows.tokens[r.row].extend(chunk)
        self._prompt_done(r)
        if r.prefilled == len(r.prompt_ids) and not fold:  # max_new_tokens == 0: the prompt was all
            self._retire(r, "length")
        for i, d in enumerate(decoding):
            self._fed(d, d.next_input)
            self._accept(d, logits[i])
        if fold:
            self._accept(r, logits[len(decoding)])
        return True

    def _next_chunk(self, r: _Request, beside: int) -> tuple[list[int], bool]:
        """The prompt's next chunk, in a step with `beside` other tokens, and whether it also takes
        the prompt's last token, whose logits then give the first token: one pass over the weights
        fewer before it. Only where the fused step runs the whole step, which gives every token
        the bits of a one-token decode step, so the text is what the separate step would give."""
        end = min(r.prefilled + self.prefill_chunk, r.prefill_target)
        chunk = r.prompt_ids[r.prefilled : end]
        fold = (
            end == r.prefill_target == len(r.prompt_ids) - 1
            and r.prompt_infos is None
            and self.device.type == "cpu"
            and runner.exact_step(self.model, beside + len(chunk) + 1)
        )
        return ([*chunk, r.prompt_ids[-1]] if fold else chunk), fold

    def _forward_runs(self, runs: list[tuple[int, list[int]]], wanted: torch.Tensor) -> torch.Tensor | None:
        """One fused pass over runs of tokens, each (cache row, tokens) written at the row's next
        positions; the logits of the tokens at `wanted`, or None where the fused step does not serve."""
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        for row, tokens in runs:
            start = len(self.rows.tokens[row])
            ids += tokens
            positions += range(start, start + len(tokens))
            rows += [row] * len(tokens)
        return runner.forward_ragged(self.model, torch.tensor(ids), torch.tensor(positions), torch.tensor(rows),
                                     self.cache, wanted)

    def _prefill_chunk(self, r: _Request) -> None:
        start = r.prefilled
        chunk, fold = self._next_chunk(r, 0)
        ids = torch.tensor([chunk], device=self.device)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]
        # logits: the last token's where the chunk takes it, else only for the prompt's logprobs
        logits = runner.forward(self.model, ids, positions, self.cache, slice(r.row, r.row + 1), last_only=fold,
                                logits=fold or r.prompt_infos is not None)  # fmt: skip
        if logits is not None and not fold:
            self._add_prompt_logprobs(r, logits[0].cpu(), start)
        r.prefilled += len(chunk)
        self.rows.tokens[r.row].extend(chunk)
        self._prompt_done(r)
        if fold:
            assert logits is not None
            self._accept(r, logits[0, -1])
        elif r.prefilled == len(r.prompt_ids):  # max_new_tokens == 0: the prompt was all
            self._retire(r, "length")

    def _add_prompt_logprobs(self, r: _Request, logits: torch.Tensor, start: int) -> None:
        """Logprobs of the prompt tokens that the logits of positions start.. predict."""
        targets = r.prompt_ids[start + 1 : start + 1 + logits.shape[0]]
        if not targets:
            return
        logits = logits[: len(targets)]
        if self.banned.numel():
            logits[:, self.banned] = float("-inf")  # as for generated tokens
        logprobs = logits.log_softmax(-1)
        chosen = logprobs.gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
        top_n = r.params.prompt_logprobs or 0
        top = torch.topk(logprobs, top_n, dim=-1) if top_n else None
        for j, token in enumerate(targets):
            alternatives = list(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True)) if top is not None else []
            r.prompt_infos.append(TokenInfo(token, chosen[j], alternatives))

    def _prompt_done(self, r: _Request) -> None:
        """Sends the prompt's logprobs once they are all computed."""
        if r.prompt_infos is not None and not r.prompt_sent and r.prefilled >= r.prefill_target:
            r.prompt_sent = True
            r.send(StreamEvent("", [], prompt_logprobs=r.prompt_infos))

    def _decode(self, batch: list[_Request]) -> None:
        if self._speculate(batch):
            return
        lo = min(r.row for r in batch)
        hi = max(r.row for r in batch) + 1
        by_row = {r.row: r for r in self.active}
        ids = torch.zeros(hi - lo, 1, dtype=torch.long)
        positions = torch.zeros(hi - lo, 1, dtype=torch.long)
        for row in range(lo, hi):
            r = by_row.get(row)
            if r is None:  # a free row: write past the prefix it keeps for later requests
                positions[row - lo, 0] = self.rows.spare_position(row, self.context_length)
                continue
            # A decoding row feeds its last token (the prompt's last, then each generated one)
            # at the next free position; rows that are not decoding write a throwaway key
            # there, which their own next write overwrites.
            positions[row - lo, 0] = len(self.rows.tokens[row])
            if r in batch:
                ids[row - lo, 0] = r.next_input
        # sampling runs on the CPU (a no-op there): same seed, same draws on any device
        logits = runner.forward(self.model, ids.to(self.device), positions.to(self.device), self.cache,
                                slice(lo, hi)).cpu()
        for r in batch:
            self._fed(r, r.next_input)
            self._accept(r, logits[r.row - lo, -1])

    def _fed(self, r: _Request, token: int) -> None:
        """`token`, the request's next input, is in its cache row now."""
        self.rows.tokens[r.row].append(token)
        if not r.generated:  # the prompt's last token
            r.prefilled += 1

    def _speculate(self, batch: list[_Request]) -> bool:
        """One pass over each request's next input and the tokens drafted after it (a batch small
        enough that the pass stays bandwidth-bound: speculation.MAX_PASS_TOKENS in all, and a
        request alone where several rows cost more than one: runner.drafts_share_passes); each
        position's token is sampled as a one-token step would sample it, in order, until one
        differs from the draft (the first differing token is kept: it is what decoding alone
        gives there). False (nothing done) where no request has a draft or the pass would not be
        exact."""
        share = speculation.MAX_PASS_TOKENS // len(batch) - 1  # drafted tokens each request may add
        if self.speculative == "none" or self.device.type != "cpu" or share < 1:
            return False
        if len(batch) > 1 and not runner.drafts_share_passes():
            return False
        if not runner.exact_multi_token(self.model):
            return False
        drafts = [self._draft(r, share) for r in batch]
        if not any(drafts):
            return False
        runs = [(r.row, [r.next_input, *draft]) for r, draft in zip(batch, drafts, strict=True)]
        logits = self._forward_runs(runs, torch.arange(sum(len(tokens) for _, tokens in runs)))
        if logits is None:
            return False
        offset = 0
        for r, draft in zip(batch, drafts, strict=True):
            self._verify(r, draft, logits[offset : offset + 1 + len(draft)])
            offset += 1 + len(draft)
        return True

    def _draft(self, r: _Request, share: int) -> list[int]:
        """Up to `share` tokens proposed after the request's next input ([] for none)."""
        if r.constraint is not None:  # (its drafts would need its matcher to check them)
            return []
        room = min(r.params.max_new_tokens - len(r.generated), self.context_length - r.length) - 1
        if room < 1:
            return []
        if r.drafter is None:
            r.drafter = speculation.NgramDrafter(r.prompt_ids + r.generated, self.speculative_tokens)
        return r.drafter.propose(min(room, share))

    def _verify(self, r: _Request, draft: list[int], logits: torch.Tensor) -> None:
        """Samples from the logits of the request's next input and its drafted tokens, in order,
        until a sampled token differs from the draft (or the request ends)."""
        accepted = 0
        for j, token in enumerate([r.next_input, *draft]):
            self._fed(r, token)
            produced = len(r.generated)
            self._accept(r, logits[j])
            if r not in self.active or j == len(draft) or len(r.generated) == produced:
                break
            if r.generated[-1] != draft[j]:
                break
            accepted += 1
        if not draft:
            return
        r.drafted += len(draft)
        r.accepted += accepted
        self.stats["drafted_tokens"] += len(draft)
        self.stats["accepted_tokens"] += accepted
        assert r.drafter is not None
        r.drafter.accepted(len(draft), accepted)

    def _accept(self, r: _Request, logits: torch.Tensor) -> None:
        """Samples the next token of `r` from its float32 logits and streams what it completes."""
        if self.banned.numel():
            logits[self.banned] = float("-inf")  # ids beyond the tokenizer (GPT-J's 143 padding rows)
        heal = r.heal
        if heal is not None:  # token healing: the first token begins with the prompt's removed text
            heal.mask(logits)
        constraint = r.constraint
        if constraint is not None:  # JSON output: before the logprobs, which are the constrained ones
            constraint.mask(logits)
            if constraint.error:  # past the grammar's work limits: this request fails, not the batch
                self._retire(r, "error", error=constraint.error)
                return
        info_logprobs = r.params.logprobs is not None
        if info_logprobs:
            logprobs = logits.log_softmax(-1)
        p = r.params
        scores = logits
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            # Only penalties need the whole history: no per-token list copy otherwise.
            history = torch.tensor(r.prompt_ids + r.generated, dtype=torch.long)
            scores = apply_penalties(logits.clone(), p, history)
        try:
            token = choose_token(scores, r.params, r.generator)
        except RuntimeError:
            # Settings at the edge of float32 (a temperature of 1e-309, a repetition penalty of
            # 1e-300) leave no distribution to sample: take their limit, the most likely token.
            token = int(torch.argmax(torch.nan_to_num(scores, nan=float("-inf"))))
        if constraint is not None and not constraint.allows(token):  # logit_bias banned all it allows
            token = constraint.fallback()
        if heal is not None:
            r.heal = None
            if not heal.allows(token):  # every allowed token banned (logit_bias): keep the prompt as sent
                token = heal.token
            if token == heal.token:  # the prompt's own last token: the prompt stands as it was sent
                r.prompt_ids.append(token)
                if r.drafter is not None:
                    r.drafter.extend((token,))
                return
            r.healed = heal.text
        info = TokenInfo(token, healed=heal.text if heal is not None else "")
        if info_logprobs:
            info.logprob = float(logprobs[token])
            if r.params.logprobs:
                top = torch.topk(logprobs, r.params.logprobs)
                # (a healed first step allows few tokens: the others' -inf are left out)
                info.top_logprobs = [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)
                                     if v > float("-inf")]
        now = time.monotonic()
        if r.first_token_at is None:
            r.first_token_at = now
        self.stats["generated_tokens"] += 1
        self.token_times.append(now)
        # (the grammar allows an end-of-text token only after complete JSON, and it ends the
        # request even with ignore_eos: its text would follow the JSON)
        if token in self.eos_ids and (not r.params.ignore_eos or constraint is not None) \
                or token in r.params.stop_token_ids:
            r.infos.append(info)
            self._retire(r, "stop")
            return
        if constraint is not None and not constraint.advance(token):
            self._retire(r, "error", error=constraint.error)
            return
        r.generated.append(token)
        if r.drafter is not None:
            r.drafter.extend((token,))
        r.infos.append(info)
        r.pending_infos.append(info)
        piece = r.decoder.push(token, skip=len(heal.prefix) if heal is not None else 0)
        text, hit = r.stops.push(piece)
        if hit:
            self._emit(r, text)
            self._retire(r, "stop", flush=False)
            return
        self._emit(r, text)
        if constraint is not None and constraint.is_complete():  # nothing can follow: no step for an EOS
            self._retire(r, "stop")
        elif len(r.generated) >= r.params.max_new_tokens or r.length >= self.context_length:
            self._retire(r, "length")

    def _emit(self, r: _Request, text: str) -> None:
        r.text += text
        if text or r.pending_infos:
            r.send(StreamEvent(text, r.pending_infos))
            r.pending_infos = []

    def _retire(self, r: _Request, reason: str, error: str | None = None, flush: bool = True) -> None:
        if flush:  # after a stop sequence nothing more is emitted
            tail = r.decoder.flush()
            text, hit = r.stops.push(tail)
            if not hit:
                text += r.stops.flush()
            self._emit(r, text)
        if r in self.active:
            self.active.remove(r)
        # the row keeps what its cache holds (prompt and all but the last generated token) for
        # later requests that share the prefix
        self.rows.release(r.row)
        self._finish(r, reason, error)

    def _finish(self, r: _Request, reason: str, error: str | None = None) -> None:
        with self.lock:
            self.in_flight -= 1
        self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += r.prompt_tokens
        ttft = r.first_token_at - r.started if r.first_token_at else None
        r.send(
            Completion(
                text=r.text,
                tokens=list(r.generated),
                finish_reason=reason,
                prompt_tokens=r.prompt_tokens,
                token_infos=r.infos,
                truncated_prompt_tokens=r.truncated,
                cached_prompt_tokens=r.cached,
                time_to_first_token=ttft,
                error=error,
                prompt_logprobs=r.prompt_infos,
                drafted_tokens=r.drafted,
                accepted_tokens=r.accepted,
                healed=r.healed,
            )
        )


def _stop_at_exit(ref: weakref.ref) -> None:
    engine = ref()
    thread = engine.driving.thread if engine is not None else None
    if thread is None or not thread.is_alive():
        return
    for r in list(engine.active):
        r.cancelled = True
    engine.stop()
    thread.join(timeout=5)
