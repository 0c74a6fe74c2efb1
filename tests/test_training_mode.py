"""``mode_for`` / ``lora_rank_of``: the one rule between a client's ``lora_rank`` and
the engine's training mode (0: every weight trains; >0: a LoRA of that rank)."""

from __future__ import annotations

import pytest

from vlmtune.types import lora_rank_of, mode_for


def test_rank_zero_is_full_fine_tuning_and_a_positive_rank_a_lora() -> None:
    assert mode_for(0) == "full"
    assert mode_for(1) == mode_for(64) == "lora"
    assert mode_for(16, qlora=True) == "qlora"


def test_a_reported_rank_round_trips_through_the_mode() -> None:
    for rank in (0, 4, 16):
        assert lora_rank_of(mode_for(rank), rank if rank else 16) == rank
    assert lora_rank_of("qlora", 8) == 8


def test_impossible_ranks_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="lora_rank must be 0 .* or positive, got -1"):
        mode_for(-1)
    with pytest.raises(ValueError, match="qlora trains a LoRA"):
        mode_for(0, qlora=True)
