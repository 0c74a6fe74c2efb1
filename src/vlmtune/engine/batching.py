"""Collation: a list of ``Datum`` -> padded tensors the model takes.

Positions are computed here, per example, rather than left to the model: Qwen3-VL's
3-D rotary positions (mRoPE) depend on each image's grid, and computing them per
example is what lets several examples share one packed row later (each restarts at 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vlmtune.types import Datum, EncodedTextChunk, ImageChunk

# (pixel_values (P, D), grid_thw (3,)) for one encoded image
PreprocessFn = Callable[[bytes], tuple[torch.Tensor, torch.Tensor]]

TEXT, IMAGE = 0, 1


def mrope_position_ids(
    token_types_T: Sequence[int],
    grid_thws: Sequence[Sequence[int] | torch.Tensor],
    spatial_merge: int,
) -> torch.Tensor:
    """3-D (temporal, height, width) positions of one example, shape ``(3, T)``.

    Mirrors ``Qwen3VLModel.get_rope_index`` for a single unpadded sequence: text runs
    advance all three axes together; an image run of ``h*w`` merged patches gets
    ``t = start``, ``h = start + row``, ``w = start + col``, and the next text position
    is ``start + max(h, w)``. A test checks equality with the model's own function.
    """
    pieces: list[torch.Tensor] = []
    grids = iter(grid_thws)
    pos = 0
    i, n = 0, len(token_types_T)
    while i < n:
        j = i
        while j < n and token_types_T[j] == token_types_T[i]:
            j += 1
        if token_types_T[i] == TEXT:
            pieces.append(torch.arange(pos, pos + (j - i)).view(1, -1).expand(3, -1))
            pos += j - i
        else:
            # consecutive images would form one run: split it by each grid's size
            k = i
            while k < j:
                _, gh, gw = (int(x) for x in next(grids))
                h, w = gh // spatial_merge, gw // spatial_merge
                hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                block = torch.stack(
                    [torch.zeros(h * w, dtype=torch.long), hh.reshape(-1), ww.reshape(-1)]
                )
                pieces.append(block + pos)
                pos += max(h, w)
                k += h * w
        i = j
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(pieces, dim=1)


@dataclass
class Batch:
    input_ids_B_T: torch.Tensor
    attention_mask_B_T: torch.Tensor  # 1 on real tokens (all ones in a packed row)
    position_ids_4_B_T: torch.Tensor  # row 0: text positions; rows 1-3: mRoPE t/h/w
    targets_B_T: torch.Tensor
    loss_inputs: dict[str, torch.Tensor]  # each (B, T), zero on padding
    segments: list[tuple[int, int, int]]  # per datum, in input order: (row, start, length)
    pixel_values: torch.Tensor | None = None  # (sum of patches, patch_dim)
    image_grid_thw: torch.Tensor | None = None  # (num_images, 3)
    packed: bool = False  # rows hold several examples; positions restart per example

    def to(self, device: torch.device | str) -> Batch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            input_ids_B_T=self.input_ids_B_T.to(device),
            attention_mask_B_T=self.attention_mask_B_T.to(device),
            position_ids_4_B_T=self.position_ids_4_B_T.to(device),
            targets_B_T=self.targets_B_T.to(device),
            loss_inputs={k: v.to(device) for k, v in self.loss_inputs.items()},
            segments=self.segments,
            pixel_values=mv(self.pixel_values),
            image_grid_thw=mv(self.image_grid_thw),
            packed=self.packed,
        )


@dataclass
class _Encoded:
    """One datum as flat tensors, positions starting at 0."""

    ids: list[int]
    positions_4_T: torch.Tensor
    pixels: list[torch.Tensor]
    grids: list[torch.Tensor]
    inputs: dict[str, torch.Tensor]  # target_tokens and the loss inputs, each (T,)


def _encode(
    datum: Datum, image_token_id: int, spatial_merge: int, preprocess: PreprocessFn
) -> _Encoded:
    ids: list[int] = []
    types: list[int] = []
    pixels: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    for chunk in datum.model_input.chunks:
        if isinstance(chunk, EncodedTextChunk):
            ids.extend(chunk.tokens)
            types.extend([TEXT] * len(chunk.tokens))
            continue
        assert isinstance(chunk, ImageChunk)
        pixel_values, grid = preprocess(chunk.data)
        n_tokens = int(grid.prod()) // spatial_merge**2
        if n_tokens != chunk.expected_tokens:
            raise ValueError(
                f"image chunk expects {chunk.expected_tokens} tokens but the processor "
                f"makes {n_tokens} for it (grid {grid.tolist()})"
            )
        ids.extend([image_token_id] * n_tokens)
        types.extend([IMAGE] * n_tokens)
        pixels.append(pixel_values)
        grids.append(grid)
    n = len(ids)
    positions = torch.empty((4, n), dtype=torch.long)
    positions[0] = torch.arange(n)
    positions[1:] = mrope_position_ids(types, grids, spatial_merge)
    inputs = {}
    for key, td in datum.loss_fn_inputs.items():
        values = torch.as_tensor(td.data)
        if values.numel() != n:
            raise ValueError(
                f"loss_fn_inputs[{key!r}] has {values.numel()} values for {n} positions"
            )
        inputs[key] = values.long() if key == "target_tokens" else values.float()
    return _Encoded(ids, positions, pixels, grids, inputs)


def collate(
    datums: Sequence[Datum],
    *,
    image_token_id: int,
    pad_token_id: int,
    spatial_merge: int,
    preprocess: PreprocessFn,
    rows: Sequence[Sequence[int]] | None = None,
) -> Batch:
    """Right-padded rows; with ``rows`` (lists of datum indices), several examples share
    a row (packing): their positions restart at 0, and ``segments`` tell attention
    where each example starts, so that it attends within each one only
    (``segment_bounds``; models/packed_attention.py).

    Raises ``ValueError`` when an image chunk's ``expected_tokens`` disagrees with the
    processor's own count, naming both numbers.
    """
    encoded = [_encode(d, image_token_id, spatial_merge, preprocess) for d in datums]
    packed = rows is not None
    row_members = [list(r) for r in rows] if rows is not None else [[i] for i in range(len(datums))]
    row_lengths = [sum(len(encoded[i].ids) for i in members) for members in row_members]
    B, T = len(row_members), max(row_lengths)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((4, B, T), dtype=torch.long)
    targets = torch.zeros((B, T), dtype=torch.long)
    loss_inputs: dict[str, torch.Tensor] = {}
    segments: list[tuple[int, int, int]] = [(0, 0, 0)] * len(datums)
    pixel_list: list[torch.Tensor] = []
    grid_list: list[torch.Tensor] = []
    for b, members in enumerate(row_members):
        start = 0
        for i in members:
            enc = encoded[i]
            n = len(enc.ids)
            sl = slice(start, start + n)
            input_ids[b, sl] = torch.tensor(enc.ids, dtype=torch.long)
            attention_mask[b, sl] = 1
            position_ids[:, b, sl] = enc.positions_4_T
            for key, values in enc.inputs.items():
                if key == "target_tokens":
                    targets[b, sl] = values
                else:
                    loss_inputs.setdefault(key, torch.zeros((B, T), dtype=torch.float32))[b, sl] = (
                        values
                    )
            pixel_list.extend(enc.pixels)
            grid_list.extend(enc.grids)
            segments[i] = (b, start, n)
            start += n
        if packed and start < T:  # pad positions continue the last example: harmless, unweighted
            position_ids[:, b, start:] = position_ids[:, b, start - 1 : start] + torch.arange(
                1, T - start + 1
            )
    return Batch(
        input_ids_B_T=input_ids,
        attention_mask_B_T=attention_mask,
        position_ids_4_B_T=position_ids,
        targets_B_T=targets,
        loss_inputs=loss_inputs,
        segments=segments,
        pixel_values=torch.cat(pixel_list) if pixel_list else None,
        image_grid_thw=torch.stack(grid_list).long() if grid_list else None,
        packed=packed,
    )


def segment_bounds(segments: Sequence[tuple[int, int, int]], B: int, T: int) -> list[int]:
    """Offsets of a packed batch's segments in its flattened ``B * T`` tokens, from 0 to
    ``B * T`` (flash-attention's ``cu_seqlens``). ``segments`` are ``Batch.segments``
    (row, start, length); the padding at a row's end is a segment of its own, so every
    token belongs to exactly one."""
    bounds = {0, B * T, *(b * T for b in range(B))}
    for b, start, length in segments:
        bounds.update((b * T + start, b * T + start + length))
    return sorted(bounds)


def pack_rows(lengths: Sequence[int], max_row_tokens: int) -> list[list[int]]:
    """Greedy first-fit-decreasing bin packing of example lengths into rows.

    Examples are never split; one longer than ``max_row_tokens`` gets a row of its own.
    Returns lists of example indices, each list's examples in their input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max_row_tokens - lengths[i])
    return [sorted(r) for r in rows]


def packing_efficiency(
    lengths: Sequence[int], rows: Sequence[Sequence[int]], max_row_tokens: int
) -> float:
    """Real tokens / row capacity."""
    return sum(lengths) / max(1, len(rows) * max_row_tokens)
