"""The sense-edit protocol: how an intervention reaches the model.

A sense edit may rewrite the sense vectors of the tokens it sees (`edit`) and rescale the
contextualization weights alpha once they are computed (`reweight`). Both default to the
identity, so an edit overrides only what it changes and the model calls both unconditionally
(an identity costs nothing under jit). Subclasses are pytrees (`flax.struct.dataclass`), so
their arrays pass through jit as data.

Implementations: `interventions.SenseIntervention` (scale or replace senses),
`sense_table.SenseTable` (looked-up senses), `topic.TopicControl` (the paper's annealed weights).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class ReweightInputs:
    """What a `reweight` sees of one call: the S new tokens, written at `cache_index`, and the T
    positions they may attend to (T = S on a full pass)."""

    input_ids_BxS: jax.Array
    senses_BKxTxD: jax.Array  # every position's sense vectors, as edited, the new ones included
    attend_BxSxT: jax.Array  # [B or 1, S, T]: False for padding and future positions
    cache_index: jax.Array | int
    wte_VxD: jax.Array  # the output embeddings E


class SenseEdit:
    """Base of every sense edit; both operations default to the identity."""

    def edit(self, input_ids_BxS: jax.Array, senses_BxSxKxD: jax.Array) -> jax.Array:
        """The sense vectors [B, S, K, D] of the tokens `input_ids_BxS`, as edited."""
        return senses_BxSxKxD

    def reweight(self, alpha_BxKxSxT: jax.Array, inputs: ReweightInputs, state: Any
                 ) -> tuple[jax.Array, Any]:
        """(weights [B, K, S, T] that replace alpha in the sum over senses, new state).

        `state` is what the edit keeps about the prefix between decode steps, in
        `DecodeCache.edit_state`: None on a full pass and at prefill, then whatever the previous
        call returned.
        """
        return alpha_BxKxSxT, state

    @property
    def reweights(self) -> bool:
        """Whether this edit changes alpha (attribution refuses such edits)."""
        return type(self).reweight is not SenseEdit.reweight


def check_edit(sense_edit: Any) -> None:
    """Raises unless `sense_edit` is None or a `SenseEdit` (checked at the API boundary)."""
    if sense_edit is not None and not isinstance(sense_edit, SenseEdit):
        raise TypeError(f"sense_edit must be a backpack_jax.edits.SenseEdit (e.g. from "
                        f"interventions.scale_senses), got {type(sense_edit).__name__}")
