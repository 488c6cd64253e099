"""Continuous batching: one decoding loop per base model serves every concurrent request.

Requests for the same base model, whatever soft prompt or generation parameters they
carry, share one forward pass per decoding step. A request joins the batch between
steps (after its own prefill) and leaves it as soon as it finishes, so a short request
never waits for a long one. Rows are left-padded in the shared KV cache; each row keeps
its own positions, attention mask, sampling state and stop rules (RequestDecoder).

Only causal LMs with plain dynamic caches are batched; other models decode each
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
from ..inputs.prefix import PromptPrefix, accepts_logits_to_keep, embed_with_prefix
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
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Leave the batch (or the queue) at the next step; wake a waiting reader."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.events.put(_CANCELLED)


@dataclass
class _Row:
    """A request inside the running batch."""

    request: _Request
    position: int  # position id of the next token
    last_token: int


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
    """Whether the model's cache can be batched here: a causal LM with dynamic layers."""
    if model.config.is_encoder_decoder:
        return False
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
        # The shared state of the running batch.
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, cache length)
        self.steps = 0
        self.max_rows_seen = 0
        self._last_logits = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
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
            RequestDecoder(self.model, tokenizer, prompt, prefix, settings), prompt.ids, prefix
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
                while not self._waiting and not self._rows:
                    # An idle engine lets its thread end, so nothing pins the model.
                    if self._closed or not self._lock.wait(timeout=_IDLE_SECONDS):
                        self._thread = None
                        return
                if self._closed:
                    for request in [*self._waiting, *(row.request for row in self._rows)]:
                        request.events.put(RuntimeError("the generation engine is shutting down"))
                    self._waiting.clear()
                    self._rows, self._cache, self._mask = [], None, None
                    self._thread = None
                    return
                admitted = []
                while self._waiting and len(self._rows) + len(admitted) < self.max_batch_size:
                    admitted.append(self._waiting.popleft())
            if admitted:
                self._guarded(self._admit, admitted)
            if self._rows:
                self._guarded(self._step)

    def _guarded(self, work, *args) -> None:
        try:
            work(*args)
        except Exception as err:  # noqa: BLE001  (fail the requests, keep the engine)
            log.error("batched decoding failed: %s", err, exc_info=True)
            failed = [row.request for row in self._rows] + [r for a in args for r in a]
            for request in failed:
                request.events.put(err)
            self._rows, self._cache, self._mask = [], None, None

    @torch.inference_mode()
    def _admit(self, requests: list[_Request]) -> None:
        """Prefill the newly admitted requests together (left-padded, each behind its own
        soft prompt), answer their first tokens, and merge their caches into the batch."""
        requests = [r for r in requests if not r.cancelled.is_set()]
        if not requests:
            return
        pieces = []
        for request in requests:
            ids = torch.tensor([request.ids], device=self.device)  # (1, seq_len)
            embeds, _ = embed_with_prefix(self.model, ids, None, request.prefix.decoder)
            pieces.append(embeds[0])  # (virtual + seq_len, hidden)
        width = max(piece.shape[0] for piece in pieces)
        embeds = pieces[0].new_zeros(len(pieces), width, pieces[0].shape[1])
        mask = torch.zeros(len(pieces), width, dtype=torch.long, device=self.device)
        for index, piece in enumerate(pieces):
            embeds[index, width - piece.shape[0] :] = piece
            mask[index, width - piece.shape[0] :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each row counts from its start
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **self._last_logits,
        )
        logits = out.logits[:, -1].float().cpu()  # (requests, vocab)
        keep, rows = [], []
        for index, request in enumerate(requests):
            event = _advance(request, logits[index])
            if event is not None and not request.decoder.finished:
                keep.append(index)
                rows.append(
                    _Row(request, position=int(mask[index].sum()), last_token=event.token_id)
                )
        if keep:
            select = torch.tensor(keep, device=self.device)
            for layer in out.cache.layers:
                layer.keys = layer.keys.index_select(0, select)
                layer.values = layer.values.index_select(0, select)
            self._merge(out.cache, mask.index_select(0, select), rows)

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, rows: list[_Row]) -> None:
        """Append rows (their cache and mask) to the running batch, left-padding the
        shorter side so every row ends at the same column."""
        if not self._rows:
            self._cache, self._mask, self._rows = cache, mask, list(rows)
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
                mine.values = torch.cat(
                    [_left_pad(mine.values, width), _left_pad(theirs.values, width)]
                )
            self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)])
            self._rows.extend(rows)
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))

    @torch.inference_mode()
    def _step(self) -> None:
        """One forward pass for every running row, then each row's own decision."""
        rows = self._rows
        tokens = torch.tensor([[r.last_token] for r in rows], device=self.device)  # (rows, 1)
        positions = torch.tensor([[r.position] for r in rows], device=self.device)  # (rows, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self._mask,
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
        )
        self._cache = out.cache
        logits = out.logits[:, -1].float().cpu()  # (rows, vocab)
        self.steps += 1
        keep = []
        for index, row in enumerate(rows):
            if row.request.cancelled.is_set():
                continue
            event = _advance(row.request, logits[index])
            if event is not None and not row.request.decoder.finished:
                row.position += 1
                row.last_token = event.token_id
                keep.append(index)
        if len(keep) != len(rows):
            self._keep(keep)

    def _keep(self, indices: list[int]) -> None:
        """Drop finished rows, and cache columns that are padding in every row left."""
        if not indices:
            self._rows, self._cache, self._mask = [], None, None
            return
        select = torch.tensor(indices, device=self.device)
        self._rows = [self._rows[i] for i in indices]
        self._mask = self._mask.index_select(0, select)
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, select)[:, :, start:]
            layer.values = layer.values.index_select(0, select)[:, :, start:]


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


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, heads, length, dim) -> (rows, heads, width, dim), zeros in front."""
    missing = width - states.shape[2]
    if missing == 0:
        return states
    pad = states.new_zeros(states.shape[0], states.shape[1], missing, states.shape[3])
    return torch.cat([pad, states], dim=2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)
