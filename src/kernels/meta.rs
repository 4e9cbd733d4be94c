//! The sections of the one `i32` buffer a [`crate::device::DeviceBatch`] uploads per step, as
//! the kernels read them. This is the single owner of that buffer's layout:
//! [`crate::device::BatchOffsets`] is built from the same constants.

use cubecl::prelude::*;

/// Start of `q_start_loc` (`batch` entries), in multiples of the batch size.
pub const Q_START_LOC: u32 = 0;
/// Start of `q_seq_length` (`batch` entries), in multiples of the batch size.
pub const Q_SEQ_LENGTH: u32 = 1;
/// Start of `kv_seqlens` (`batch` entries), in multiples of the batch size.
pub const KV_SEQLENS: u32 = 2;
/// Start of `kv_start_loc` (`batch + 1` entries, the total last), in multiples of the batch size.
pub const KV_START_LOC: u32 = 3;
/// The block table (`batch × max_pages` entries, row-major) starts at `BLOCK_TABLE · batch + 1`,
/// right after `kv_start_loc`'s extra entry.
pub const BLOCK_TABLE: u32 = 4;

/// Element `i` of the section starting at `section · batch`.
#[cube]
fn entry(meta: &Array<i32>, batch: u32, #[comptime] section: u32, i: u32) -> u32 {
    let at = if comptime![section == 0] {
        i
    } else if comptime![section == 1] {
        batch + i
    } else {
        section * batch + i
    };
    u32::cast_from(meta[at as usize])
}

/// `q_start_loc[b]`: where sequence `b`'s new tokens start among the packed tokens.
#[cube]
pub fn q_start(meta: &Array<i32>, batch: u32, b: u32) -> u32 {
    entry(meta, batch, Q_START_LOC, b)
}

/// `q_seq_length[b]`: sequence `b`'s new tokens.
#[cube]
pub fn q_len(meta: &Array<i32>, batch: u32, b: u32) -> u32 {
    entry(meta, batch, Q_SEQ_LENGTH, b)
}

/// `kv_seqlens[b]`: sequence `b`'s cached tokens, the new ones included.
#[cube]
pub fn kv_len(meta: &Array<i32>, batch: u32, b: u32) -> u32 {
    entry(meta, batch, KV_SEQLENS, b)
}

/// `kv_start_loc[b]`: where sequence `b` starts in a flattened output.
#[cube]
pub fn kv_start(meta: &Array<i32>, batch: u32, b: u32) -> u32 {
    entry(meta, batch, KV_START_LOC, b)
}

/// `kv_start_loc[batch]`: the tokens of every sequence together.
#[cube]
pub fn kv_total(meta: &Array<i32>, batch: u32) -> u32 {
    u32::cast_from(meta[(comptime![KV_START_LOC + 1] * batch) as usize])
}

/// Index of sequence `b`'s first block-table entry (its page `j` is at `+ j`).
#[cube]
pub fn block_table_row(batch: u32, max_pages: u32, b: u32) -> u32 {
    BLOCK_TABLE * batch + 1 + b * max_pages
}
