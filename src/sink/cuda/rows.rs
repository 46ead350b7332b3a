//! Folding a delivery's copies into 2-D copies: the pieces of a shard's block along a later
//! dimension than the first are rows of equal width, evenly spaced in the staged bytes and back
//! to back in the destination, so one `cuMemcpy2DAsync` moves them all instead of one copy per
//! row.

/// The largest pitch or width a 2-D copy is given (CUDA's `MAX_PITCH` is 2^31 - 1 on the GPUs
/// it reports it for); rows further apart go one copy each.
pub const MAX_PITCH: usize = i32::MAX as usize;

/// `height` rows of `width` bytes: row `i` from host address `src + i * spitch` to device
/// address `dst + i * width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowCopy {
    /// Device address of the first row.
    pub dst: u64,
    /// Host address of the first row.
    pub src: usize,
    /// Bytes of a row.
    pub width: usize,
    /// Bytes from one source row to the next (`width` while there is one row).
    pub spitch: usize,
    /// Rows.
    pub height: usize,
}

impl RowCopy {
    /// One copy of `width` bytes.
    pub fn new(dst: u64, src: usize, width: usize) -> Self {
        RowCopy { dst, src, width, spitch: width, height: 1 }
    }

    /// Take the copy `(dst, src, width)` as the next row, if it is one: the same width, written
    /// right after the last row, read one pitch after it (the first such copy sets the pitch).
    pub fn extend(&mut self, dst: u64, src: usize, width: usize) -> bool {
        let next_dst = (self.height as u64).checked_mul(self.width as u64).and_then(|b| self.dst.checked_add(b));
        if width != self.width || width == 0 || width > MAX_PITCH || next_dst != Some(dst) {
            return false;
        }
        if self.height == 1 {
            match src.checked_sub(self.src) {
                Some(step) if step >= width && step <= MAX_PITCH => self.spitch = step,
                _ => return false,
            }
        } else if self.height.checked_mul(self.spitch).and_then(|b| self.src.checked_add(b)) != Some(src) {
            return false;
        }
        self.height += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fold copies as the sink does: each either extends the pending copy or starts one.
    fn fold(copies: &[(u64, usize, usize)]) -> Vec<RowCopy> {
        let mut out: Vec<RowCopy> = Vec::new();
        for &(dst, src, w) in copies {
            if !out.last_mut().is_some_and(|c| c.extend(dst, src, w)) {
                out.push(RowCopy::new(dst, src, w));
            }
        }
        out
    }

    #[test]
    fn rows_of_a_block_fold_into_one_copy_that_moves_the_same_bytes() {
        // A [6, 8] u8 tensor, columns 2..5 of each row (a dim-1 shard): rows 3 wide, 8 apart.
        let copies: Vec<(u64, usize, usize)> = (0..6).map(|r| (1000 + r as u64 * 3, 500 + r * 8 + 2, 3)).collect();
        let folded = fold(&copies);
        assert_eq!(folded, [RowCopy { dst: 1000, src: 502, width: 3, spitch: 8, height: 6 }]);
        // The 2-D copy moves exactly the bytes the single copies move.
        let rows =
            |c: RowCopy| (0..c.height).map(move |i| (c.dst + (i * c.width) as u64, c.src + i * c.spitch, c.width));
        assert_eq!(folded.iter().copied().flat_map(rows).collect::<Vec<_>>(), copies);
    }

    #[test]
    fn copies_that_are_not_rows_of_one_block_stay_apart() {
        // Different widths; a gap in the destination; uneven source spacing; overlapping rows;
        // empty copies; pitches past the limit.
        assert_eq!(fold(&[(0, 0, 4), (4, 10, 5)]).len(), 2);
        assert_eq!(fold(&[(0, 0, 4), (8, 10, 4)]).len(), 2);
        assert_eq!(fold(&[(0, 0, 4), (4, 10, 4), (8, 21, 4)]).len(), 2);
        assert_eq!(fold(&[(0, 10, 4), (4, 12, 4)]).len(), 2);
        assert_eq!(fold(&[(0, 10, 4), (4, 8, 4)]).len(), 2);
        assert_eq!(fold(&[(0, 0, 0), (0, 0, 0)]).len(), 2);
        assert_eq!(fold(&[(0, 0, 4), (4, MAX_PITCH + 1, 4)]).len(), 2);
        // Back to back in both: a 2-D copy whose pitch is its width (one plain copy's bytes).
        assert_eq!(
            fold(&[(0, 0, 4), (4, 4, 4), (8, 8, 4)]),
            [RowCopy { dst: 0, src: 0, width: 4, spitch: 4, height: 3 }]
        );
    }
}
