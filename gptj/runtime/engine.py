"""The one generation engine behind the CLI, the Python API and the server.

One thread at a time drives the model and the KV cache, a step at a time. Without a server,
whoever waits for a result drives: `model.generate()` steps the engine in the caller's own
thread. A server has a driver that runs for as long as it serves (`gptj serve`: the main
thread; an app made in Python: a background thread). Why not always a worker thread: torch's
OpenMP runtime keeps a thread pool per thread that runs parallel ops, and with two pools on a
small machine it sleeps between ops instead of spinning, so every op pays a wake-up. Loading,
stepping and `model.logits()` in one thread keep one pool.

Requests join and leave a running batch at every step (continuous batching): a newcomer's
prompt is prefilled in chunks between decode steps, so it does not stall the others for long.
Each cache row keeps the tokens it holds after its request ends; a new request takes the free
row that shares the longest prefix with its prompt and skips prefilling that prefix (prefix
caching, least recently used row first when nothing matches). What a taken row held moves to
a bounded store (gptj.runtime.prefix_cache) when its prompt was one that recurs.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from gptj.device import module_device
from gptj.errors import InvalidRequest, QueueFull, ShuttingDown
from gptj.runtime import runner
from gptj.runtime.kv_cache import KVCache
from gptj.runtime.prefix_cache import DEFAULT_BYTES as PREFIX_STORE_BYTES
from gptj.runtime.prefix_cache import MIN_STORED_TOKENS, PrefixStore, common_prefix
from gptj.runtime.request import Completion, RequestHandle, StreamEvent, TokenInfo, _Request
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
    ) -> None:
        cfg = model.config
        self.model, self.tokenizer = model, tokenizer
        self.context_length = min(context_length or cfg.context_length, cfg.context_length)
        self.max_batch, self.prefill_chunk, self.max_queue = max_batch, prefill_chunk, max_queue
        self.kv_dtype = kv_dtype
        self.device = module_device(model)  # the KV cache and the inputs go where the weights are
        self.banned = torch.tensor(sorted(banned_token_ids), dtype=torch.long)
        self.eos_ids = {tokenizer.eos_token_id, *eos_token_ids}
        self.cache: KVCache | None = None  # allocated on first use
        self.row_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # what each row holds
        self.row_last_used = [0.0] * max_batch
        self.row_recurs = [False] * max_batch  # its request's prompt began like an earlier one
        self.row_scope: list[str | None] = [None] * max_batch  # the cache scope of what each row holds
        # Prefix caching: rows keep their tokens for later requests (when enabled), and what a
        # row held moves to the store when another request takes the row.
        self.prefix_cache = prefix_cache
        self.prefix_store = PrefixStore(prefix_cache_bytes) if prefix_cache and prefix_cache_bytes > 0 else None
        self.active: list[_Request] = []
        self.waiting: queue.Queue[_Request] = queue.Queue()
        self.lock = threading.Lock()
        self.drive_lock = threading.Lock()  # held for each step: one thread drives at a time
        self.driver: threading.Thread | None = None  # a thread in run(): it alone drives
        self.thread: threading.Thread | None = None  # the background driver, when started
        self.calls: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()  # for call()
        self.stopping = False
        self.draining = False  # shutting down: new requests are refused
        self.in_flight = 0  # submitted and not finished (the batch plus the queue), under `lock`
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "cached_prompt_tokens": 0}
        self.finish_reasons: dict[str, int] = {}  # finished requests by finish_reason
        self.token_times: deque[float] = deque(maxlen=200_000)  # when recent tokens were sampled

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
            return ids[-budget:], len(ids) - budget
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
        request = _Request(ids, params, time.monotonic() + timeout if timeout else None, truncated, cache_scope)
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
            while self._driven_elsewhere() and time.monotonic() < end:
                time.sleep(0.01)
            if not self._driven_elsewhere():
                with self.drive_lock:
                    self._end_all("shutdown")
        finally:
            with self.lock:
                self.draining = False
                self.stopping = False

    # ---- driving ------------------------------------------------------------------------------

    def _driven_elsewhere(self) -> bool:
        driver = self.driver
        return driver is not None and driver.is_alive() and driver is not threading.current_thread()

    def drive_once(self) -> bool:
        """One step in the calling thread, unless a driver thread runs or another thread is
        stepping (then False: the caller waits for its events instead)."""
        if self._driven_elsewhere():
            return False
        if not self.drive_lock.acquire(blocking=False):
            return False
        try:
            with torch.no_grad():
                self._run_calls()
                self._admit(block=False)
                self._step_safely()
        finally:
            self.drive_lock.release()
        return True

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Drives the engine in this thread until shutdown() (or stop()): `gptj serve` runs it in
        the main thread, start_background() in a thread of its own. `on_ready` is called once
        this thread is the driver (e.g. to start the web server that submits requests)."""
        with self.lock:
            if self._driven_elsewhere():
                raise RuntimeError("the engine already has a driver thread")
            self.driver = threading.current_thread()
        try:
            if on_ready is not None:
                on_ready()
            with torch.no_grad():
                while not self.stopping:
                    with self.drive_lock:
                        self._run_calls()
                        self._admit(block=not self.active)
                        if self.stopping:
                            break
                        self._step_safely()
                with self.drive_lock:
                    self._end_all("shutdown")
        finally:
            with self.lock:
                self.driver = None

    def start_background(self) -> None:
        """Starts a thread that drives the engine (for servers made in Python), unless one runs."""
        with self.lock:
            if self.driver is not None and self.driver.is_alive():
                return
            self.stopping = False
            self.thread = threading.Thread(target=self.run, name="gptj-engine", daemon=True)
            # set here, not in run(): a submit right after this call must not drive too
            self.driver = self.thread
            self.thread.start()
            # Stop the thread before the interpreter tears torch down: a thread killed inside
            # torch at exit aborts the process ("terminate called ...").
            atexit.register(_stop_at_exit, weakref.ref(self))

    def stop(self) -> None:
        """Makes run() return after its current step (running requests end with "shutdown")."""
        self.stopping = True
        self.waiting.put(None)  # type: ignore[arg-type]

    def call(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` (a forward pass outside generation, e.g. Model.logits) in the driving
        thread between steps, so that torch work stays in one thread; returns its result."""
        if not self._driven_elsewhere():
            with self.drive_lock, torch.no_grad():
                return fn()
        future: Future = Future()
        self.calls.put((fn, future))
        self.waiting.put(None)  # type: ignore[arg-type]  # wakes a driver waiting for requests
        return future.result()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self.calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # the caller gets it
                    future.set_exception(exc)

    def _step_safely(self) -> None:
        try:
            self._step()
        except Exception as exc:  # never let one bad step kill the server: fail the batch
            for r in self.active:
                self.row_tokens[r.row] = []  # what the row's cache holds is unknown now
                self._finish(r, "error", error=f"{type(exc).__name__}: {exc}")
            self.active.clear()

    def _end_all(self, reason: str) -> None:
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

    def _admit(self, block: bool) -> None:
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
        busy = {a.row for a in self.active}
        free = [i for i in range(self.max_batch) if i not in busy]
        prompt, scope = r.prompt_ids, r.cache_scope
        if r.params.prompt_logprobs is not None:
            r.prompt_infos = [TokenInfo(prompt[0])]
        if not self.prefix_cache:
            row = min(free, key=lambda i: self.row_last_used[i])
            r.row, r.prefilled, r.cached, self.row_tokens[row] = row, 0, 0, []
            self._prompt_done(r)
            return

        def shared_with(i: int) -> int:
            return common_prefix(self.row_tokens[i], prompt) if self.row_scope[i] == scope else 0

        row = max(free, key=lambda i: (shared_with(i), -self.row_last_used[i]))
        shared = shared_with(row)
        store = self.prefix_store
        store_key, store_shared = store.best(prompt, scope) if store is not None else (None, 0)
        held = self.row_tokens[row]
        if store is not None and len(held) - max(shared, store_shared) >= MIN_STORED_TOKENS:
            # This request overwrites what the row holds: keep it for a later request when its
            # prompt was a recurring one (a conversation, a regenerate), else its fingerprint.
            if self.row_recurs[row]:
                n = len(held)
                store.put(held, self.cache.k[:, row, :, :n].clone(), self.cache.v[:, row, :, :n].clone(),
                          self.row_scope[row])
            else:
                store.remember(held, self.row_scope[row])
        seen = store.seen(prompt, scope) if store is not None else 0
        self.row_recurs[row] = max(shared, store_shared, seen) >= MIN_STORED_TOKENS
        self.row_scope[row] = scope
        if r.prompt_infos is not None:  # every prompt position's logits are wanted: compute them all
            shared = store_shared = 0
        if store_key is not None and store_shared > shared:
            k, v = store.get(store_key)
            self.cache.k[:, row, :, :store_shared] = k[:, :, :store_shared]
            self.cache.v[:, row, :, :store_shared] = v[:, :, :store_shared]
            shared = store_shared
        # The last prompt token is always recomputed: its logits pick the first new token.
        reuse = min(shared, len(prompt) - 1)
        r.row, r.prefilled, r.cached = row, reuse, reuse
        self.row_tokens[row] = prompt[:reuse]
        self.stats["cached_prompt_tokens"] += reuse
        self._prompt_done(r)

    def _step(self) -> None:
        self._purge_waiting()
        now = time.monotonic()
        for r in list(self.active):
            if r.cancelled:
                self._retire(r, "cancelled")
            elif r.deadline is not None and now > r.deadline:
                self._retire(r, "timeout")
        prefilling = [r for r in self.active if r.prefilled < r.prefill_target]
        if prefilling:
            self._prefill_chunk(prefilling[0])
        decoding = [r for r in self.active if r.prefilled >= r.prefill_target]
        if decoding:
            self._decode(decoding)

    def _prefill_chunk(self, r: _Request) -> None:
        start = r.prefilled
        chunk = r.prompt_ids[start : min(start + self.prefill_chunk, r.prefill_target)]
        ids = torch.tensor([chunk], device=self.device)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]
        # the last token's step samples; the chunk's logits are wanted only for the prompt's logprobs
        logits = runner.forward(self.model, ids, positions, self.cache, slice(r.row, r.row + 1),
                                logits=r.prompt_infos is not None)
        if logits is not None:
            self._add_prompt_logprobs(r, logits[0].cpu(), start)
        r.prefilled += len(chunk)
        self.row_tokens[r.row].extend(chunk)
        self._prompt_done(r)
        if r.prefilled == len(r.prompt_ids):  # max_new_tokens == 0: the prompt was all
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
        lo = min(r.row for r in batch)
        hi = max(r.row for r in batch) + 1
        by_row = {r.row: r for r in self.active}
        ids = torch.zeros(hi - lo, 1, dtype=torch.long)
        positions = torch.zeros(hi - lo, 1, dtype=torch.long)
        for row in range(lo, hi):
            r = by_row.get(row)
            if r is None:  # a free row: write past the prefix it keeps for later requests
                held = self.row_tokens[row]
                if len(held) >= self.context_length:
                    del held[-1]
                positions[row - lo, 0] = len(held)
                continue
            # A decoding row feeds its last token (the prompt's last, then each generated one)
            # at the next free position; rows that are not decoding write a throwaway key
            # there, which their own next write overwrites.
            positions[row - lo, 0] = len(self.row_tokens[row])
            if r in batch:
                ids[row - lo, 0] = r.next_input
        # sampling runs on the CPU (a no-op there): same seed, same draws on any device
        logits = runner.forward(self.model, ids.to(self.device), positions.to(self.device), self.cache,
                                slice(lo, hi)).cpu()
        for r in batch:
            self.row_tokens[r.row].append(r.next_input)
            if not r.generated:  # the prompt's last token is in the cache now
                r.prefilled += 1
            self._accept(r, logits[r.row - lo, -1])

    def _accept(self, r: _Request, logits: torch.Tensor) -> None:
        """Samples the next token of `r` from its float32 logits and streams what it completes."""
        if self.banned.numel():
            logits[self.banned] = float("-inf")  # ids beyond the tokenizer (GPT-J's 143 padding rows)
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
        info = TokenInfo(token)
        if info_logprobs:
            info.logprob = float(logprobs[token])
            if r.params.logprobs:
                top = torch.topk(logprobs, r.params.logprobs)
                info.top_logprobs = [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)]
        now = time.monotonic()
        if r.first_token_at is None:
            r.first_token_at = now
        self.stats["generated_tokens"] += 1
        self.token_times.append(now)
        if token in self.eos_ids and not r.params.ignore_eos or token in r.params.stop_token_ids:
            r.infos.append(info)
            self._retire(r, "stop")
            return
        r.generated.append(token)
        r.infos.append(info)
        r.pending_infos.append(info)
        piece = r.decoder.push(token)
        text, hit = r.stops.push(piece)
        if hit:
            self._emit(r, text)
            self._retire(r, "stop", flush=False)
            return
        self._emit(r, text)
        if len(r.generated) >= r.params.max_new_tokens or r.length >= self.context_length:
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
        # row_tokens keeps what the row's cache holds (prompt and all but the last generated
        # token) for later requests that share the prefix.
        self.row_last_used[r.row] = time.monotonic()
        self._finish(r, reason, error)

    def _finish(self, r: _Request, reason: str, error: str | None = None) -> None:
        with self.lock:
            self.in_flight -= 1
        self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(r.prompt_ids)
        ttft = r.first_token_at - r.started if r.first_token_at else None
        r.send(
            Completion(
                text=r.text,
                tokens=list(r.generated),
                finish_reason=reason,
                prompt_tokens=len(r.prompt_ids),
                token_infos=r.infos,
                truncated_prompt_tokens=r.truncated,
                cached_prompt_tokens=r.cached,
                time_to_first_token=ttft,
                error=error,
                prompt_logprobs=r.prompt_infos,
            )
        )


def _stop_at_exit(ref: weakref.ref) -> None:
    engine = ref()
    if engine is None or engine.thread is None or not engine.thread.is_alive():
        return
    for r in list(engine.active):
        r.cancelled = True
    engine.stop()
    engine.thread.join(timeout=5)
