"""Batched decoding: several prompts generate together, optionally over one shared prefix.

Layout. A batch holds an optional *shared prefix* — one cache (1, H, P, D) that
every row continues (a system prompt or few-shot block) — and a padded per-row
cache (B, H, S, D) of what follows it. Rows have different lengths, so the
per-row cache has holes: zeros wherever a row has nothing, masked out by a
(B, S) validity mask. RoPE is already applied to cached keys and every row gets
explicit position ids, so a hole changes nothing but the attention mask.

Attention. The prefix is never copied per row: a small attention function
(registered with transformers' AttentionInterface as "chatkv_prefix") scores
the queries of all rows against the prefix keys in one matrix product, against
each row's own keys in another, and takes one softmax over both. A 1,000-token
system prompt shared by 32 rows is read once per step instead of 32 times, and
its cache is 1/32 of the padded alternative.

Like `generate.generate`, `BatchDecoder` is a generator of token events: rows
finish independently (EOS, max tokens, context limit, `stop(row)` from the
consumer) and are dropped from the batch at the next step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache

from chatkv.api import GenerationSettings
from chatkv.engine.generate import PREFILL_STEP, Sampler, cache_arg
from chatkv.engine.lean import Attend, lean_for
from chatkv.engine.leanload import LeanModel
from chatkv.kv import live

ATTN_NAME = "chatkv_prefix"
PREFIX_KWARG = "chatkv_prefix"  # forward kwarg carrying the shared prefix's per-layer (keys, values)


def default_batch_size(device: torch.device) -> int:
    """Rows decoded together when the user does not say: on the CPU the gain flattens
    past ~16 rows (matrix products are compute-bound by then); a GPU wants many more."""
    return 64 if device.type == "cuda" else 16


# -- attention over a shared prefix + padded per-row keys ---------------------------


def prefix_attention(
    module: Any,  # the calling attention module (transformers, untyped); we use its layer_idx
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of `query` over [shared prefix ; per-row keys].

    Args:
        query: (B, Hq, L, D); key, value: (B, Hkv, S, D), the per-row cache after this step's update.
        attention_mask: bool (B, 1, L, S), True where a query may attend a per-row key.
        kwargs[PREFIX_KWARG]: per layer (keys, values) of the shared prefix, each (1, Hkv, P, D),
            visible to every query; None or absent for no prefix.
    Returns (B, L, Hq, D) as transformers' attention functions do.
    """
    prefix: live.Layers | None = kwargs.get(PREFIX_KWARG)
    kp, vp = prefix[module.layer_idx] if prefix else (None, None)
    kpt = kp[0].transpose(-1, -2) if kp is not None else None  # (Hkv, D, P)
    return attend_rows(
        query, key, value, attention_mask, scaling, kpt, vp[0] if vp is not None else None
    ), None


def attend_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    kpt: torch.Tensor | None,
    vp: torch.Tensor | None,
) -> torch.Tensor:
    """`prefix_attention` for one layer whose shared prefix has keys `kpt` transposed,
    (Hkv, D, P), and values `vp` (Hkv, P, D), or None; returns (B, L, Hq, D). A decoder
    that calls it every step passes both contiguous (`prepare_prefix`), so the products
    read them as they are instead of copying them each time."""
    B, Hq, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    g = Hq // Hkv  # query heads per kv head (GQA): query head h uses kv head h // g
    scale = scaling if scaling is not None else D**-0.5
    q = query.reshape(B, Hkv, g * L, D)
    scores = torch.matmul(q, key.transpose(-1, -2)).view(B, Hkv, g, L, S)  # (B, Hkv, g, L, S)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask[:, :, None], float("-inf"))
    P = 0
    if kpt is not None and kpt.shape[-1] > 0:
        P = kpt.shape[-1]
        qp = q.transpose(0, 1).reshape(Hkv, B * g * L, D)  # all rows' queries against one prefix
        sp = torch.matmul(qp, kpt)  # (Hkv, B*g*L, P)
        sp = sp.view(Hkv, B, g, L, P).transpose(0, 1)  # (B, Hkv, g, L, P)
        scores = torch.cat([sp, scores], dim=-1)
    probs = (scores.float() * scale).softmax(dim=-1).to(value.dtype)  # (B, Hkv, g, L, P+S)
    out = torch.matmul(probs[..., P:].reshape(B, Hkv, g * L, S), value)  # (B, Hkv, g*L, D)
    if P:
        assert vp is not None  # P > 0 only with a prefix
        pp = probs[..., :P].transpose(0, 1).reshape(Hkv, B * g * L, P)
        out = out + torch.matmul(pp, vp).view(Hkv, B, g * L, D).transpose(0, 1)
    out = out.view(B, Hkv, g, L, D).reshape(B, Hq, L, D).transpose(1, 2)  # (B, L, Hq, D)
    return out


def attend_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor,
    scaling: float,
    kp: torch.Tensor | None,
    vp: torch.Tensor | None,
) -> torch.Tensor:
    """`attend_rows` for one new token per row on the CPU, in two flash-attention calls:
    each row over its own keys, all rows over the shared prefix, merged by their
    log-sum-exps (no (B, P + S) scores, no copies of the prefix).

    Args:
        query: (B, Hq, 1, D); key, value: (B, Hkv, S, D), the padded per-row cache.
        bias: (B, 1, 1, S) in the query's dtype, 0 where a row may attend and -inf on its padding.
        kp, vp: the shared prefix (1, Hkv, P, D), or None.
    Returns (B, 1, Hq, D).
    """
    B, Hq, _, D = query.shape
    Hkv = key.shape[1]
    g = Hq // Hkv  # query heads per kv head: a kv head's g queries are one row's "query length"
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    q = query.reshape(B, Hkv, g, D)
    out: torch.Tensor
    out, lse = flash(q, key, value, attn_mask=bias, scale=scaling)  # (B, Hkv, g, D), (B, Hkv, g)
    if kp is not None and kp.shape[-2] > 0:
        qp = q.transpose(0, 1).reshape(1, Hkv, B * g, D)  # every row's queries against one prefix
        out_p, lse_p = flash(qp, kp, vp, scale=scaling)  # (1, Hkv, B*g, D), (1, Hkv, B*g)
        out_p = out_p.view(Hkv, B, g, D).transpose(0, 1)  # (B, Hkv, g, D)
        lse_p = lse_p.view(Hkv, B, g).transpose(0, 1)
        both = torch.logaddexp(lse, lse_p)  # (B, Hkv, g), float32
        out = (out * (lse - both).exp()[..., None] + out_p * (lse_p - both).exp()[..., None]).to(query.dtype)
    return out.reshape(B, 1, Hq, D)


def flash_step(device: torch.device) -> bool:
    """Whether decode steps on `device` attend through `attend_step` (torch's CPU flash kernel)."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def prepare_prefix(prefix: live.Layers) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer the shared prefix's keys transposed, (Hkv, D, P), and values (Hkv, P, D),
    both contiguous: what `attend_rows` reads every decode step."""
    return [(k[0].transpose(-1, -2).contiguous(), v[0].contiguous()) for k, v in prefix]


AttentionInterface.register(ATTN_NAME, prefix_attention)
_attn_lock = threading.Lock()


@contextmanager
def _prefix_attention(model: Any) -> Iterator[None]:
    """Route the model's attention through `prefix_attention` for the duration."""
    with _attn_lock:
        old = model.config._attn_implementation
        model.config._attn_implementation = ATTN_NAME
        try:
            yield
        finally:
            model.config._attn_implementation = old


# -- rows and events ----------------------------------------------------------------


@dataclass
class BatchRow:
    """One prompt of a batch.

    ids: the whole prompt's token ids; they start with the batch's shared prefix.
    cache: a cache of ids[prefix_len : cached] (after the prefix), or None when
        `cached` == prefix_len.
    keep_cache: hand the row's whole cache back when it finishes (to spill it).
    """

    ids: list[int]
    settings: GenerationSettings
    cache: DynamicCache | None = None
    cached: int = 0
    keep_cache: bool = False


@dataclass
class BatchStep:
    """A token of one row, or the row's end (token None, finish_reason set).

    On a row's end with keep_cache, `cache` is a (1, H, T, D) cache covering every
    token fed for that row: the prompt and all generated tokens but the last.
    """

    row: int
    token: int | None
    finish_reason: str | None = None
    cache: DynamicCache | None = None


def _pad_left(layers: list[live.Layers | None], width: int, like: live.Layers) -> live.Layers:
    """Stack per-row layers (1, H, t_i, D) into (B, H, width, D), zeros on the left."""
    out = []
    for li, (k0, v0) in enumerate(like):
        ks, vs = [], []
        for row in layers:
            k = row[li][0] if row else k0[..., :0, :]
            v = row[li][1] if row else v0[..., :0, :]
            pad = width - k.shape[-2]
            ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))  # (1, H, width, D)
            vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        out.append((torch.cat(ks), torch.cat(vs)))
    return out


class BatchDecoder:
    """Prefill and decode several rows together; iterate for `BatchStep`s.

    Args:
        model: a transformers causal LM with a DynamicCache-compatible attention.
        rows: the prompts (each with >= 1 token left to prefill).
        prefix: per layer (keys, values) (1, H, P, D) shared by all rows, or None.
        eos_ids, max_positions, cancel: as in `generate.generate`.
    Every row gets exactly the decisions `generate.generate` would make for it alone.
    """

    def __init__(
        self,
        model: Any,  # a transformers causal LM (untyped)
        rows: Sequence[BatchRow],
        prefix: live.Layers | None,
        eos_ids: Sequence[int],
        max_positions: int,
        cancel: threading.Event | None = None,
    ) -> None:
        # Prefill rows run through transformers' forward with this module's attention, switched
        # on the forward's own config: a lean-loaded model's is transformers' model over its
        # weights (engine/leanload.py).
        self.model = model.full() if isinstance(model, LeanModel) else model
        self.rows = list(rows)
        self.prefix = prefix if prefix and prefix[0][0].shape[-2] > 0 else None
        self.prefix_len = self.prefix[0][0].shape[-2] if self.prefix else 0
        self.eos = set(eos_ids)
        self.max_positions = max_positions
        self.cancel = cancel
        self._stopping: set[int] = set()
        # Decode steps take the lean step where the model can (engine/lean.py), with this
        # module's attention; prefill pieces go through the forward. Asked here, before the
        # model's attention is switched to "chatkv_prefix", which the lean step would refuse.
        self.lean = lean_for(model)
        self._prepared: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # prepare_prefix(prefix)
        for i, r in enumerate(self.rows):
            if r.cached < self.prefix_len or r.cached >= len(r.ids):
                raise ValueError(
                    f"row {i}: cached={r.cached} must be in [prefix_len={self.prefix_len}, "
                    f"len(ids)={len(r.ids)})"
                )

    def stop(self, row: int) -> None:
        """End `row` before its next token (finish reason "stop"): e.g. a stop string was seen."""
        self._stopping.add(row)

    # -- model calls --------------------------------------------------------------

    def _forward(
        self, ids: torch.Tensor, pos: torch.Tensor, past: DynamicCache, valid: torch.Tensor
    ) -> torch.Tensor:
        """Feed ids (B, L) at positions pos (B, L); `valid` (B, S+L) covers the cache and the new
        columns. Returns the last column's logits (B, V)."""
        B, L = ids.shape
        S = valid.shape[1]
        k = torch.arange(S, device=ids.device)
        q = torch.arange(S - L, S, device=ids.device)
        causal = k[None, :] <= q[:, None]  # (L, S)
        mask = (valid[:, None, :] & causal[None]) | (k[None, :] == q[:, None])[None]  # (B, L, S)
        # A padding query attends only to itself: never to nothing (that would be NaN).
        if L == 1 and self.lean is not None:
            return self.lean.step_rows(ids, pos, past, self._attend(valid, mask))
        out = self.model(
            input_ids=ids,
            position_ids=pos,
            attention_mask=mask[:, None],
            **cache_arg(self.model, past),
            use_cache=True,
            logits_to_keep=1,
            **{PREFIX_KWARG: self.prefix},
        )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _attend(self, valid: torch.Tensor, mask: torch.Tensor) -> Attend:
        """The lean step's attention for one decode step: `attend_step` on the CPU, else
        `attend_rows` (with the prefix prepared once per batch). valid (B, S), mask (B, 1, S)."""
        assert self.lean is not None
        layers, prefix = self.lean.layers, self.prefix
        if flash_step(valid.device):
            dtype = layers[0].o.w.dtype
            bias = torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, float("-inf"))[:, None, None]

            def flash(i: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
                kp, vp = prefix[i] if prefix else (None, None)
                return attend_step(q, keys, values, bias, layers[i].scale, kp, vp)

            return flash
        if self._prepared is None and prefix:
            self._prepared = prepare_prefix(prefix)
        prepared = self._prepared

        def rows(i: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            kpt, vp = prepared[i] if prepared else (None, None)
            return attend_rows(q, keys, values, mask[:, None], layers[i].scale, kpt, vp)

        return rows

    @torch.inference_mode()
    def __iter__(self) -> Iterator[BatchStep]:
        with _prefix_attention(self.model):
            yield from self._run()

    def _start(self) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Build the padded per-row cache from the rows' own caches and prefill what is left.
        Returns (past, valid (B, S), next positions (B,), last logits (B, V))."""
        dev = self.model.device
        own = [
            live.layers_of(r.cache) if r.cache is not None and live.seq_len(r.cache) else None
            for r in self.rows
        ]
        lens = [r.cached - self.prefix_len for r in self.rows]
        for r, layers, n in zip(self.rows, own, lens, strict=True):
            if (layers[0][0].shape[-2] if layers else 0) != n:
                raise ValueError(
                    f"a row's cache covers {live.seq_len(r.cache) if r.cache else 0} tokens, expected {n}"
                )
        like = self.prefix or next((x for x in own if x), None)
        C = max(lens)
        past = live.dynamic(live.new_cache(self.model))
        if C and like is not None:
            for layer, (k, v) in zip(live.kv_layers(past), _pad_left(own, C, like), strict=True):
                layer.update(k.to(dev), v.to(dev))  # (B, H, C, D)
        left = C - torch.tensor(lens, device=dev)  # padding before each row's own cache
        valid = torch.arange(C, device=dev)[None, :] >= left[:, None]  # (B, C)
        rest = [r.ids[r.cached :] for r in self.rows]
        R = max(len(x) for x in rest)
        B = len(self.rows)
        ids = torch.zeros(B, R, dtype=torch.long, device=dev)
        pos = torch.zeros(B, R, dtype=torch.long, device=dev)
        new_valid = torch.zeros(B, R, dtype=torch.bool, device=dev)
        for i, (r, x) in enumerate(zip(self.rows, rest, strict=True)):
            ids[i, R - len(x) :] = torch.tensor(x, device=dev)
            pos[i, R - len(x) :] = torch.arange(r.cached, len(r.ids), device=dev)
            new_valid[i, R - len(x) :] = True
        step = max(16, PREFILL_STEP // B)  # bounds the (B, L, S) activations of one pass
        logits: torch.Tensor | None = None
        for a in range(0, R, step):
            b = min(R, a + step)
            valid = torch.cat([valid, new_valid[:, a:b]], dim=1)
            logits = self._forward(ids[:, a:b], pos[:, a:b], past, valid)
        nxt = torch.tensor([len(r.ids) for r in self.rows], device=dev)
        assert logits is not None  # R >= 1: __init__ checked every row has a token left to prefill
        return past, valid, nxt, logits

    def _row_cache(self, past: DynamicCache, valid: torch.Tensor, i: int) -> DynamicCache:
        """Row i's whole cache (prefix + its own positions), (1, H, T, D)."""
        idx = valid[i].nonzero().squeeze(-1)
        layers = [
            (k[i : i + 1].index_select(-2, idx), v[i : i + 1].index_select(-2, idx))
            for k, v in live.layers_of(past)
        ]
        if self.prefix:
            layers = [
                (torch.cat([pk, k], -2), torch.cat([pv, v], -2))
                for (pk, pv), (k, v) in zip(self.prefix, layers, strict=True)
            ]
        return live.dynamic(live.cache_from_layers(self.model, layers))

    def _run(self) -> Iterator[BatchStep]:
        past, valid, pos, logits = self._start()
        dev = self.model.device
        samplers = [Sampler(r.settings, dev) for r in self.rows]
        made = [0] * len(self.rows)
        active = list(range(len(self.rows)))  # batch index -> row
        while active:
            cancelled = self.cancel is not None and self.cancel.is_set()
            keep: list[int] = []
            tokens: list[int] = []
            done: list[tuple[int, int, str, int | None]] = []  # (batch index, row, reason, last token)
            logits = logits.float()  # once for all rows: each sampler would convert its row
            for b, row in enumerate(active):
                r = self.rows[row]
                if cancelled or row in self._stopping:
                    done.append((b, row, "cancelled" if cancelled else "stop", None))
                    continue
                tid = int(samplers[row](logits[b : b + 1])[0])
                if tid in self.eos:
                    done.append((b, row, "stop", None))
                    continue
                made[row] += 1
                if made[row] == r.settings.max_new_tokens or int(pos[b]) + 1 >= self.max_positions:
                    done.append((b, row, "length", tid))
                    continue
                keep.append(b)
                tokens.append(tid)
            # Events for tokens first, then ends, in row order within the step.
            for b, tid in zip(keep, tokens, strict=True):
                yield BatchStep(active[b], tid)
            # A row stopped by the consumer on this step's token (a stop string) ends
            # before that token is fed, as `generate` would end it.
            late = [j for j, b in enumerate(keep) if active[b] in self._stopping]
            done += [(keep[j], active[keep[j]], "stop", None) for j in late]
            keep = [b for j, b in enumerate(keep) if j not in late]
            tokens = [t for j, t in enumerate(tokens) if j not in late]
            for b, row, reason, last in done:
                if last is not None:
                    yield BatchStep(row, last)
                cache = self._row_cache(past, valid, b) if self.rows[row].keep_cache else None
                yield BatchStep(row, None, reason, cache)
            if not keep:
                return
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=dev)
                past.batch_select_indices(idx)
                valid, pos = valid[idx], pos[idx]
                first = int(valid.any(0).float().argmax())  # drop columns no remaining row uses
                if first:
                    _crop_front(past, first)
                    valid = valid[:, first:]
                active = [active[b] for b in keep]
            ids = torch.tensor(tokens, device=dev)[:, None]  # (B, 1)
            valid = torch.cat([valid, torch.ones(len(active), 1, dtype=torch.bool, device=dev)], dim=1)
            logits = self._forward(ids, pos[:, None], past, valid)
            pos = pos + 1


def _crop_front(cache: DynamicCache, n: int) -> None:
    """Drop the first n positions of every layer."""
    for layer in live.kv_layers(cache):
        layer.keys = layer.keys[..., n:, :]
        layer.values = layer.values[..., n:, :]
