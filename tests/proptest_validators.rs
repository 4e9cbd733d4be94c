//! Property tests of the host-side validators and the CPU reference kernels.
//!
//! Cases (105,300 in all):
//!
//! | property | cases |
//! |---|---|
//! | valid metadata is accepted (and a brute-force oracle agrees it is valid) | 25,000 |
//! | metadata with one known corruption is rejected with that corruption's error | 50,000 |
//! | `BatchMetadata::new` / `decode` with wrong lengths or overflowing sizes | 10,000 |
//! | decode-step metadata (`BatchMetadata::decode`): validator = brute-force oracle | 10,000 |
//! | `PagedKvLayout::new`, `KvScales`, `AttentionOptions::validate` on mixed input | 10,000 |
//! | reference fill / flatten / decode = an independent recomputation (tiny shapes; in `proptest_reference.rs`) | 300 |
//!
//! Every validator must return (never panic); a panic fails the property. Measured with
//! `cargo test --release --test proptest_validators --test proptest_reference` on a 2-core
//! machine like CI's: 2.1–3.5 s for both files (the corruption property about 2.0 s, the
//! reference one about 1.8 s, the rest under 0.3 s together), well inside CI's budget.
//!
//! The seed is random per run (proptest's default); a failure prints the minimal case, and
//! `PROPTEST_RNG_SEED=<u64>` replays a run.

mod proptest_support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use fp8kv::reference::{self, HostKvCache, HostRows};
use fp8kv::testing::Rng;
use fp8kv::CacheSpec;
use fp8kv::{AttentionOptions, FlattenLayout};
use fp8kv::{
    BatchMetadata, Dtype, Fp8KvError, KvLayoutKind, KvScales, KvSide, PagedKvLayout, QuantPolicy,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use proptest_support::*;

// ---- An independent, brute-force oracle -----------------------------------------------------

/// The first defect of `c`'s reads, in the validators' documented order (per sequence:
/// negative length, past capacity, a used block-table entry out of range), by brute force.
fn oracle_reads(c: &Case) -> Option<&'static str> {
    let ps = c.layout.page_size() as i64;
    let num_pages = c.layout.num_pages() as i64;
    for b in 0..c.batch() {
        let kv = c.kv[b] as i64;
        if kv < 0 {
            return Some("NegativeLength");
        }
        if kv > c.capacity() as i64 {
            return Some("SeqLenPastCache");
        }
        for pos in 0..kv {
            let entry = c.table[b * c.max_pages + (pos / ps) as usize] as i64;
            if entry < 0 || entry >= num_pages {
                return Some("BlockTableOutOfRange");
            }
        }
    }
    None
}

/// The first defect of `c` for a step writing its new tokens: [`oracle_reads`], then per
/// sequence the query fields, then overlapping spans (token by token), then two writes to one
/// slot (slot by slot).
fn oracle(c: &Case) -> Option<&'static str> {
    if let Some(e) = oracle_reads(c) {
        return Some(e);
    }
    for b in 0..c.batch() {
        let (start, q, kv) = (c.q_start[b] as i64, c.q_len[b] as i64, c.kv[b] as i64);
        if start < 0 || q < 0 {
            return Some("NegativeLength");
        }
        if q > kv {
            return Some("QueryLongerThanKv");
        }
        if q > 0 && start + q > c.num_tokens as i64 {
            return Some("QueryOutOfRange");
        }
    }
    let mut owner = vec![false; c.num_tokens];
    for b in 0..c.batch() {
        if c.q_len[b] == 0 {
            continue; // its start is never read
        }
        let span = c.q_start[b] as usize..(c.q_start[b] + c.q_len[b]) as usize;
        for taken in &mut owner[span] {
            if std::mem::replace(taken, true) {
                return Some("QueryOverlap");
            }
        }
    }
    let ps = c.layout.page_size();
    let mut written = HashSet::new();
    for b in 0..c.batch() {
        for pos in (c.kv[b] - c.q_len[b]) as usize..c.kv[b] as usize {
            let page = c.table[b * c.max_pages + pos / ps];
            if !written.insert((page, pos % ps)) {
                return Some("SlotConflict");
            }
        }
    }
    None
}

/// The variant name of an error (the part of its `Debug` text before any field).
fn variant(e: &Fp8KvError) -> String {
    format!("{e:?}")
        .split([' ', '(', '{'])
        .next()
        .unwrap_or_default()
        .to_string()
}

// ---- Valid metadata --------------------------------------------------------------------------

#[test]
fn valid_metadata_is_accepted() {
    run(25_000, &shape(0..=8), |s| {
        let c = build(s);
        check(oracle(&c).is_none(), || {
            format!("the generator made an invalid case: {:?}", oracle(&c))
        })?;
        let meta = c.meta();
        check(meta.validate_reads(&c.layout).is_ok(), || {
            format!("{:?}", meta.validate_reads(&c.layout))
        })?;
        check(meta.validate(&c.layout, c.num_tokens).is_ok(), || {
            format!("{:?}", meta.validate(&c.layout, c.num_tokens))
        })?;
        // More packed tokens than the spans use is fine too.
        check(meta.validate(&c.layout, c.num_tokens + 7).is_ok(), || {
            "extra packed tokens rejected".into()
        })
    });
}

// ---- Metadata with one known corruption ------------------------------------------------------

/// What a corruption must produce.
#[derive(Debug)]
enum Expect {
    /// Exactly this error, from `validate`, and from `validate_reads` when `reads` is set
    /// (otherwise `validate_reads` must pass: the defect is in the query fields).
    Exact { err: Fp8KvError, reads: bool },
    /// `QueryOverlap` naming sequence `moved` and one whose span it now overlaps.
    Overlap { moved: usize },
    /// `SlotConflict` on physical page `page` (the reads stay valid).
    Conflict { page: usize },
}

const KINDS: usize = 10;
static APPLIED: [AtomicUsize; KINDS] = [const { AtomicUsize::new(0) }; KINDS];

/// Applies corruption `kind` to `c` if it can (returns `None` when the case lacks what it
/// needs, e.g. a sequence with new tokens).
fn corrupt(c: &mut Case, kind: usize, rng: &mut Rng) -> Option<Expect> {
    let batch = c.batch();
    let b = rng.below(batch);
    let with_q: Vec<usize> = (0..batch).filter(|&i| c.q_len[i] > 0).collect();
    let cap = c.capacity();
    let neg = |rng: &mut Rng| match rng.below(3) {
        0 => -1,
        1 => i32::MIN,
        _ => -(rng.below(1 << 20) as i32) - 1,
    };
    let exact = |err, reads| Some(Expect::Exact { err, reads });
    match kind {
        0 => {
            let v = neg(rng);
            c.kv[b] = v;
            exact(
                Fp8KvError::NegativeLength {
                    seq: b,
                    what: "kv_seqlens",
                    value: v as i64,
                },
                true,
            )
        }
        1 => {
            let v = if rng.below(2) == 0 {
                i32::MAX
            } else {
                (cap + 1 + rng.below(100)) as i32
            };
            c.kv[b] = v;
            exact(
                Fp8KvError::SeqLenPastCache {
                    seq: b,
                    kv_len: v as i64,
                    capacity: cap,
                },
                true,
            )
        }
        2 => {
            let used: Vec<usize> = (0..batch).filter(|&i| c.used_pages(i) > 0).collect();
            let &b = used.get(rng.below(used.len().max(1)))?;
            let index = rng.below(c.used_pages(b));
            let num_pages = c.layout.num_pages();
            let v = match rng.below(4) {
                0 => num_pages as i32 + rng.below(3) as i32,
                1 => i32::MAX,
                _ => neg(rng),
            };
            c.table[b * c.max_pages + index] = v;
            exact(
                Fp8KvError::BlockTableOutOfRange {
                    seq: b,
                    index,
                    page: v as i64,
                    num_pages,
                },
                true,
            )
        }
        3 => {
            let v = neg(rng);
            c.q_len[b] = v;
            exact(
                Fp8KvError::NegativeLength {
                    seq: b,
                    what: "q_seq_length",
                    value: v as i64,
                },
                false,
            )
        }
        4 => {
            let v = neg(rng);
            c.q_start[b] = v;
            exact(
                Fp8KvError::NegativeLength {
                    seq: b,
                    what: "q_start_loc",
                    value: v as i64,
                },
                false,
            )
        }
        5 => {
            let v = if rng.below(2) == 0 {
                i32::MAX
            } else {
                c.kv[b] + 1 + rng.below(3) as i32
            };
            c.q_len[b] = v;
            exact(
                Fp8KvError::QueryLongerThanKv {
                    seq: b,
                    q_len: v as i64,
                    kv_len: c.kv[b] as i64,
                },
                false,
            )
        }
        6 => {
            // Fewer packed tokens than the spans need: the first sequence (in batch order)
            // whose span ends past the new count is reported.
            let max_end = with_q
                .iter()
                .map(|&i| (c.q_start[i] + c.q_len[i]) as usize)
                .max()?;
            let n = rng.below(max_end);
            c.num_tokens = n;
            let &seq = with_q
                .iter()
                .find(|&&i| (c.q_start[i] + c.q_len[i]) as usize > n)?;
            let (start, end) = (
                c.q_start[seq] as i64,
                (c.q_start[seq] + c.q_len[seq]) as i64,
            );
            exact(
                Fp8KvError::QueryOutOfRange {
                    seq,
                    start,
                    end,
                    num_tokens: n,
                },
                false,
            )
        }
        7 => {
            // q_start_loc + q_seq_length past i32::MAX: must be caught without overflowing.
            let &b = with_q.get(rng.below(with_q.len().max(1)))?;
            let start = i32::MAX - rng.below(c.q_len[b] as usize) as i32;
            c.q_start[b] = start;
            let end = start as i64 + c.q_len[b] as i64;
            assert!(end > i32::MAX as i64);
            exact(
                Fp8KvError::QueryOutOfRange {
                    seq: b,
                    start: start as i64,
                    end,
                    num_tokens: c.num_tokens,
                },
                false,
            )
        }
        8 => {
            if with_q.len() < 2 {
                return None;
            }
            let a = with_q[rng.below(with_q.len())];
            let others: Vec<usize> = with_q.iter().copied().filter(|&i| i != a).collect();
            let moved = others[rng.below(others.len())];
            c.q_start[moved] = c.q_start[a] + rng.below(c.q_len[a] as usize) as i32;
            c.num_tokens = c
                .num_tokens
                .max((c.q_start[moved] + c.q_len[moved]) as usize);
            Some(Expect::Overlap { moved })
        }
        9 => {
            // Point one sequence's page holding a new token at the page another sequence
            // writes the same slot of.
            let ps = c.layout.page_size();
            let mut pairs = Vec::new();
            for &x in &with_q {
                for &y in &with_q {
                    if x == y {
                        continue;
                    }
                    let px = (c.kv[x] - c.q_len[x]) as usize..c.kv[x] as usize;
                    let py = (c.kv[y] - c.q_len[y]) as usize..c.kv[y] as usize;
                    for p in px.clone() {
                        if let Some(r) = py.clone().find(|r| r % ps == p % ps) {
                            pairs.push((x, p, y, r));
                            break;
                        }
                    }
                }
            }
            let &(x, p, y, r) = pairs.get(rng.below(pairs.len().max(1)))?;
            let page = c.table[x * c.max_pages + p / ps];
            c.table[y * c.max_pages + r / ps] = page;
            Some(Expect::Conflict {
                page: page as usize,
            })
        }
        _ => unreachable!(),
    }
}

/// Zeros for the reference kernels' new-token rows (only the metadata is under test there).
fn zeros() -> &'static [f32] {
    static ZEROS: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    ZEROS.get_or_init(|| vec![0.0; 1 << 18])
}

#[test]
fn corrupted_metadata_is_rejected_with_its_own_error() {
    run(
        50_000,
        &(shape(1..=8), 0..KINDS, any::<u64>()),
        |(s, first, seed)| {
            let clean = build(s);
            let mut rng = Rng::new(seed);
            let (c, kind, expect) = (0..KINDS)
                .map(|k| (first + k) % KINDS)
                .find_map(|kind| {
                    let mut c = clean.clone();
                    corrupt(&mut c, kind, &mut rng).map(|e| (c, kind, e))
                })
                .expect("kinds 0, 1, 3 and 4 apply to every non-empty batch");
            APPLIED[kind].fetch_add(1, Ordering::Relaxed);
            let meta = c.meta();
            let got = meta.validate(&c.layout, c.num_tokens);
            let reads = meta.validate_reads(&c.layout);
            let err = match &got {
                Err(e) => e.clone(),
                Ok(()) => return Err(TestCaseError::fail(format!("kind {kind} accepted"))),
            };
            // The independent oracle must see the same kind of defect.
            check(oracle(&c) == Some(variant(&err).as_str()), || {
                format!("kind {kind}: oracle {:?}, validator {err:?}", oracle(&c))
            })?;
            match &expect {
                Expect::Exact {
                    err: want,
                    reads: r,
                } => {
                    check(&err == want, || format!("kind {kind}: {err:?} != {want:?}"))?;
                    let want_reads = if *r { Err(want.clone()) } else { Ok(()) };
                    check(reads == want_reads, || {
                        format!("kind {kind}: validate_reads {reads:?}, want {want_reads:?}")
                    })?;
                }
                Expect::Overlap { moved } => {
                    let Fp8KvError::QueryOverlap { a, b } = err else {
                        return Err(TestCaseError::fail(format!("overlap: {err:?}")));
                    };
                    let other = if a == *moved { b } else { a };
                    let span = |i: usize| c.q_start[i]..c.q_start[i] + c.q_len[i];
                    check(
                        (a == *moved || b == *moved)
                            && other != *moved
                            && span(other).start < span(*moved).end
                            && span(*moved).start < span(other).end,
                        || format!("overlap of {moved}: {err:?}"),
                    )?;
                    check(reads.is_ok(), || format!("overlap: reads {reads:?}"))?;
                }
                Expect::Conflict { page } => {
                    let Fp8KvError::SlotConflict { page: p, .. } = err else {
                        return Err(TestCaseError::fail(format!("conflict: {err:?}")));
                    };
                    check(p == *page, || format!("conflict on {page}: {err:?}"))?;
                    check(reads.is_ok(), || format!("conflict: reads {reads:?}"))?;
                }
            }
            // On small layouts the reference kernels report the same error (they validate
            // before touching anything).
            let l = c.layout;
            let row = l.num_kv_heads() * l.head_dim_k().max(l.head_dim_v());
            let cache_bytes = l.cache_bytes(QuantPolicy::Fp8E4m3);
            if cache_bytes <= 1 << 16 && c.num_tokens * row <= zeros().len() {
                let mut cache = CacheSpec::from_parts(
                    l,
                    QuantPolicy::Fp8E4m3,
                    Dtype::E4m3,
                    KvScales::default(),
                )
                .and_then(|spec| HostKvCache::new(spec, 0))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let rows = |d| HostRows {
                    data: zeros(),
                    row_stride: l.num_kv_heads() * d,
                };
                let fill = reference::fill(
                    &mut cache,
                    rows(l.head_dim_k()),
                    rows(l.head_dim_v()),
                    c.num_tokens,
                    &meta,
                );
                check(fill == got, || format!("kind {kind}: fill {fill:?}"))?;
                let flat =
                    reference::flatten(&cache, &meta, FlattenLayout::Hsd, Dtype::F32).map(|_| ());
                check(flat == reads, || format!("kind {kind}: flatten {flat:?}"))?;
            }
            Ok(())
        },
    );
    for (kind, n) in APPLIED.iter().enumerate() {
        let n = n.load(Ordering::Relaxed);
        assert!(n >= 500, "corruption {kind} applied only {n} times");
    }
}

// ---- Constructor inputs: lengths and sizes ---------------------------------------------------

#[test]
fn malformed_constructor_inputs_are_rejected() {
    run(
        10_000,
        &(shape(1..=8), 0usize..7, any::<u64>()),
        |(s, kind, seed)| {
            let c = build(s);
            let mut rng = Rng::new(seed);
            let batch = c.batch();
            let delta = rng.below(3) + 1;
            let resize = |v: &[i32], rng: &mut Rng| {
                let mut v = v.to_vec();
                if rng.below(2) == 0 || v.len() < delta {
                    v.extend(std::iter::repeat_n(0, delta));
                } else {
                    v.truncate(v.len() - delta);
                }
                v
            };
            let (mut qs, mut ql, mut table, mut mp) = (
                c.q_start.clone(),
                c.q_len.clone(),
                c.table.clone(),
                c.max_pages,
            );
            let want = match kind {
                0 => {
                    qs = resize(&qs, &mut rng);
                    "q_start_loc"
                }
                1 => {
                    ql = resize(&ql, &mut rng);
                    "q_seq_length"
                }
                2 => {
                    table = resize(&table, &mut rng);
                    "block_table"
                }
                3 => {
                    mp = 0;
                    "max_pages_per_seq"
                }
                4 => {
                    // batch × max_pages past usize (the table can then never match).
                    // Saturating: with batch 1 the sum would overflow (mp is reset to 0 below).
                    mp = (usize::MAX / batch).saturating_add(1 + rng.below(1000));
                    if batch == 1 {
                        mp = 0;
                        "max_pages_per_seq"
                    } else {
                        "block_table (batch x max_pages_per_seq)"
                    }
                }
                5 => {
                    // The decode constructor with a table of the wrong size.
                    let r = BatchMetadata::decode(c.kv.clone(), resize(&table, &mut rng), mp);
                    return check(
                        matches!(
                            r,
                            Err(Fp8KvError::ShapeMismatch {
                                what: "block_table",
                                ..
                            })
                        ),
                        || format!("decode: {r:?}"),
                    );
                }
                _ => {
                    // Consistent lengths: accepted.
                    let r = BatchMetadata::new(qs, ql, c.kv.clone(), table, mp);
                    return check(r.is_ok(), || format!("{r:?}"));
                }
            };
            let r = BatchMetadata::new(qs, ql, c.kv.clone(), table, mp);
            let what = match &r {
                Err(Fp8KvError::ShapeMismatch { what, .. }) => *what,
                Err(Fp8KvError::ZeroSize { what }) => *what,
                Err(Fp8KvError::TooLarge { what, .. }) => *what,
                _ => "",
            };
            check(what == want, || format!("kind {kind}: {r:?}, want {want}"))
        },
    );
}

#[test]
fn decode_step_metadata_matches_the_oracle() {
    // BatchMetadata::decode writes each non-empty sequence's last position; on a case whose
    // history pages are shared that may be a slot another sequence writes, which the
    // validator must then report exactly as the oracle does.
    run(10_000, &shape(0..=8), |s| {
        let c = build(s);
        let meta = BatchMetadata::decode(c.kv.clone(), c.table.clone(), c.max_pages)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let n = meta.total_new_tokens();
        let d = Case {
            q_start: meta.q_start_loc().to_vec(),
            q_len: meta.q_seq_length().to_vec(),
            num_tokens: n,
            ..c
        };
        let got = meta.validate(&d.layout, n).err().map(|e| variant(&e));
        check(got.as_deref() == oracle(&d), || {
            format!("validator {got:?}, oracle {:?}", oracle(&d))
        })
    });
}

// ---- Layout, scales, options ---------------------------------------------------------------

/// A size drawn from edge values and small random ones.
fn size(rng: &mut Rng, edges: &[usize]) -> usize {
    if rng.below(3) == 0 {
        rng.below(300)
    } else {
        pick(rng, edges)
    }
}

/// An f32 drawn from specials, ordinary values and random bit patterns.
fn float(rng: &mut Rng) -> f32 {
    match rng.below(4) {
        0 => pick(
            rng,
            &[
                0.0,
                -0.0,
                f32::NAN,
                -f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MIN_POSITIVE,
                f32::from_bits(1),
                f32::MAX,
                -1.0,
            ],
        ),
        1 => (rng.uniform() * 4.0) as f32,
        _ => f32::from_bits(rng.next_u64() as u32),
    }
}

fn good(x: f32) -> bool {
    x.is_finite() && x > 0.0
}

#[test]
fn layout_scales_and_options_validators_agree_with_their_rules() {
    run(10_000, &any::<u64>(), |seed| {
        let mut rng = Rng::new(seed);
        // PagedKvLayout::new, with the expected outcome from the documented rules.
        let num_pages = size(&mut rng, &[0, 1, 7, 1 << 40, 1 << 58, usize::MAX]);
        let page_size = size(
            &mut rng,
            &[
                0,
                1,
                8,
                15,
                16,
                17,
                24,
                32,
                64,
                1 << 20,
                1 << 31,
                1 << 62,
                1 << 63,
                usize::MAX,
            ],
        );
        let heads = size(&mut rng, &[0, 1, 2, 8, 1 << 20, 1 << 40, usize::MAX]);
        let (dk, dv) = if rng.below(2) == 0 {
            pick(&mut rng, &DIMS)
        } else {
            (
                size(&mut rng, &[0, 64, 128, 512, 576, usize::MAX]),
                size(&mut rng, &[0, 64, 128, 512, 576, usize::MAX]),
            )
        };
        let kind = pick(&mut rng, &[KvLayoutKind::Bshd, KvLayoutKind::Bhsd]);
        // In u128, saturating: three 64-bit factors can overflow even that.
        let page_elems = (page_size as u128)
            .saturating_mul(heads as u128)
            .saturating_mul(dk.max(dv) as u128);
        let bytes = (num_pages as u128)
            .saturating_mul(page_size as u128)
            .saturating_mul(heads as u128)
            .saturating_mul((dk as u128 + dv as u128) * 2);
        let want = if num_pages == 0 || heads == 0 {
            "ZeroSize"
        } else if page_size < 16 || !page_size.is_power_of_two() {
            "InvalidPageSize"
        } else if !DIMS.contains(&(dk, dv)) {
            "UnsupportedHeadDim"
        } else if page_elems > i32::MAX as u128 || bytes > usize::MAX as u128 {
            "TooLarge"
        } else {
            "Ok"
        };
        let got = match PagedKvLayout::new(num_pages, page_size, heads, dk, dv, kind) {
            Ok(l) => {
                // Every size method is exact for an accepted layout.
                let k = l.cache_elems(KvSide::K) as u128;
                check(
                    k == num_pages as u128 * page_size as u128 * heads as u128 * dk as u128,
                    || format!("cache_elems {k}"),
                )?;
                "Ok".to_string()
            }
            Err(e) => variant(&e),
        };
        check(got == want, || {
            format!("layout({num_pages}, {page_size}, {heads}, {dk}, {dv}): {got}, want {want}")
        })?;

        // KvScales::new: K is checked first.
        let (k, v) = (float(&mut rng), float(&mut rng));
        let r = KvScales::new(k, v);
        let ok = match &r {
            Ok(s) => good(k) && good(v) && s.k() == k && s.v() == v,
            Err(Fp8KvError::InvalidScale {
                side: KvSide::K,
                value,
            }) => !good(k) && value.to_bits() == k.to_bits(),
            Err(Fp8KvError::InvalidScale {
                side: KvSide::V,
                value,
            }) => good(k) && !good(v) && value.to_bits() == v.to_bits(),
            Err(_) => false,
        };
        check(ok, || format!("KvScales::new({k}, {v}): {r:?}"))?;
        // Calibration: amax must be finite and >= 0.
        let (ka, va) = (float(&mut rng), float(&mut rng));
        let amax_ok = |a: f32| a.is_finite() && a >= 0.0;
        let r = KvScales::calibrate(ka, va, QuantPolicy::Fp8E4m3);
        let ok = match &r {
            Ok(s) => amax_ok(ka) && amax_ok(va) && good(s.k()) && good(s.v()),
            Err(Fp8KvError::InvalidAmax {
                side: KvSide::K, ..
            }) => !amax_ok(ka),
            Err(Fp8KvError::InvalidAmax {
                side: KvSide::V, ..
            }) => amax_ok(ka) && !amax_ok(va),
            Err(_) => false,
        };
        check(ok, || format!("calibrate({ka}, {va}): {r:?}"))?;

        // AttentionOptions::validate.
        let num_heads = rng.below(9);
        let maybe = |rng: &mut Rng| (rng.below(2) == 0).then(|| float(rng));
        let list = |rng: &mut Rng| {
            (rng.below(2) == 0).then(|| {
                let n = if rng.below(4) == 0 {
                    rng.below(9)
                } else {
                    num_heads
                };
                (0..n)
                    .map(|_| if rng.below(8) == 0 { float(rng) } else { 0.25 })
                    .collect::<Vec<f32>>()
            })
        };
        let opts = AttentionOptions {
            sm_scale: maybe(&mut rng),
            window: (rng.below(2) == 0).then(|| pick(&mut rng, &[0, 1, 5, usize::MAX])),
            softcap: maybe(&mut rng),
            sinks: list(&mut rng),
            alibi_slopes: list(&mut rng),
        };
        let list_bad = |l: &Option<Vec<f32>>| match l {
            None => None,
            Some(v) if v.len() != num_heads => Some("ShapeMismatch"),
            Some(v) if v.iter().any(|x| !x.is_finite()) => Some("InvalidOption"),
            Some(_) => None,
        };
        let want = if opts.sm_scale.is_some_and(|s| !good(s))
            || opts.window == Some(0)
            || opts.softcap.is_some_and(|c| !good(c))
        {
            Some("InvalidOption")
        } else {
            list_bad(&opts.sinks).or(list_bad(&opts.alibi_slopes))
        };
        let got = opts.validate(num_heads).err().map(|e| variant(&e));
        check(got.as_deref() == want, || {
            format!("{opts:?}: {got:?}, want {want:?}")
        })
    });
}
