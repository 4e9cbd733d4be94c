//! Split-K planning (how many cache slices per sequence), the workspace the split kernel
//! writes, and the split-state merge (DESIGN.md §3.5) that the combine kernel implements and
//! the CPU tests check.

use crate::error::{Fp8KvError, Result};

/// Whether Auto picks a tensor-core routine where one applies. They passed the GPU suite on an
/// H100 with every option (window, softcap, sinks, ALiBi, softmax scale) and every decode case
/// they apply to, as the CUDA-core routine did; off, Auto keeps the CUDA-core routine
/// everywhere.
pub(crate) const MMA_BY_DEFAULT: bool = true;

/// Cache tokens one cube processes per tile (per trip of its main loop).
pub const TILE_TOKENS: usize = 64;
/// Most splits a plan uses: the combine kernel keeps one weight per split in shared memory.
pub const MAX_SPLITS: usize = 256;
/// A split never covers fewer tokens than this: below it the split's fixed cost (query load,
/// final reduction, workspace write, combine read) outweighs the parallelism gained.
pub const MIN_SPLIT_TOKENS: usize = 256;
/// A cube's fixed cost in the plan's cost model, in cache tokens: loading the query, merging
/// its warps, writing its state and the combine reading it back.
pub const SPLIT_OVERHEAD_TOKENS: usize = 128;

/// How the cache of every sequence is cut for one launch.
///
/// Invariants: `num_splits ≥ 1`; `split_tokens` is a positive multiple of [`TILE_TOKENS`];
/// `num_splits · split_tokens ≥ max_kv_len` (every cached token belongs to exactly one split;
/// shorter sequences simply have empty trailing splits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitPlan {
    /// Slices per sequence (grid z of the split kernel).
    pub num_splits: usize,
    /// Cache tokens per slice.
    pub split_tokens: usize,
}

impl SplitPlan {
    /// Plans the split count from the work that exists without splitting (`base_cubes` =
    /// KV heads × sequences × query-row blocks), the longest context, the SM count and how many
    /// cubes of the split kernel fit on one SM at once (`resident_per_sm`).
    ///
    /// Cubes of one launch take about equally long, so they run in waves of `sm_count ·
    /// resident_per_sm`: the plan picks the split count that minimises waves × (tokens per
    /// split + [`SPLIT_OVERHEAD_TOKENS`]), never slices shorter than [`MIN_SPLIT_TOKENS`], and
    /// the fewest splits among equals. Batch 1 × 32k with 8 KV heads on 132 SMs × 3 gets 47
    /// splits of 704 tokens (376 cubes, one wave; 64 of 512 would take two); batch 128 × 32k
    /// gets a few long splits.
    ///
    /// Total for any input: `max_kv_len` is clamped to `[1, i32::MAX]` (lengths are `i32`) and
    /// the products saturate, so no argument can overflow or divide by zero.
    pub fn new(
        base_cubes: usize,
        max_kv_len: usize,
        sm_count: usize,
        resident_per_sm: usize,
    ) -> Self {
        let max_kv_len = max_kv_len.clamp(1, i32::MAX as usize);
        let base = base_cubes.max(1);
        let slots = sm_count.max(1).saturating_mul(resident_per_sm.max(1));
        let most = max_kv_len.div_ceil(MIN_SPLIT_TOKENS).clamp(1, MAX_SPLITS);
        let mut best: Option<(usize, SplitPlan)> = None;
        for wanted in 1..=most {
            let split_tokens = max_kv_len.div_ceil(wanted).next_multiple_of(TILE_TOKENS);
            let plan = SplitPlan {
                num_splits: max_kv_len.div_ceil(split_tokens),
                split_tokens,
            };
            let waves = base.saturating_mul(plan.num_splits).div_ceil(slots);
            let cost = waves.saturating_mul(split_tokens + SPLIT_OVERHEAD_TOKENS);
            if best.is_none_or(|(c, _)| cost < c) {
                best = Some((cost, plan));
            }
        }
        best.map(|(_, p)| p)
            .expect("at least one split count is tried")
    }

    /// A plan with exactly the given slice length (rounded up to whole tiles), for tests that
    /// want many splits on short sequences. A slice longer than the longest sequence is one
    /// split of that sequence's length rounded up to whole tiles (the launch passes the slice
    /// length as `u32`, and rounding `usize::MAX` up would overflow).
    ///
    /// Errors: [`Fp8KvError::ZeroSize`] for 0, [`Fp8KvError::InvalidOption`] for more than
    /// `MAX_SPLITS` slices, [`Fp8KvError::TooLarge`] for a `max_kv_len` past `i32::MAX`.
    pub fn with_split_tokens(split_tokens: usize, max_kv_len: usize) -> Result<Self> {
        if split_tokens == 0 {
            return Err(Fp8KvError::ZeroSize {
                what: "split_tokens",
            });
        }
        crate::error::check_limit(
            "max_kv_len",
            max_kv_len,
            i32::MAX as usize,
            "kv_seqlens are i32",
        )?;
        let max_kv_len = max_kv_len.max(1);
        let split_tokens = split_tokens.min(max_kv_len).next_multiple_of(TILE_TOKENS);
        let num_splits = max_kv_len.div_ceil(split_tokens);
        if num_splits > MAX_SPLITS {
            return Err(Fp8KvError::InvalidOption(format!(
                "{num_splits} splits of {split_tokens} tokens exceed the maximum of {MAX_SPLITS}"
            )));
        }
        Ok(SplitPlan {
            num_splits,
            split_tokens,
        })
    }
}

/// Sizes of the f32 workspace between the two kernels.
///
/// `o`: `[num_tokens, num_heads, num_splits, head_dim_v]`; `md`: `[num_tokens, num_heads,
/// num_splits, 2]` (`m`, `d` of [`SplitState`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceShape {
    /// Packed query tokens.
    pub num_tokens: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Splits of the plan.
    pub num_splits: usize,
    /// V head dim.
    pub head_dim_v: usize,
}

impl WorkspaceShape {
    /// f32 elements of the `o` part.
    pub fn o_elems(&self) -> usize {
        self.num_tokens * self.num_heads * self.num_splits * self.head_dim_v
    }
    /// f32 elements of the `(m, d)` part.
    pub fn md_elems(&self) -> usize {
        self.num_tokens * self.num_heads * self.num_splits * 2
    }
    /// Bytes of both parts.
    pub fn bytes(&self) -> usize {
        (self.o_elems() + self.md_elems()) * 4
    }
}

#[cfg(any(test, feature = "internals"))]
/// Online-softmax state of one query row over one slice of keys.
///
/// Invariants: `m` is the largest score of the slice (−inf for a slice with no visible key);
/// `d = Σ_j exp(s_j − m)` (0 exactly when the slice is empty, ≥ 1 otherwise); `o` is the
/// probability-weighted sum of (`v_scale`-scaled) values normalised by `d`,
/// `o = Σ_j exp(s_j − m)·v_scale·V_j / d` (all zeros when empty).
#[derive(Debug, Clone, PartialEq)]
pub struct SplitState {
    /// Largest score seen.
    pub m: f32,
    /// Sum of `exp(s − m)`.
    pub d: f32,
    /// Normalised weighted sum of values.
    pub o: Vec<f32>,
}

#[cfg(any(test, feature = "internals"))]
impl SplitState {
    /// The state of a slice with no visible key.
    pub fn empty(head_dim_v: usize) -> Self {
        SplitState {
            m: f32::NEG_INFINITY,
            d: 0.0,
            o: vec![0.0; head_dim_v],
        }
    }

    /// Whether the slice saw no key.
    pub fn is_empty(&self) -> bool {
        self.d == 0.0
    }

    /// The state of the union of two disjoint slices (associative and commutative up to
    /// rounding). An empty side returns the other unchanged: no `−inf − (−inf)` is formed.
    pub fn merge(&self, other: &SplitState) -> SplitState {
        if other.is_empty() {
            return self.clone();
        }
        if self.is_empty() {
            return other.clone();
        }
        let m = self.m.max(other.m);
        let (wa, wb) = (self.d * (self.m - m).exp(), other.d * (other.m - m).exp());
        let d = wa + wb;
        let o = self
            .o
            .iter()
            .zip(&other.o)
            .map(|(a, b)| (wa * a + wb * b) / d)
            .collect();
        SplitState { m, d, o }
    }

    /// The attention output of the merged state with an optional sink logit, which joins the
    /// softmax denominator only: `o·d·exp(m − M) / (d·exp(m − M) + exp(sink − M))` with
    /// `M = max(m, sink)`. A state that saw no key gives zeros, sink or not (as the reference).
    pub fn finish(&self, sink: Option<f32>) -> Vec<f32> {
        if self.is_empty() {
            return vec![0.0; self.o.len()];
        }
        let Some(sink) = sink else {
            return self.o.clone();
        };
        let m = self.m.max(sink);
        let w = self.d * (self.m - m).exp();
        let den = w + (sink - m).exp();
        self.o.iter().map(|o| o * w / den).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch1_long_context_fills_one_wave_and_big_batch_barely_splits() {
        // 8 KV heads × batch 1 on 132 SMs × 3 resident cubes: one wave of long splits.
        let p = SplitPlan::new(8, 32768, 132, 3);
        assert_eq!(
            p,
            SplitPlan {
                num_splits: 47,
                split_tokens: 704
            }
        );
        assert!(8 * p.num_splits <= 132 * 3);
        // Batch 128: 1024 cubes already make 2.6 waves; splitting only evens the last one out.
        let big = SplitPlan::new(8 * 128, 32768, 132, 3);
        assert!(big.num_splits <= 8, "{big:?}");
        let mid = SplitPlan::new(8 * 32, 4096, 132, 3);
        assert!(mid.num_splits >= 2 && mid.split_tokens.is_multiple_of(TILE_TOKENS));
        assert!(mid.num_splits * mid.split_tokens >= 4096);
    }

    #[test]
    fn plan_never_costs_more_than_not_splitting() {
        let cost = |p: SplitPlan, base: usize, slots: usize| {
            (base * p.num_splits).div_ceil(slots) * (p.split_tokens + SPLIT_OVERHEAD_TOKENS)
        };
        for (base, kv) in [
            (8, 32768),
            (256, 4096),
            (256, 32768),
            (1024, 32768),
            (3, 700),
        ] {
            let p = SplitPlan::new(base, kv, 132, 3);
            let one = SplitPlan {
                num_splits: 1,
                split_tokens: kv.next_multiple_of(TILE_TOKENS),
            };
            assert!(cost(p, base, 396) <= cost(one, base, 396), "{p:?}");
        }
    }

    #[test]
    fn plan_covers_every_token_and_handles_empty_batches() {
        for kv in [0, 1, 63, 64, 65, 1000, 100_000] {
            for base in [1, 7, 64, 5000] {
                let p = SplitPlan::new(base, kv, 132, 3);
                assert!(p.num_splits >= 1 && p.num_splits <= MAX_SPLITS);
                assert!(p.num_splits * p.split_tokens >= kv, "{p:?} kv {kv}");
                assert_eq!(p.split_tokens % TILE_TOKENS, 0);
            }
        }
    }

    #[test]
    fn empty_split_merges_without_nan() {
        let a = SplitState {
            m: 2.0,
            d: 3.0,
            o: vec![1.0, -2.0],
        };
        let e = SplitState::empty(2);
        assert_eq!(a.merge(&e), a);
        assert_eq!(e.merge(&a), a);
        let ee = e.merge(&e);
        assert!(ee.is_empty() && ee.o.iter().all(|x| *x == 0.0));
        assert_eq!(ee.finish(Some(5.0)), vec![0.0, 0.0]);
    }

    #[test]
    fn merge_equals_softmax_over_the_union() {
        let scores = [0.5f32, -1.0, 3.0, 2.5];
        let vals = [1.0f32, 2.0, -1.0, 4.0];
        let state = |idx: &[usize]| {
            let m = idx
                .iter()
                .map(|&i| scores[i])
                .fold(f32::NEG_INFINITY, f32::max);
            let d: f32 = idx.iter().map(|&i| (scores[i] - m).exp()).sum();
            let o = idx
                .iter()
                .map(|&i| (scores[i] - m).exp() * vals[i])
                .sum::<f32>()
                / d;
            SplitState { m, d, o: vec![o] }
        };
        let whole = state(&[0, 1, 2, 3]);
        let merged = state(&[0, 1]).merge(&state(&[2, 3]));
        assert!((whole.o[0] - merged.o[0]).abs() < 1e-6);
        let sink = 1.0f32;
        let want = {
            let m = 3.0f32;
            let den: f32 = scores.iter().map(|s| (s - m).exp()).sum::<f32>() + (sink - m).exp();
            scores
                .iter()
                .zip(vals)
                .map(|(s, v)| (s - m).exp() * v)
                .sum::<f32>()
                / den
        };
        assert!((merged.finish(Some(sink))[0] - want).abs() < 1e-6);
    }
}
