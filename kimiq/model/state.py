"""Inference state, passed explicitly to ``model(input_ids, state)``; nothing hides in modules.

One object per layer plus per-row lengths:

* ``KDAState`` (linear-attention layers): the last ``W-1`` **raw** (pre-conv, pre-SiLU)
  outputs of ``q_proj``/``k_proj``/``v_proj`` for the three short convolutions,
  ``conv_q/k/v: [B, C, W-1]`` in the model dtype, and the recurrent state
  ``recurrent: [B, H, K, V]`` (K-first layout, as fla), **always fp32**.
* ``MLAState`` (full-attention layers): the latent cache ``latent: [B, capacity, R + P]``
  (normalised ``c`` of width kv_lora_rank R, then the shared, never-rotated key slice of
  width qk_rope_head_dim P), in the model dtype or the model's ``cache_dtype`` (bf16 for an fp32 model halves
  it; written rounded, read back widened).  Slots at and beyond a row's length are garbage
  and never attended to.
* ``ModelState.lengths: [B]`` (int64): tokens consumed per row.  Rows may differ; a forward
  call takes right-padded input plus ``n_valid[B]``.

Rollback (prompt cache, speculative decoding) is by snapshot: ``snapshot()`` copies the
KDA tensors (conv taps + fp32 recurrent state, O(layers·H·K·V) per row, independent of
context length) and the lengths; MLA caches are not copied because later writes only land
at positions >= the lengths at snapshot time, so restoring the lengths restores attention
exactly.  ``restore(snap)`` puts the copies back in place (buffers keep their identity).
The recurrent state cannot be "trimmed" by token count; only exact snapshots restore it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KDAState", "MLAState", "ModelState", "Snapshot"]


@dataclass
class KDAState:
    conv_q: torch.Tensor  # [B, C, W-1] raw q_proj outputs
    conv_k: torch.Tensor  # [B, C, W-1]
    conv_v: torch.Tensor  # [B, C, W-1]
    recurrent: torch.Tensor  # [B, H, K, V] fp32

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.conv_q, self.conv_k, self.conv_v, self.recurrent)


@dataclass
class MLAState:
    latent: torch.Tensor  # [B, capacity, R + P]

    @property
    def capacity(self) -> int:
        return self.latent.shape[1]

    def ensure_capacity(self, needed: int) -> None:
        """Grow (by doubling) so that ``needed`` positions fit; keeps the prefix."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity, 16)
        grown = self.latent.new_zeros(self.latent.shape[0], new_cap, self.latent.shape[2])
        grown[:, : self.capacity] = self.latent
        self.latent = grown


@dataclass
class Snapshot:
    lengths: torch.Tensor
    kda: list[tuple[torch.Tensor, ...] | None]


class ModelState:
    """Per-layer states plus ``lengths[B]``.  Build with ``model.new_state(batch_size)``."""

    def __init__(self, layers: list[KDAState | MLAState], lengths: torch.Tensor):
        self.layers = layers
        self.lengths = lengths

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def nbytes(self) -> int:
        n = 0
        for s in self.layers:
            ts = s.tensors() if isinstance(s, KDAState) else (s.latent,)
            n += sum(t.numel() * t.element_size() for t in ts)
        return n

    def snapshot(self) -> Snapshot:
        return Snapshot(
            lengths=self.lengths.clone(),
            kda=[tuple(t.clone() for t in s.tensors()) if isinstance(s, KDAState) else None for s in self.layers],
        )

    def restore(self, snap: Snapshot) -> None:
        if snap.lengths.shape != self.lengths.shape:
            raise ValueError("snapshot was taken with a different batch size")
        if bool((snap.lengths > self.lengths).any()):
            # MLA slots past the current lengths may have been overwritten since the snapshot.
            raise ValueError("cannot restore a snapshot that is ahead of the state (lengths would grow)")
        self.lengths.copy_(snap.lengths)
        for s, saved in zip(self.layers, snap.kda):
            if saved is not None:
                for dst, src in zip(s.tensors(), saved):
                    dst.copy_(src)

    def select(self, rows: torch.Tensor | list[int]) -> "ModelState":
        """A new state holding copies of the given rows (batch filtering / fork)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        layers: list[KDAState | MLAState] = []
        for s in self.layers:
            if isinstance(s, KDAState):
                layers.append(KDAState(*(t.index_select(0, idx) for t in s.tensors())))
            else:
                layers.append(MLAState(s.latent.index_select(0, idx)))
        return ModelState(layers, self.lengths.index_select(0, idx))

    def clone(self) -> "ModelState":
        return self.select(list(range(self.batch_size)))
