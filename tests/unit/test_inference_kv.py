"""SlotKV: packed rows, aligned attention widths, masks, and moving a row on free."""
import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig
from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

from services.inference.families import FULL, SLIDING
from services.inference.kv import WIDTH_ALIGN, SlotKV

CONFIG = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)


def new_kv(rows: int = 3) -> SlotKV:
    return SlotKV(CONFIG, rows, torch.float32)


def filled(kv: SlotKV, owner: str, length: int, value: float) -> int:
    row = kv.allocate(owner)
    kv.write(row, 0, torch.full((2, kv.layers, kv.kv_heads, length, kv.head_dim), value))
    kv.mark_ready(owner)
    return row


def test_decode_masks_each_row_past_its_own_length_over_an_aligned_width():
    kv = new_kv()
    filled(kv, "a", 5, 1.0)
    filled(kv, "b", 20, 2.0)
    positions, masks = kv.decode([5, 20])
    mask = masks[FULL]
    assert positions.tolist() == [[5], [20]]
    assert mask.shape == (2, 1, 1, 2 * WIDTH_ALIGN)  # 21 columns needed, rounded up
    assert mask[0, 0, 0].nonzero().flatten().tolist() == list(range(6))  # its 5 tokens + the new one
    assert mask[1, 0, 0].nonzero().flatten().tolist() == list(range(21))


def test_update_writes_each_rows_new_token_at_its_own_column():
    kv = new_kv()
    filled(kv, "a", 5, 1.0)
    filled(kv, "b", 9, 2.0)
    kv.decode([5, 9])
    new = torch.stack([torch.full((1, 1, 4), 7.0), torch.full((1, 1, 4), 8.0)])  # (B, kv_heads, 1, head_dim)
    keys, values = kv.update(new, new + 1, layer_idx=1)
    assert keys.shape == (2, 1, WIDTH_ALIGN, 4)
    assert keys[0, 0, 5].tolist() == [7.0] * 4 and keys[0, 0, 4].tolist() == [1.0] * 4
    assert keys[1, 0, 9].tolist() == [8.0] * 4 and values[1, 0, 9].tolist() == [9.0] * 4


def test_prefill_after_a_reused_prefix_is_causal_from_its_start():
    kv = new_kv()
    row = filled(kv, "a", 16, 1.0)
    positions, masks = kv.prefill(row, 16, 3)
    mask = masks[FULL]
    assert positions.tolist() == [[16, 17, 18]]
    assert mask.shape == (1, 1, 3, 2 * WIDTH_ALIGN)
    assert [int(m.sum()) for m in mask[0, 0]] == [17, 18, 19]


def test_freeing_a_row_moves_the_last_row_and_its_kv_into_it():
    kv = new_kv()
    filled(kv, "a", 4, 1.0)
    filled(kv, "b", 4, 2.0)
    filled(kv, "c", 4, 3.0)
    kv.free("a")
    assert kv.owners == ("c", "b")
    assert kv.read(kv.row_of("c"), 0, 4).unique().tolist() == [3.0]
    assert kv.read(kv.row_of("b"), 0, 4).unique().tolist() == [2.0]
    kv.free("b")
    kv.free("c")
    assert kv.used == 0


def test_a_long_row_grows_the_buffers_and_keeps_what_was_there():
    kv = new_kv()
    row = filled(kv, "a", 10, 5.0)
    kv.prefill(row, 10, 1000)
    assert kv.capacity >= 1010
    assert kv.read(row, 0, 10).unique().tolist() == [5.0]
    kv.free("a")
    kv.shrink()
    assert kv.capacity == 0


def test_a_row_being_prefilled_stays_behind_the_decoding_rows_when_one_of_them_leaves():
    kv = new_kv(4)
    filled(kv, "a", 4, 1.0)
    filled(kv, "b", 4, 2.0)
    row = kv.allocate("p")  # being prefilled: not part of a decode step
    kv.write(row, 0, torch.full((2, kv.layers, kv.kv_heads, 8, kv.head_dim), 9.0))
    assert kv.ready == 2 and kv.ready_owners == ("a", "b")
    positions, _ = kv.decode([4, 4])
    assert positions.shape == (2, 1)
    kv.free("a")
    assert kv.owners == ("b", "p") and kv.ready_owners == ("b",)
    assert kv.read(kv.row_of("b"), 0, 4).unique().tolist() == [2.0]
    assert kv.read(kv.row_of("p"), 0, 8).unique().tolist() == [9.0]
    kv.mark_ready("p")
    assert kv.ready_owners == ("b", "p")


def test_several_rows_are_prefilled_at_once_each_joins_the_decoding_rows_when_ready_and_may_leave_before():
    kv = new_kv(4)
    filled(kv, "a", 4, 1.0)
    for owner, value in (("p", 7.0), ("q", 8.0), ("r", 9.0)):
        kv.write(kv.allocate(owner), 0, torch.full((2, kv.layers, kv.kv_heads, 8, kv.head_dim), value))
    assert kv.ready_owners == ("a",) and kv.owners == ("a", "p", "q", "r")
    kv.mark_ready("r")  # out of order: it trades places with the first row being prefilled
    assert kv.ready_owners == ("a", "r") and set(kv.owners[2:]) == {"p", "q"}
    with pytest.raises(RuntimeError):
        kv.mark_ready("r")
    kv.free("p")  # leaves before it is ready
    assert kv.ready_owners == ("a", "r") and kv.owners[2:] == ("q",)
    kv.free("a")
    assert kv.ready_owners == ("r",) and kv.owners == ("r", "q")
    for owner, value in (("r", 9.0), ("q", 8.0)):  # each row's KV moved with it
        assert kv.read(kv.row_of(owner), 0, 8).unique().tolist() == [value]


def test_every_chunk_of_a_prompt_attends_over_the_whole_prompts_aligned_width():
    kv = new_kv()
    row = kv.allocate("a")
    positions, masks = kv.prefill(row, 32, 32, total=100)
    mask = masks[FULL]
    assert positions.tolist() == [list(range(32, 64))]
    assert mask.shape == (1, 1, 32, 112)  # 100 tokens, aligned: the width of one forward over them all
    assert [int(m.sum()) for m in mask[0, 0]] == list(range(33, 65))  # causal, nothing past the chunk
    with pytest.raises(ValueError):
        kv.prefill(row, 96, 8, total=100)


GEMMA = Gemma3TextConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_hidden_layers=2,
                         sliding_window=5, layer_types=[SLIDING, FULL])


def transformers_mask(kind: str, queries: list[int], width: int) -> torch.Tensor:
    """The mask transformers' own mask functions give those query positions over ``width`` columns."""
    rule = causal_mask_function if kind == FULL else and_masks(causal_mask_function, sliding_window_overlay(5))
    return torch.tensor([[bool(rule(0, 0, torch.tensor(q), torch.tensor(k))) for k in range(width)] for q in queries])


def test_a_sliding_window_layer_type_gets_the_models_own_window_and_a_full_one_the_causal_mask():
    kv = SlotKV(GEMMA, 3, torch.float32)
    filled(kv, "a", 3, 1.0)
    filled(kv, "b", 20, 2.0)
    _, masks = kv.decode([3, 20])
    assert set(masks) == {FULL, SLIDING}
    for kind in (FULL, SLIDING):
        assert torch.equal(masks[kind][:, 0, 0], transformers_mask(kind, [3, 20], 2 * WIDTH_ALIGN))
    assert masks[SLIDING][1, 0, 0].nonzero().flatten().tolist() == [16, 17, 18, 19, 20]  # the last 5 only
    row = kv.allocate("c")
    _, masks = kv.prefill(row, 16, 8, total=40)  # a chunk after a reused prefix
    for kind in (FULL, SLIDING):
        assert torch.equal(masks[kind][0, 0], transformers_mask(kind, list(range(16, 24)), 48))
