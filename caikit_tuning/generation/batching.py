"""Continuous batching: one decoding loop per base model serves every concurrent request.

Requests for the same base model, whatever soft prompt or generation parameters they
carry, share one forward pass per decoding step. A request joins the batch between
steps (after its own prefill) and leaves it as soon as it finishes, so a short request
never waits for a long one. Rows are left-padded in the shared KV cache; each row keeps
its own positions, attention mask, sampling state and stop rules (RequestDecoder).

Causal LMs with plain dynamic caches and T5-family encoder-decoders are batched
(generation/batches.py holds the running batch of each); other models decode each
request on its own (stream.stream_generation).
"""

from __future__ import annotations

import atexit
import collections
import queue
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import alog
import torch
from caikit.runtime.types.caikit_runtime_exception import CaikitRuntimeException
from grpc import StatusCode
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from ..config import library_settings
from ..inputs.prefix import PromptPrefix
from .batches import CausalBatch, Seq2SeqBatch
from .settings import GenerationSettings
from .stream import PreparedPrompt, RequestDecoder, TokenEvent, TokenStream

log = alog.use_channel("BATCH")


class QueueFull(CaikitRuntimeException):
    """The engine's wait queue is full: RESOURCE_EXHAUSTED / HTTP 429, retry later."""

    def __init__(self, message: str):
        super().__init__(StatusCode.RESOURCE_EXHAUSTED, message)


_CANCELLED = object()  # wakes a reader whose request was cancelled


@dataclass
class _Request:
    decoder: RequestDecoder
    ids: list[int]
    prefix: PromptPrefix
    slot: int  # its weight adapter's slot on the base model (0: none)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Leave the batch (or the queue) at the next step; wake a waiting reader."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.events.put(_CANCELLED)


_IDLE_SECONDS = 10.0
_ENGINES: weakref.WeakSet[BatchingEngine] = weakref.WeakSet()


@atexit.register
def close_engines() -> None:
    """Fail the waiting and running requests and let engine threads finish their step
    (at shutdown, before the interpreter goes away)."""
    for engine in list(_ENGINES):
        engine.close()


def engine_for(model: PreTrainedModel) -> BatchingEngine | None:
    """The batching engine shared by every model built on this base model, or None when
    batching is off (config generation.batching) or the model cannot be batched."""
    serving = library_settings().generation
    if not serving.batching or not batchable(model):
        return None
    engine = getattr(model, "_caikit_tuning_engine", None)
    if engine is None:
        engine = BatchingEngine(
            model, max_batch_size=serving.max_batch_size, max_queue_size=serving.max_queue_size
        )
        model._caikit_tuning_engine = engine
    return engine


def batchable(model: PreTrainedModel) -> bool:
    """Whether the model can be batched here: a causal LM with dynamic cache layers, or
    an encoder-decoder with relative positions (T5's family: left padding in the
    decoder leaves every row's distances as they are alone)."""
    if model.config.is_encoder_decoder:
        return getattr(model.config, "relative_attention_num_buckets", None) is not None
    probe = DynamicCache(config=model.config)
    return all(type(layer) is DynamicLayer for layer in probe.layers)


class BatchingEngine:
    """The decoding loop of one base model, on its own thread."""

    def __init__(self, model: PreTrainedModel, max_batch_size: int = 16, max_queue_size: int = 64):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.device = next(model.parameters()).device
        self._waiting: collections.deque[_Request] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        # The running batch: its rows and their shared caches (generation/batches.py).
        kind = Seq2SeqBatch if model.config.is_encoder_decoder else CausalBatch
        self._batch = kind(model, _advance)
        self.steps = 0
        self.max_rows_seen = 0
        self._closed = False
        _ENGINES.add(self)

    def close(self, timeout: float = 2.0) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # ------------------------------------------------------------- requests

    def submit(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt: PreparedPrompt,
        prefix: PromptPrefix,
        settings: GenerationSettings,
    ) -> TokenStream:
        """Queue a request; its events arrive through the returned stream. Cancelling
        or closing it early (a client that went away) drops the request from the batch."""
        request = _Request(
            RequestDecoder(self.model, tokenizer, prompt, prefix, settings),
            prompt.ids,
            prefix,
            prompt.slot,
        )
        with self._lock:
            if self._closed:
                raise RuntimeError("the generation engine is shut down.")
            if len(self._waiting) >= self.max_queue_size:
                raise QueueFull(
                    f"the generation queue is full ({self.max_queue_size} waiting requests); retry later."
                )
            self._waiting.append(request)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="batching-engine", daemon=True
                )
                self._thread.start()
            self._lock.notify()
        return TokenStream(self._events(request), request.cancel)

    @staticmethod
    def _events(request: _Request) -> Iterator[TokenEvent]:
        try:
            while True:
                event = request.events.get()
                if event is _CANCELLED:
                    return
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            request.cancelled.set()

    # ----------------------------------------------------------------- loop

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._batch.rows:
                    # An idle engine lets its thread end, so nothing pins the model.
                    if self._closed or not self._lock.wait(timeout=_IDLE_SECONDS):
                        self._thread = None
                        return
                if self._closed:
                    running = [row.request for row in self._batch.rows]
                    for request in [*self._waiting, *running]:
                        request.events.put(RuntimeError("the generation engine is shutting down"))
                    self._waiting.clear()
                    self._batch.clear()
                    self._thread = None
                    return
                admitted = []
                room = self.max_batch_size - len(self._batch.rows)
                while self._waiting and len(admitted) < room:
                    admitted.append(self._waiting.popleft())
            admitted = [r for r in admitted if not r.cancelled.is_set()]
            if admitted:
                self._guarded(self._batch.admit, admitted)
                self.max_rows_seen = max(self.max_rows_seen, len(self._batch.rows))
            if self._batch.rows:
                self._guarded(self._batch.step)
                self.steps += 1

    def _guarded(self, work, *args) -> None:
        try:
            work(*args)
        except Exception as err:  # noqa: BLE001  (fail the requests, keep the engine)
            log.error("batched decoding failed: %s", err, exc_info=True)
            failed = [row.request for row in self._batch.rows] + [r for a in args for r in a]
            for request in failed:
                request.events.put(err)
            self._batch.clear()


def _advance(request: _Request, logits: torch.Tensor) -> TokenEvent | None:
    """One row's decision, isolated: a row that fails (its scores went non-finite, say)
    ends alone with its error, and the rest of the batch goes on."""
    try:
        event = request.decoder.advance(logits)
    except Exception as err:  # noqa: BLE001  (the error goes to this request only)
        log.warning("a batched request failed alone: %s", err)
        request.events.put(err)
        return None
    request.events.put(event)
    return event
