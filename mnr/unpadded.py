"""The unpadded forward: a step's texts as one token stream, no FLOP on padding.

`flatten` turns a padded (n, T) batch into one (1, N) stream of its N real tokens with the segment boundaries
(`cu_seqlens`, per-segment `position_ids`); `unpadded_embed` runs the transformer on it and pools each segment.
Attention sees the boundaries through transformers' attention interface (`cu_seq_lens_q/k`, `max_length_q/k`
kwargs): FlashAttention-2 varlen where it is installed (CUDA), else "mnr_varlen" (registered here): torch's
varlen flash kernel on CUDA without attention dropout, else a reference that re-pads the queries, keys and values
of each segment and runs masked sdpa (causal for decoders, bidirectional for encoders).  The linear layers, which
hold almost all FLOPs, always run on the N real tokens only.

Invariants: the embeddings equal those of the right-padded forward (segment i at positions 0..len_i-1, shifted
to padding_idx+1.. for RoBERTa-family embeddings; token_type_ids zero); a model on "mnr_varlen" still runs
padded batches exactly as under sdpa (a 2-d padding mask reaches the attention function).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

BACKEND = "mnr_varlen"
# Families whose unpadded forward is tested equal to the padded one (embeddings and gradients), tests/test_unpadded.py
VERIFIED = ("bert", "roberta", "xlm-roberta", "llama", "qwen2", "mistral")


@dataclass
class Flat:
    """A batch of n texts as one stream of N real tokens: segment i is ids[0, cu_seqlens[i]:cu_seqlens[i+1]]."""

    ids: torch.Tensor  # (1, N) token ids
    position_ids: torch.Tensor  # (1, N) 0..len_i-1 within each segment
    cu_seqlens: torch.Tensor  # (n + 1,) int32 segment starts, then N
    max_len: int  # longest segment (a Python int: the kernels take it, so no sync inside the step)
    lengths: torch.Tensor  # (n,) int64 tokens per segment, each >= 1

    @property
    def segments(self) -> int:
        return self.lengths.shape[0]

    def to(self, device, non_blocking: bool = False) -> "Flat":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Flat(move(self.ids), move(self.position_ids), move(self.cu_seqlens), self.max_len, move(self.lengths))


class UnpaddedError(ValueError):
    """A batch or model the unpadded forward cannot take; the message names it."""


def flatten(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Flat:
    """(n, T) ids and 0/1 mask (each row's real tokens contiguous, padded on either side) -> Flat.
    One host sync when the mask is on a device (the lengths); none for the collator's CPU tensors."""
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    counts = lengths.tolist()
    if min(counts, default=0) < 1:
        raise UnpaddedError(f"attention_mask has a row without tokens (lengths {counts}); every text needs one")
    ids = input_ids[mask].unsqueeze(0)  # row-major: segment after segment, tokens in order
    cu = torch.zeros(len(counts) + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = lengths.cumsum(0)
    starts = torch.repeat_interleave(cu[:-1].long(), lengths, output_size=ids.shape[1])
    positions = torch.arange(ids.shape[1], device=input_ids.device) - starts
    return Flat(ids, positions.unsqueeze(0), cu, max(counts), lengths.long())


def _segment_ids(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """(N,) index of the segment of every token, without a host sync."""
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device), lengths, output_size=total)


def pool_flat(hidden: torch.Tensor, flat: Flat, pooling: str) -> torch.Tensor:
    """(N, d) token states of a Flat -> (n, d) float32: mean over each segment, its first (cls) or last token."""
    if pooling == "cls":
        return hidden[flat.cu_seqlens[:-1].long()].float()
    if pooling == "lasttoken":
        return hidden[flat.cu_seqlens[1:].long() - 1].float()
    if pooling != "mean":
        raise UnpaddedError(f"pooling={pooling!r} is invalid for the unpadded forward: allowed: mean, cls, lasttoken")
    seg = _segment_ids(flat.lengths, hidden.shape[0])
    summed = torch.zeros(flat.segments, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    summed = summed.index_add(0, seg, hidden.float())  # out of place: autograd keeps its graph
    return summed / flat.lengths.unsqueeze(1).to(torch.float32)


def position_offset(transformer: nn.Module) -> int:
    """First position id of a text: padding_idx + 1 for RoBERTa-family embeddings (they number positions from
    there), else 0."""
    embeddings = getattr(transformer, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    return 0 if padding_idx is None else int(padding_idx) + 1


def supports_unpadded(transformer: nn.Module) -> str | None:
    """None when `transformer` runs unpadded exactly; else the reason (the caller keeps length buckets and logs it)."""
    config = transformer.config
    kind = getattr(config, "model_type", "?")
    if kind not in VERIFIED:
        return f"model_type {kind!r} is not among the families verified unpadded ({', '.join(VERIFIED)})"
    if not getattr(type(transformer), "_supports_attention_backend", False):
        return f"{type(transformer).__name__}'s attention does not go through transformers' attention interface"
    if "position_ids" not in inspect.signature(transformer.forward).parameters:
        return f"{type(transformer).__name__}.forward takes no position_ids"
    if getattr(config, "add_cross_attention", False):
        return "the model has cross-attention"
    if getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        return (f"position_embedding_type {config.position_embedding_type!r}: only absolute positions restart per "
                f"segment")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"sliding-window attention ({config.sliding_window}) is not implemented by the varlen reference"
    return None


def attention_backend(device: torch.device | str) -> str:
    """The attention implementation for unpadded forwards on `device`: flash_attention_2 on CUDA where the
    flash-attn package is installed, else mnr_varlen."""
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if torch.device(device).type == "cuda" and is_flash_attn_2_available() else BACKEND


def prepare_unpadded(transformer: nn.Module, device: torch.device | str | None = None) -> str | None:
    """Switch `transformer` to the unpadded attention backend for `device` (padded batches keep working); returns
    None, or the reason it cannot run unpadded (then nothing changes)."""
    reason = supports_unpadded(transformer)
    if reason is None:
        device = device if device is not None else next(transformer.parameters()).device
        transformer.set_attn_implementation(attention_backend(device))
    return reason


def unpadded_embed(transformer: nn.Module, flat: Flat, pooling: str) -> torch.Tensor:
    """(n, d) float32 embeddings of the Flat's segments; `transformer` prepared by `prepare_unpadded`."""
    impl = transformer.config._attn_implementation
    if impl not in (BACKEND, "flash_attention_2", "flash_attention_3"):
        raise UnpaddedError(f"attn_implementation={impl!r} cannot see segment boundaries: call prepare_unpadded first")
    kwargs = {}
    if "token_type_ids" in inspect.signature(transformer.forward).parameters:
        kwargs["token_type_ids"] = torch.zeros_like(flat.ids)
    offset = position_offset(transformer)
    hidden = transformer(input_ids=flat.ids, attention_mask=None, position_ids=flat.position_ids + offset,
                         cu_seq_lens_q=flat.cu_seqlens, cu_seq_lens_k=flat.cu_seqlens,
                         max_length_q=flat.max_len, max_length_k=flat.max_len, **kwargs).last_hidden_state
    return pool_flat(hidden[0], flat, pooling)


class UnpaddedEncoder(nn.Module):
    """`model(input_ids, attention_mask) -> (n, d)` on the unpadded path: what GradCache and train_step call."""

    def __init__(self, transformer: nn.Module, pooling: str = "mean"):
        super().__init__()
        reason = prepare_unpadded(transformer)
        if reason is not None:
            raise UnpaddedError(f"cannot run unpadded: {reason}")
        self.transformer, self.pooling = transformer, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return unpadded_embed(self.transformer, flatten(input_ids, attention_mask), self.pooling)


# ---------------------------------------------------------------------------------------------
# attention functions (transformers' interface: (module, q, k, v, mask, **kwargs) -> ((1, N, H, D), None))


def _varlen_kernel():
    """torch's varlen flash-attention function, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _torch_varlen(module, query, key, value, cu, max_len, scaling):
    """(1, H, N, D) q/k/v -> (1, N, H, D) through torch.nn.attention.varlen (CUDA, no dropout)."""
    kernel = _varlen_kernel()
    params = inspect.signature(kernel).parameters
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, H, D)
    kwargs = {"scale": scaling}
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = query.shape[1] // key.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if getattr(module, "is_causal", False):
        kwargs.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
    out = kernel(q, k, v, cu, cu, max_len, max_len, **kwargs)
    return out.unsqueeze(0)


def _repadded(module, query, key, value, cu, max_len, dropout, scaling):
    """(1, H, N, D) q/k/v -> (1, N, H, D): each segment's tokens copied into an (n, H, max_len, D) block, masked
    sdpa over it, the real slots selected back; exact per-segment attention with no host sync (max_len is an int).
    index_copy / index_select: their backward passes are a select and an index_add, no scatter of duplicates."""
    total, lengths = query.shape[2], (cu[1:] - cu[:-1]).long()
    n, dim = lengths.shape[0], query.shape[3]
    seg = _segment_ids(lengths, total)
    slot = seg * max_len + torch.arange(total, device=query.device) - cu[:-1].long()[seg]  # (N,) slot in n x L

    def block(t: torch.Tensor) -> torch.Tensor:  # (1, h, N, D) -> (n, h, L, D), zeros in the padding slots
        tokens = t[0].transpose(0, 1)  # (N, h, D)
        return tokens.new_zeros(n * max_len, t.shape[1], dim).index_copy(0, slot, tokens).view(
            n, max_len, t.shape[1], dim).transpose(1, 2)

    valid = torch.arange(max_len, device=query.device)[None] < lengths[:, None]  # (n, L)
    mask = valid[:, None, None, :]  # (n, 1, 1, L) keys that exist
    if getattr(module, "is_causal", False):
        mask = mask & torch.ones(max_len, max_len, dtype=torch.bool, device=query.device).tril()
    out = torch.nn.functional.scaled_dot_product_attention(block(query), block(key), block(value), attn_mask=mask,
                                                           dropout_p=dropout, scale=scaling,
                                                           enable_gqa=key.shape[1] != query.shape[1])  # (n, H, L, D)
    return out.transpose(1, 2).reshape(n * max_len, query.shape[1], dim).index_select(0, slot).unsqueeze(0)


def varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs):
    """The "mnr_varlen" attention: segments from cu_seq_lens_q when given (the unpadded forward), else a padded
    batch with its 2-d padding mask (or none), as sdpa would compute it."""
    if kwargs.get("sliding_window"):
        raise UnpaddedError(f"sliding_window={kwargs['sliding_window']} is not implemented by {BACKEND}")
    if cu_seq_lens_q is not None:
        if query.shape[0] != 1:
            raise UnpaddedError(f"an unpadded batch is one stream (batch dim 1), got {query.shape[0]}")
        if query.is_cuda and dropout == 0.0 and _varlen_kernel() is not None:
            return _torch_varlen(module, query, key, value, cu_seq_lens_q.int(), max_length_q, scaling), None
        return _repadded(module, query, key, value, cu_seq_lens_q, max_length_q, dropout, scaling), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.ndim == 2:  # (n, T) padding mask from flash_attention_mask
        keys = attention_mask.bool()[:, None, None, :]  # (n, 1, 1, T)
        if getattr(module, "is_causal", False):
            t = query.shape[2]
            # a padding query sees itself too: no row without keys (its NaN would reach the pooled gradient)
            keys = keys & torch.ones(t, t, dtype=torch.bool, device=query.device).tril() | torch.eye(
                t, dtype=torch.bool, device=query.device)
        attention_mask = keys
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **{k: v for k, v in kwargs.items() if k in ("is_causal",)})


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(BACKEND, varlen_attention)
    # a 2-d padding mask (or None) reaches the attention function, as under FlashAttention: no (n, 1, T, T) mask built
    AttentionMaskInterface.register(BACKEND, flash_attention_mask)


_register()
