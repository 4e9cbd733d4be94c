//! What the two property-test files share: the generator of valid batch metadata (`Shape`,
//! `build`), the runner that checks every case ran, and small drawing helpers.
#![allow(dead_code)]

use fp8kv::testing::Rng;
use fp8kv::{BatchMetadata, KvLayoutKind, PagedKvLayout};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The shape of a generated case (the metadata's contents come from `seed`).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub page_size: usize,
    pub heads: usize,
    pub dims: (usize, usize),
    pub kind: KvLayoutKind,
    pub batch: usize,
    pub max_pages: usize,
    pub spare_pages: usize,
    /// Let history-only pages point at any page (prefix sharing), written ones or not.
    pub share_history: bool,
    pub seed: u64,
}

/// Every head-dim pair the kernels support, written out here independently of the crate's
/// table.
pub const DIMS: [(usize, usize); 7] = [
    (64, 64),
    (80, 80),
    (96, 96),
    (128, 128),
    (192, 192),
    (256, 256),
    (576, 512),
];

pub fn shape(batch: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Shape> {
    (
        0u32..3,
        1usize..=4,
        0usize..DIMS.len(),
        any::<bool>(),
        batch,
        1usize..=6,
        0usize..=3,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(log, heads, dim, bhsd, batch, max_pages, spare_pages, share_history, seed)| Shape {
                page_size: 16 << log,
                heads,
                dims: DIMS[dim],
                kind: if bhsd {
                    KvLayoutKind::Bhsd
                } else {
                    KvLayoutKind::Bshd
                },
                batch,
                max_pages,
                spare_pages,
                share_history,
                seed,
            },
        )
}

/// A layout, metadata arrays and a packed token count.
#[derive(Debug, Clone)]
pub struct Case {
    pub layout: PagedKvLayout,
    pub q_start: Vec<i32>,
    pub q_len: Vec<i32>,
    pub kv: Vec<i32>,
    pub table: Vec<i32>,
    pub max_pages: usize,
    pub num_tokens: usize,
}

impl Case {
    pub fn batch(&self) -> usize {
        self.kv.len()
    }
    pub fn meta(&self) -> BatchMetadata {
        BatchMetadata::new(
            self.q_start.clone(),
            self.q_len.clone(),
            self.kv.clone(),
            self.table.clone(),
            self.max_pages,
        )
        .expect("generated arrays have consistent lengths")
    }
    pub fn capacity(&self) -> usize {
        self.max_pages * self.layout.page_size()
    }
    pub fn used_pages(&self, b: usize) -> usize {
        (self.kv[b].max(0) as usize).div_ceil(self.layout.page_size())
    }
}

/// Builds a valid case: lengths within capacity, each used block-table entry a page in range
/// (pages holding new tokens distinct across the batch; history-only pages possibly shared),
/// query spans disjoint and inside the packed tokens, in a shuffled order.
pub fn build(s: Shape) -> Case {
    let mut rng = Rng::new(s.seed);
    let ps = s.page_size;
    let cap = s.max_pages * ps;
    let (mut kv, mut q_len) = (Vec::new(), Vec::new());
    for _ in 0..s.batch {
        let k = match rng.below(5) {
            0 => 0,
            1 => cap,
            // A page edge, or one token either side of it.
            2 => ((rng.below(s.max_pages) + 1) * ps + rng.below(3))
                .saturating_sub(1)
                .min(cap),
            _ => rng.below(cap + 1),
        };
        let q = match rng.below(4) {
            0 => 0,
            1 => k,
            2 => k.min(1),
            _ => rng.below(k + 1),
        };
        kv.push(k);
        q_len.push(q);
    }
    let used: Vec<usize> = kv.iter().map(|k| k.div_ceil(ps)).collect();
    let num_pages = (used.iter().sum::<usize>() + s.spare_pages).max(1);
    let mut pages: Vec<i32> = (0..num_pages as i32).collect();
    rng.shuffle(&mut pages);
    let mut table = vec![0i32; s.batch * s.max_pages];
    let mut next = 0;
    for b in 0..s.batch {
        let row = &mut table[b * s.max_pages..][..s.max_pages];
        let first_new = kv[b] - q_len[b];
        for (i, entry) in row.iter_mut().enumerate() {
            if i < used[b] {
                *entry = pages[next];
                next += 1;
                let history_only = (i + 1) * ps <= first_new;
                if s.share_history && history_only && rng.below(2) == 0 {
                    *entry = rng.below(num_pages) as i32;
                }
            } else {
                // Never read: anything goes.
                *entry = match rng.below(5) {
                    0 => -1,
                    1 => num_pages as i32,
                    2 => i32::MIN,
                    3 => i32::MAX,
                    _ => rng.next_u64() as i32,
                };
            }
        }
    }
    let mut order: Vec<usize> = (0..s.batch).filter(|&b| q_len[b] > 0).collect();
    rng.shuffle(&mut order);
    let mut q_start = vec![0usize; s.batch];
    let mut cursor = rng.below(3);
    for &b in &order {
        q_start[b] = cursor;
        cursor += q_len[b] + rng.below(2);
    }
    let num_tokens = cursor + rng.below(3);
    for b in 0..s.batch {
        if q_len[b] == 0 {
            q_start[b] = rng.below(num_tokens + 5);
        }
    }
    let layout = PagedKvLayout::new(num_pages, ps, s.heads, s.dims.0, s.dims.1, s.kind)
        .expect("generated layouts are valid");
    let to_i32 = |v: Vec<usize>| v.into_iter().map(|x| x as i32).collect();
    Case {
        layout,
        q_start: to_i32(q_start),
        q_len: to_i32(q_len),
        kv: to_i32(kv),
        table,
        max_pages: s.max_pages,
        num_tokens,
    }
}

pub fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Runs `test` on `cases` values of `strategy` and checks that it really ran that many (a
/// property that silently ran fewer cases would overstate what it covers).
pub fn run<S: Strategy>(
    cases: u32,
    strategy: &S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let ran = AtomicUsize::new(0);
    TestRunner::new(config(cases))
        .run(strategy, |v| {
            ran.fetch_add(1, Ordering::Relaxed);
            test(v)
        })
        .unwrap();
    let ran = ran.load(Ordering::Relaxed);
    assert!(ran >= cases as usize, "ran {ran} of {cases} cases");
}

pub fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(msg()))
    }
}

pub fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> T {
    xs[rng.below(xs.len())]
}
