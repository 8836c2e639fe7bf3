"""The continuous-batching engine: one thread, one model, every active request decoded together.

    from engine import Engine, GenRequest
    engine = Engine(model, tok.eos_id, max_batch=8).start()
    req = GenRequest(prompt=ids, max_tokens=64, params=SamplingParams(temperature=0.7, seed=1))
    engine.submit(req)
    req.events.get()  # ("token", id) ... then ("end", "stop" | "length", n_generated) or ("error", message)
    engine.call(fn).result()  # fn() on the engine thread, between two decode steps (e.g. scoring)

A request is prefilled alone, its keys/values join the shared left-padded KV cache
(`KVCache.admit`), and it takes part in the next decode step; a finished, cancelled or failed
request leaves at once (`KVCache.keep`). Sampling is `minimind.Sampler`: settings and random
generators are per row, so a request's tokens do not depend on what else is in the batch.

With `compile=True` each decode step is `MiniMind.decode_step` under torch.compile (batch size and
cache length are dynamic: a graph for one row, one for a few, one for more, compiled in the engine
thread before the first request is served); the tokens are the same as without.

A request that cannot be served fails alone: bad prompt ids or settings are refused before it joins,
and a row whose logits stop being finite gets an error and leaves while the others go on. Only a
failure of the batched forward pass itself (e.g. out of memory) ends every active request.
"""
import queue
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from minimind import Linear, Sampler, SamplingParams
from runtime import tick_threads


@dataclass
class GenRequest:
    """One generation. The engine posts events: ("token", id), then ("end", reason, n_generated) with
    reason "stop" (eos) or "length", or ("error", message). They go to `events` unless `emit` is
    given (called from the engine thread, e.g. to hand them to an event loop)."""
    prompt: list
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False
    emit: Optional[Callable] = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, *event):
        (self.emit or self.events.put)(event)


class _Row:
    def __init__(self, req: GenRequest):
        self.req, self.generated = req, 0

    @property
    def remaining(self) -> int:
        return self.req.max_tokens - self.generated


class Engine:
    """Continuous batching over a left-padded KV cache (minimind.KVCache with per-row `pad`).

    All rows share the cache's time axis; a row whose prompt is shorter than the shared length is
    left-padded, a longer one shifts the batch right, and when rows leave, columns that are padding
    for every remaining row are dropped (see KVCache.admit and KVCache.keep)."""

    def __init__(self, model, eos_id: int, max_batch: int = 8, max_queue: int = 64, compile: bool = False):
        self.model, self.eos_id, self.compile = model, eos_id, compile
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = model.embed.weight.device
        self.vocab = model.config.vocab_size
        self.queue: queue.Queue = queue.Queue()
        self.calls: queue.Queue = queue.Queue()  # (fn, Future): work on the model between two steps
        self.stats = {"requests": 0, "tokens": 0, "steps": 0}
        self._reset()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # --- public, called from other threads
    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self._stop.set()
        self.queue.put(None)
        self.thread.join(timeout=10)

    def submit(self, req: GenRequest) -> bool:
        """Queue a request; False when too many are waiting."""
        if self.queue.qsize() >= self.max_queue:
            return False
        self.queue.put(req)
        return True

    def call(self, fn) -> Future:
        """Run fn() on the engine thread between two decode steps and hand its result (or
        exception) over in a Future: work on the model (e.g. scoring.token_logprobs) that must
        never overlap a decode step of the engine, which owns the model. Decoding waits meanwhile."""
        fut = Future()
        self.calls.put((fn, fut))
        if not self.rows:
            self.queue.put(None)  # wakes an idle engine waiting for requests
        return fut

    def load(self) -> dict:
        return {"active": len(self.rows), "queued": self.queue.qsize()}

    # --- engine thread
    def _loop(self):
        if self.compile:
            self._warm_up()
        while not self._stop.is_set():
            self._run_calls()
            try:
                self._admit()
                if self.rows:
                    self._step()
                    tick_threads()
            except Exception as e:  # the batched forward failed: every active request ends, the engine goes on
                msg = f"{type(e).__name__}: {e}"
                print(f"engine error: {msg}", file=sys.stderr)
                for r in self.rows:
                    self._post(r.req, "error", msg)
                self._reset()
        while not self.calls.empty():  # stopped: calls not run are cancelled
            self.calls.get_nowait()[1].cancel()

    def _run_calls(self):
        while not self.calls.empty():
            fn, fut = self.calls.get_nowait()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:  # the caller's failure, not the engine's
                    fut.set_exception(e)

    @torch.no_grad()
    def _warm_up(self):
        """Compile the decode step before serving, a few tokens for each graph a batch can need: one row,
        and on CPU the first row count of each of minimind.Linear's regimes (multiply-and-sum, split,
        sgemm), up to a full batch; if that fails, say why and decode eagerly."""
        firsts = {1, 2} | ({Linear.DECODE_ROWS + 1, Linear.SPLIT_ROWS + 1} if self.device.type == "cpu" else set())
        try:
            for rows in sorted({r for r in firsts if r < self.max_batch} | {self.max_batch}, reverse=True):
                idx = torch.full((rows, 1), self.eos_id, dtype=torch.long, device=self.device)
                for _ in self.model.generate_stream(idx, 3, temperature=0, compiled=True):
                    pass
        except Exception as e:
            print(f"engine: compiling the decode step failed, decoding eagerly ({type(e).__name__}: {e})",
                  file=sys.stderr)
            self.compile = False

    def _reset(self):
        self.rows = []
        self.cache = self.model.new_cache(0, 0, pad=torch.zeros(0, dtype=torch.long))  # KVCache of the rows
        self.sampler = Sampler(self.vocab, self.device)  # their sampling state
        self.logits = None  # (B, V) next-token logits of each row

    @staticmethod
    def _post(req: GenRequest, *event) -> bool:
        """Hand an event over; a receiver that fails (its event loop is gone) cancels the request."""
        try:
            req.post(*event)
            return True
        except Exception as e:
            print(f"engine: dropping a request whose receiver failed ({type(e).__name__}: {e})", file=sys.stderr)
            req.cancelled.set()
            return False

    def _admit(self):
        while len(self.rows) < self.max_batch:
            try:  # block only when idle
                req = self.queue.get(timeout=0.5) if not self.rows else self.queue.get_nowait()
            except queue.Empty:
                return
            if req is None or self._stop.is_set():
                return
            if req.cancelled.is_set():
                continue
            try:  # the batch changes only once the new row's pieces are all built
                self._join(req)
            except Exception as e:  # bad ids, out of memory on a long prompt, ...: this request only
                print(f"engine: request refused: {type(e).__name__}: {e}", file=sys.stderr)
                self._post(req, "error", f"{type(e).__name__}: {e}")

    @torch.no_grad()
    def _join(self, req: GenRequest):
        P = len(req.prompt)
        if not (P and all(isinstance(t, int) and 0 <= t < self.vocab for t in req.prompt)):
            raise ValueError(f"a prompt is a non-empty list of token ids in [0, {self.vocab})")
        if not (isinstance(req.params, SamplingParams) and req.max_tokens >= 1):
            raise ValueError("a request needs SamplingParams and max_tokens >= 1")
        alone = self.model.new_cache(1, P)
        logits, _ = self.model(torch.tensor([req.prompt], device=self.device), cache=alone)  # (1, 1, V)
        B = len(self.rows)
        room = max([r.remaining for r in self.rows] + [req.max_tokens])
        self.cache.admit(alone, room)
        try:
            self.sampler.add([req.params], torch.tensor([req.prompt], device=self.device))
        except Exception:
            self.cache.keep(list(range(B)), room)
            raise
        self.rows.append(_Row(req))
        lg = logits[:, -1].float()
        self.logits = lg if self.logits is None else torch.cat([self.logits, lg])
        self.stats["requests"] += 1

    def _keep(self, keep: list):
        """Keep only rows `keep` (indices), in the cache, the sampler and the logits."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.cache.keep(keep, max((r.remaining for r in self.rows), default=0))
        self.sampler.keep(keep)
        self.logits = self.logits[torch.tensor(keep, dtype=torch.long, device=self.device)] if keep else None

    @torch.no_grad()
    def _step(self):
        """Sample a token for every row, hand them out, retire finished rows, feed the rest."""
        self._keep([i for i, r in enumerate(self.rows) if not r.req.cancelled.is_set()])
        if not self.rows:
            return
        nxt = self.sampler.sample(self.logits)  # (B,), -1 for a row whose logits are not finite
        self.sampler.update(nxt)
        self.stats["steps"] += 1
        keep = []
        for i, (r, t) in enumerate(zip(self.rows, nxt.tolist())):
            if t < 0:
                self._post(r.req, "error", "the model's next-token logits for this request are not finite")
                continue
            r.generated += 1
            self.stats["tokens"] += 1
            if t == self.eos_id and not r.req.ignore_eos:
                self._post(r.req, "end", "stop", r.generated)
                continue
            if not self._post(r.req, "token", t):
                continue
            if r.remaining <= 0:
                self._post(r.req, "end", "length", r.generated)
                continue
            keep.append(i)
        self._keep(keep)
        if self.rows:
            self.logits = self.model.step(nxt[keep], self.cache, compiled=self.compile).float()  # (B, V)
