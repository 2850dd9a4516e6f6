"""Compact variable-length K/V storage for one attention layer.

Layout ("varlen", as in flash-attention's varlen kernels): every (batch row, KV head) pair owns one
*segment* of a flat row buffer.

    keys, values   [rows, head_dim]   K/V rows, segment after segment
    positions      [rows] int32       original token position of each row, -1 for a free slot
    stats[name]    [rows] float32     per-row side channels a policy accumulates into (e.g. H2O scores)
    seg_start      [S] int64          first row of segment s (S = batch * kv_heads, s = b * kv_heads + h)
    seg_len        [S] int64          rows in use
    seg_cap        [S] int64          rows reserved

One extra *sentinel* row at the very end (zero K/V, position -1) is what empty slots of a padded view point
at, so gathers need no masking. Rows inside a segment are ordered by position. Each segment holds exactly what its head keeps, so heads
with different budgets cost different amounts of memory. Shapes only change when a segment runs out of
room or an eviction resizes the layer; between those events appends write in place, which is what a
CUDA-graph-captured decode step needs (lengths live in tensors, never in Python ints).
"""

from __future__ import annotations

import torch


class PaddedView:
    """A transient [batch, kv_heads, max_len] view of a store, built one layer at a time for attention.

    `row_index[b, h, j]` is the storage row behind slot j (0 where the slot is empty) and `valid` says which
    slots hold a token. Empty slots have position -1. When segments differ in capacity, `keys`/`values` are a
    gather (a copy of the layer), made on first read only: a kernel that reads the segments in place never pays it.
    """

    def __init__(self, keys, values, positions, valid, row_index, no_empty_slots=False, heads_aligned=False,
                 gather=None):
        self._keys, self._values, self._gather = keys, values, gather
        # positions, valid and row_index may be given as functions of nothing: a decode step's attention that
        # reads the segments in place never needs them, so they are built on first read
        self._positions = positions  # [B, H, L] int32, -1 = empty slot
        self._valid = valid  # [B, H, L] bool
        self._row_index = row_index  # [B, H, L] int64
        self.no_empty_slots = no_empty_slots  # every segment has exactly L rows
        self.heads_aligned = heads_aligned  # every KV head of a row keeps the same positions

    @property
    def row_index(self) -> torch.Tensor:
        if callable(self._row_index):
            self._row_index = self._row_index()
        return self._row_index

    @property
    def positions(self) -> torch.Tensor:
        if callable(self._positions):
            self._positions = self._positions()
        return self._positions

    @property
    def valid(self) -> torch.Tensor:
        if callable(self._valid):
            self._valid = self._valid()
        return self._valid

    @property
    def materialized(self) -> bool:
        """Whether keys/values exist already (reading them costs nothing more)."""
        return self._gather is None

    def _materialize(self) -> None:
        if self._gather is not None:
            self._keys, self._values = self._gather()
            self._gather = None

    @property
    def keys(self) -> torch.Tensor:  # [B, H, L, d]
        self._materialize()
        return self._keys

    @property
    def values(self) -> torch.Tensor:  # [B, H, L, d]
        self._materialize()
        return self._values


class LayerStore:
    """Variable-length K/V storage of one layer for `batch` rows and `heads` KV heads."""

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.dtype, self.device = dtype, device
        segments = batch * heads
        self.keys = torch.zeros(1, head_dim, dtype=dtype, device=device)  # just the sentinel row
        self.values = torch.zeros(1, head_dim, dtype=dtype, device=device)
        self.positions = torch.full((1,), -1, dtype=torch.int32, device=device)
        self._slot_rows: torch.Tensor | None = None  # [S, max capacity] row behind each slot (sentinel past capacity)
        self.stats: dict[str, torch.Tensor] = {}
        self.seg_start = torch.zeros(segments, dtype=torch.long, device=device)
        self.seg_len = torch.zeros(segments, dtype=torch.long, device=device)
        self.seg_cap = torch.zeros(segments, dtype=torch.long, device=device)
        # Host-side summaries, so the decode hot path needs no device sync.
        self.max_len = 0  # longest segment
        self.min_free = 0  # fewest free rows in any segment
        self.equal_lengths = True  # all segments hold the same number of rows
        self.uniform_cap: int | None = 0  # common capacity when all segments have the same one
        self.heads_aligned = True  # every KV head of a batch row keeps the same positions
        self.host_start: list[int] = [0] * segments  # seg_start and seg_len on the host, for per-segment kernels
        self.host_len: list[int] = [0] * segments
        self.appended_rows: torch.Tensor | None = None  # rows the last append wrote, token after token per segment

    def _refresh_summaries(self) -> None:
        lengths, caps = self.seg_len, self.seg_cap
        self.host_start, self.host_len = self.seg_start.tolist(), lengths.tolist()
        self.max_len = int(lengths.max()) if lengths.numel() else 0
        self.min_free = int((caps - lengths).min()) if lengths.numel() else 0
        self.equal_lengths = bool((lengths == lengths[0]).all()) if lengths.numel() else True
        uniform = lengths.numel() > 0 and bool((caps == caps[0]).all())
        self.uniform_cap = int(caps[0]) if uniform else None

    # ----------------------------------------------------------------- accounting
    @property
    def rows(self) -> int:
        """Rows allocated to segments (the sentinel row excluded)."""
        return self.keys.shape[0] - 1

    def metadata_nbytes(self) -> int:
        """Bytes of `nbytes()` that are not K/V of a segment's row: positions, side channels, the sentinel row."""
        total = self.positions.numel() * self.positions.element_size()
        total += sum(s.numel() * s.element_size() for s in self.stats.values())
        return total + 2 * self.head_dim * self.keys.element_size()

    def nbytes(self) -> int:
        """Bytes held by this layer: K/V rows (free slots included) plus per-row metadata."""
        total = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        total += self.positions.numel() * self.positions.element_size()
        total += sum(s.numel() * s.element_size() for s in self.stats.values())
        return total

    def kept_counts(self) -> torch.Tensor:
        """Tokens kept per (batch row, KV head): LongTensor [batch, heads]."""
        return self.seg_len.view(self.batch, self.heads).clone()

    # ----------------------------------------------------------------- layout changes
    def _segment_rows(self, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Flat row ids start[s] + 0..len[s]-1 for every segment, in segment order."""
        total = int(lengths.sum())
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=self.device), lengths, output_size=total)
        first = torch.cumsum(lengths, 0) - lengths
        return starts[seg] + torch.arange(total, device=self.device) - first[seg]

    def _relayout(self, src_rows: torch.Tensor, new_len: torch.Tensor, new_cap: torch.Tensor) -> None:
        """Move `src_rows` (grouped by segment, new_len[s] rows each) into fresh segments of capacity new_cap."""
        new_start = torch.cumsum(new_cap, 0) - new_cap
        total_rows = int(new_cap.sum()) + 1  # + the sentinel, which `fill` leaves as zero K/V and position -1
        dst_rows = self._segment_rows(new_start, new_len)
        same_size = total_rows == self.keys.shape[0]

        def move(buffer: torch.Tensor, fill) -> torch.Tensor:
            moved = buffer.index_select(0, src_rows)
            if same_size:  # reuse the allocation: addresses stay stable for captured graphs
                target = buffer
                if isinstance(fill, (int, float)):
                    target.fill_(fill)
            else:
                target = torch.full((total_rows, *buffer.shape[1:]), fill, dtype=buffer.dtype, device=self.device)
            target.index_copy_(0, dst_rows, moved)
            return target

        self.keys = move(self.keys, 0)
        self.values = move(self.values, 0)
        self.positions = move(self.positions, -1)
        self.stats = {name: move(stat, 0.0) for name, stat in self.stats.items()}
        self.seg_start, self.seg_len, self.seg_cap = new_start, new_len.clone(), new_cap.clone()
        self._slot_rows = None
        self._refresh_summaries()

    def _capacity(self, needed: torch.Tensor, slack: int, limit: torch.Tensor | None) -> torch.Tensor:
        """Rows to reserve per segment: `needed` + `slack`, the slack cut where it would pass limit[s]."""
        if limit is None:
            return needed + slack
        return torch.minimum(needed + slack, torch.maximum(limit, needed))

    def reserve(self, extra: torch.Tensor, slack: int, extra_max: int | None = None,
                limit: torch.Tensor | None = None) -> None:
        """Make room for extra[s] more rows in every segment, growing by `slack` more to amortise copies, but
        never past limit[s] rows (slack only: the rows needed always fit).

        `extra_max` (an upper bound of `extra` known on the host) lets the common case skip a device sync.
        """
        if extra_max is not None and extra_max <= self.min_free:
            return
        if bool((self.seg_len + extra <= self.seg_cap).all()):
            return
        src_rows = self._segment_rows(self.seg_start, self.seg_len)
        self._relayout(src_rows, self.seg_len, self._capacity(self.seg_len + extra, slack, limit))

    def compact(self, keep: torch.Tensor, view: PaddedView, slack: int = 0, limit: torch.Tensor | None = None) -> None:
        """Keep only the slots of `view` where keep[b, h, j] is True; each segment shrinks to what it keeps + slack
        (the slack cut at limit[s] rows)."""
        keep = keep & view.valid
        new_len = keep.sum(-1).reshape(-1)
        src_rows = view.row_index[keep]  # row-major over (b, h, j): grouped by segment, position order kept
        aligned = self.heads_aligned and bool((keep == keep[:, :1]).all())
        self._relayout(src_rows, new_len, self._capacity(new_len, slack, limit))
        self.heads_aligned = aligned

    def truncate(self, lengths: torch.Tensor, capacity: torch.Tensor | None = None) -> None:
        """Forget every row past lengths[s] in each segment (rows appended after a snapshot); with `capacity`,
        give back the room those rows had grown the segments by."""
        gone = self._segment_rows(self.seg_start + lengths, self.seg_len - lengths)
        self.positions.index_fill_(0, gone, -1)
        self.seg_len = lengths.clone()
        self._refresh_summaries()
        if capacity is not None and not torch.equal(capacity, self.seg_cap):
            self._relayout(self._segment_rows(self.seg_start, self.seg_len), self.seg_len, capacity)

    @classmethod
    def concat(cls, stores: list[LayerStore]) -> LayerStore:
        """One store whose batch rows are the rows of `stores`, in order (side channels are not carried)."""
        first = stores[0]
        out = cls(sum(s.batch for s in stores), first.heads, first.head_dim, first.dtype, first.device)
        offsets, total = [], 0
        for s in stores:
            offsets.append(total)
            total += s.rows
        out.keys = torch.cat([s.keys[:-1] for s in stores] + [first.keys[-1:] * 0])
        out.values = torch.cat([s.values[:-1] for s in stores] + [first.values[-1:] * 0])
        out.positions = torch.cat([s.positions[:-1] for s in stores] + [first.positions[-1:].fill_(-1)])
        out.seg_start = torch.cat([s.seg_start + off for s, off in zip(stores, offsets)])
        out.seg_len = torch.cat([s.seg_len for s in stores])
        out.seg_cap = torch.cat([s.seg_cap for s in stores])
        out.heads_aligned = all(s.heads_aligned for s in stores)
        out._refresh_summaries()
        return out

    # ----------------------------------------------------------------- writes
    def append(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        token_valid: torch.Tensor,
        slack: int,
        stats: dict[str, torch.Tensor] | None = None,
        all_valid: bool | None = None,
        limit: torch.Tensor | None = None,
    ) -> None:
        """Append new tokens. keys/values [B, H, T, d]; positions [T]; token_valid [B, T] (False = padding, dropped).

        When a segment runs out of room it grows by `slack` rows more than needed, but not past limit[s].
        `stats` gives initial values [B, H, T] for side channels (others start at 0). `all_valid` (whether
        token_valid is all True, if the caller knows) saves a device sync.
        """
        B, H, T, d = keys.shape
        if all_valid is None:
            all_valid = bool(token_valid.all())
        if all_valid:
            extra = T
            if T > self.min_free:  # the host knows when every segment has room: no tensor work then
                self.reserve(torch.full_like(self.seg_len, T), slack, extra_max=T, limit=limit)
            dst = self.seg_start + self.seg_len  # one decode token: its row in every segment
            if T > 1:
                dst = dst.view(B, H, 1) + torch.arange(T, device=self.device)
        else:
            extra = token_valid.sum(1).repeat_interleave(H)
            self.reserve(extra, slack, limit=limit)
            rank = token_valid.long().cumsum(1) - 1  # [B, T]
            dst = (self.seg_start + self.seg_len).view(B, H, 1) + rank.view(B, 1, T)
            write = token_valid.view(B, 1, T).expand(B, H, T)
        if all_valid:
            dst_rows = dst.reshape(-1)
            self.keys.index_copy_(0, dst_rows, keys.reshape(-1, d).to(self.dtype))
            self.values.index_copy_(0, dst_rows, values.reshape(-1, d).to(self.dtype))
        else:
            dst_rows = dst[write]
            self.keys.index_copy_(0, dst_rows, keys[write].to(self.dtype))
            self.values.index_copy_(0, dst_rows, values[write].to(self.dtype))
        self.appended_rows = dst_rows
        new_pos = positions.to(torch.int32).view(1, 1, T).expand(B, H, T)
        self.positions.index_copy_(0, dst_rows, new_pos.reshape(-1) if all_valid else new_pos[write])
        for name, init in (stats or {}).items():
            channel = self.stat_channel(name)
            init = init.to(channel.dtype)
            channel.index_copy_(0, dst_rows, init.reshape(-1) if all_valid else init[write])
        self.seg_len = self.seg_len + extra
        if all_valid:
            self.max_len += T
            self.min_free -= T
            self.host_len = [n + T for n in self.host_len]
        else:
            self._refresh_summaries()

    def stat_channel(self, name: str) -> torch.Tensor:
        """The per-row side channel `name`, created (zeros) on first use."""
        if name not in self.stats:
            self.stats[name] = torch.zeros(self.keys.shape[0], dtype=torch.float32, device=self.device)
        return self.stats[name]

    # ----------------------------------------------------------------- reads
    def view(self) -> PaddedView:
        """Gather the layer into [B, H, L, d] (L = longest segment). A view, not a copy, when segments are equal."""
        B, H, d = self.batch, self.heads, self.head_dim
        S = B * H
        max_len = self.max_len
        if self.uniform_cap is not None and self.rows == S * self.uniform_cap:
            cap = self.uniform_cap
            keys = self.keys[:-1].view(S, cap, d)[:, :max_len]
            values = self.values[:-1].view(S, cap, d)[:, :max_len]
            positions = self.positions[:-1].view(S, cap)[:, :max_len]  # free slots hold -1

            def rows() -> torch.Tensor:
                slot = torch.arange(max_len, device=self.device)
                return ((torch.arange(S, device=self.device) * cap).view(-1, 1) + slot.view(1, -1)).view(B, H, max_len)
            row_index = rows
        else:
            if self._slot_rows is None:
                slot = torch.arange(int(self.seg_cap.max()) if S else 0, device=self.device)
                inside = slot.view(1, -1) < self.seg_cap.view(-1, 1)
                self._slot_rows = torch.where(inside, self.seg_start.view(-1, 1) + slot.view(1, -1), self.rows)
            row_index = self._slot_rows[:, :max_len].view(B, H, max_len)
            flat_positions = self.positions

            def positions() -> torch.Tensor:
                return flat_positions[row_index]
            keys = values = None
        flat_keys, flat_values = self.keys, self.values

        def gather():
            return (flat_keys[row_index].view(B, H, max_len, d), flat_values[row_index].view(B, H, max_len, d))

        view = PaddedView(
            keys=None if keys is None else keys.reshape(B, H, max_len, d),
            values=None if values is None else values.reshape(B, H, max_len, d),
            positions=positions.reshape(B, H, max_len) if torch.is_tensor(positions) else positions,
            valid=lambda: view.positions >= 0,
            row_index=row_index,
            no_empty_slots=self.equal_lengths,
            heads_aligned=self.heads_aligned,
            gather=gather if keys is None else None,
        )
        return view

    def gather_stat(self, name: str, view: PaddedView) -> torch.Tensor:
        """Side channel `name` laid out like `view`: [B, H, L] (0 on empty slots)."""
        channel = self.stat_channel(name)
        return torch.where(view.valid, channel[view.row_index], 0.0)

    def add_stat(self, name: str, view: PaddedView, amount: torch.Tensor) -> None:
        """channel[row] += amount[b, h, j] for every valid slot of `view`."""
        channel = self.stat_channel(name)
        if view.no_empty_slots:  # every slot holds a row: no boolean selection (a copy and a sync) needed
            channel.index_add_(0, view.row_index.reshape(-1), amount.reshape(-1).to(channel.dtype))
        else:
            channel.index_add_(0, view.row_index[view.valid], amount[view.valid].to(channel.dtype))

    def set_stat(self, name: str, view: PaddedView, value: torch.Tensor) -> None:
        """channel[row] = value[b, h, j] for every valid slot of `view`."""
        channel = self.stat_channel(name)
        if view.no_empty_slots:
            channel.index_copy_(0, view.row_index.reshape(-1), value.reshape(-1).to(channel.dtype))
        else:
            channel.index_copy_(0, view.row_index[view.valid], value[view.valid].to(channel.dtype))
