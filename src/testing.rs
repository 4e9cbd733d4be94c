//! Test and benchmark support: a small deterministic PRNG, the shared named case tables
//! (DESIGN.md §3.8) and a generator that turns a case into host inputs. Used by the CPU tests,
//! the GPU tests, the benches and the demo alike, so each case means the same thing everywhere.

use crate::error::Result;
use std::io::Write;

use cubecl::client::ComputeClient;

use crate::contract::CacheSpec;
use crate::device::{cuda_client, Cuda};
use crate::layout::{BatchMetadata, KvLayoutKind, PagedKvLayout};
use crate::policy::{Dtype, QuantPolicy};
use crate::reference::{self, HostKvCache, HostRows};
use crate::scales::KvScales;

/// splitmix64: tiny, deterministic, good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// A generator seeded from a name (FNV-1a), so each named case draws its own data.
    pub fn from_name(name: &str) -> Self {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Rng(h)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in `[0, n)`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// One sequence of a case: new tokens this step and cache length after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpec {
    /// New tokens (`q_seq_length`).
    pub q_len: usize,
    /// Cached tokens after the step, new ones included (`kv_seqlens`).
    pub kv_len: usize,
}

/// A named shape shared by the fill, flatten and decode test tables.
#[derive(Debug, Clone, PartialEq)]
pub struct PagedCase {
    /// Name; also the seed of its data.
    pub name: &'static str,
    /// The sequences.
    pub seqs: Vec<SeqSpec>,
    /// Tokens per page.
    pub page_size: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Query heads.
    pub num_heads: usize,
    /// K head dim.
    pub head_dim_k: usize,
    /// V head dim.
    pub head_dim_v: usize,
    /// Cache layout.
    pub kind: KvLayoutKind,
    /// Give sequences their pages in shuffled order (otherwise consecutive).
    pub shuffle_pages: bool,
    /// Extra elements after each new-token row (inputs sliced out of a fused QKV projection).
    pub row_pad: usize,
    /// `(k_scale, v_scale)` used with FP8 policies.
    pub scales: (f32, f32),
}

fn seqs(q_kv: &[(usize, usize)]) -> Vec<SeqSpec> {
    q_kv.iter()
        .map(|&(q_len, kv_len)| SeqSpec { q_len, kv_len })
        .collect()
}

impl PagedCase {
    fn base(name: &'static str, q_kv: &[(usize, usize)]) -> Self {
        PagedCase {
            name,
            seqs: seqs(q_kv),
            page_size: 16,
            num_kv_heads: 8,
            num_heads: 32,
            head_dim_k: 128,
            head_dim_v: 128,
            kind: KvLayoutKind::Bshd,
            shuffle_pages: true,
            row_pad: 0,
            scales: (0.15, 0.05),
        }
    }
    fn heads(mut self, num_heads: usize, num_kv_heads: usize) -> Self {
        (self.num_heads, self.num_kv_heads) = (num_heads, num_kv_heads);
        self
    }
    fn dims(mut self, k: usize, v: usize) -> Self {
        (self.head_dim_k, self.head_dim_v) = (k, v);
        self
    }
    fn page(mut self, page_size: usize) -> Self {
        self.page_size = page_size;
        self
    }
    fn bhsd(mut self) -> Self {
        self.kind = KvLayoutKind::Bhsd;
        self
    }
    fn pad(mut self, row_pad: usize) -> Self {
        self.row_pad = row_pad;
        self
    }
    fn in_order(mut self) -> Self {
        self.shuffle_pages = false;
        self
    }
    fn scales(mut self, k: f32, v: f32) -> Self {
        self.scales = (k, v);
        self
    }

    /// The layout this case needs: exactly the pages its sequences use plus three spare ones
    /// (so a stray write has somewhere to land and be caught).
    pub fn layout(&self) -> Result<PagedKvLayout> {
        let used: usize = self
            .seqs
            .iter()
            .map(|s| s.kv_len.div_ceil(self.page_size))
            .sum();
        PagedKvLayout::new(
            used + 3,
            self.page_size,
            self.num_kv_heads,
            self.head_dim_k,
            self.head_dim_v,
            self.kind,
        )
    }

    /// Scales for `policy` (1.0 for the unquantized cache, whose scales are ignored).
    pub fn kv_scales(&self, policy: QuantPolicy) -> Result<KvScales> {
        match policy {
            QuantPolicy::None => Ok(KvScales::default()),
            _ => KvScales::new(self.scales.0, self.scales.1),
        }
    }
}

/// The fill/flatten table: prefill, chunked prefill with history, decode, page edges, odd
/// head counts and dims, strided inputs, an empty sequence, both cache layouts.
pub fn fill_cases() -> Vec<PagedCase> {
    vec![
        PagedCase::base(
            "decode_b17_uneven",
            &[
                (1, 1),
                (1, 15),
                (1, 16),
                (1, 17),
                (1, 97),
                (1, 31),
                (1, 33),
                (1, 64),
                (1, 2),
                (1, 150),
                (1, 48),
                (1, 49),
                (1, 5),
                (1, 80),
                (1, 16),
                (1, 129),
                (1, 7),
            ],
        ),
        PagedCase::base(
            "prefill_page_edges",
            &[(15, 15), (16, 16), (17, 17), (97, 97), (1, 1)],
        )
        .page(16),
        PagedCase::base(
            "chunked_prefill_history",
            &[(37, 100), (64, 64), (1, 130), (63, 200)],
        )
        .page(32)
        .pad(3 * 128),
        PagedCase::base("gqa1_d64_bhsd", &[(20, 70), (5, 5), (1, 64)])
            .heads(4, 4)
            .dims(64, 64)
            .bhsd(),
        PagedCase::base("gqa7_d80_page64", &[(9, 130), (1, 63), (66, 66)])
            .heads(28, 4)
            .dims(80, 80)
            .page(64),
        PagedCase::base("d96_page128_in_order", &[(129, 300), (1, 128)])
            .heads(16, 2)
            .dims(96, 96)
            .page(128)
            .in_order(),
        PagedCase::base("d192_bhsd_strided", &[(3, 40), (33, 33)])
            .heads(8, 2)
            .dims(192, 192)
            .page(32)
            .bhsd()
            .pad(64),
        PagedCase::base("d256_page16", &[(2, 45), (17, 17)])
            .heads(8, 1)
            .dims(256, 256),
        PagedCase::base("mla_576_512", &[(1, 70), (4, 4), (1, 16)])
            .heads(16, 1)
            .dims(576, 512)
            .page(64),
        PagedCase::base("empty_sequence", &[(0, 0), (3, 20), (0, 0), (1, 1)]),
        PagedCase::base("saturating_scales", &[(24, 24), (1, 9)]).scales(0.0002, 0.0001),
    ]
}

/// The decode table: the fill table's shapes plus decode-specific ones (GQA 8 with batch 17,
/// a group of 24 with page 16, multi-token queries for speculative decoding, long contexts).
pub fn decode_cases() -> Vec<PagedCase> {
    let mut cases = fill_cases();
    cases.extend([
        PagedCase::base("gqa24_page16", &[(1, 200), (1, 33)]).heads(24, 1),
        PagedCase::base("spec_decode_4_tokens", &[(4, 90), (4, 4), (3, 300)]).page(32),
        PagedCase::base("long_context_2k", &[(1, 2048), (1, 1500)]).page(64),
        PagedCase::base("gqa4_d128_page32_bhsd", &[(1, 500), (2, 77), (1, 1)])
            .heads(16, 4)
            .page(32)
            .bhsd(),
        // Gemma-2-like decode (head dim 256, GQA 2, a 4-token speculative step): 8 rows per
        // sequence, which the tensor-core kernel takes at head dim 256.
        PagedCase::base("d256_gqa2_decode", &[(1, 300), (4, 70), (1, 17), (1, 1)])
            .heads(8, 4)
            .dims(256, 256)
            .page(32),
        // MLA (DeepSeek-like: 16 heads on one latent KV head) over many 16-token blocks, a
        // speculative pair and a sequence shorter than one block.
        PagedCase::base("mla_long_context", &[(1, 1100), (2, 333), (1, 9)])
            .heads(16, 1)
            .dims(576, 512)
            .page(32),
    ]);
    cases
}

/// Finds a case by name in a table.
pub fn case<'a>(table: &'a [PagedCase], name: &str) -> &'a PagedCase {
    table
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case named {name}"))
}

/// Host inputs drawn for a case.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The cache layout.
    pub layout: PagedKvLayout,
    /// Metadata of the step under test (the new tokens).
    pub meta: BatchMetadata,
    /// Metadata that writes every cached position (history and new tokens) from `hist_k/v`.
    pub prefill_meta: BatchMetadata,
    /// Packed new tokens of this step.
    pub num_tokens: usize,
    /// New K rows, `num_tokens × k_row_stride` (padding filled with NaN: it must never be read).
    pub k_new: Vec<f32>,
    /// New V rows, `num_tokens × v_row_stride`.
    pub v_new: Vec<f32>,
    /// Elements between K rows.
    pub k_row_stride: usize,
    /// Elements between V rows.
    pub v_row_stride: usize,
    /// Every cached token's K (history then new), packed in sequence order, unpadded.
    pub hist_k: Vec<f32>,
    /// Every cached token's V.
    pub hist_v: Vec<f32>,
    /// Queries `[num_tokens, num_heads, head_dim_k]`.
    pub q: Vec<f32>,
}

/// LLM-like activations: unit normals with a few outlier channels ×`outlier_gain`,
/// rounded to `dtype`.
pub fn llm_like(
    rng: &mut Rng,
    rows: usize,
    heads: usize,
    dim: usize,
    outlier_gain: f64,
    dtype: Dtype,
) -> Vec<f32> {
    let outliers = [3usize, dim / 2 + 1, dim - 5];
    let mut out = Vec::with_capacity(rows * heads * dim);
    for _ in 0..rows {
        for _ in 0..heads {
            for d in 0..dim {
                let g = if outliers.contains(&d) {
                    outlier_gain
                } else {
                    1.0
                };
                out.push(dtype.round_trip((rng.normal() * g) as f32));
            }
        }
    }
    out
}

impl Problem {
    /// Draws the case's inputs (seeded from its name and `act`), activations rounded to `act`.
    pub fn generate(case: &PagedCase, act: Dtype) -> Result<Problem> {
        let mut rng = Rng::from_name(&format!("{}/{act}", case.name));
        let layout = case.layout()?;
        let batch = case.seqs.len();
        let max_pages = case
            .seqs
            .iter()
            .map(|s| s.kv_len.div_ceil(case.page_size))
            .max()
            .unwrap_or(0)
            .max(1)
            + 1;
        let mut pages: Vec<i32> = (0..layout.num_pages() as i32).collect();
        if case.shuffle_pages {
            rng.shuffle(&mut pages);
        }
        // Unused block-table entries hold -1: a kernel that reads past a sequence's pages faults.
        let mut block_table = vec![-1i32; batch * max_pages];
        let mut next = 0;
        for (b, s) in case.seqs.iter().enumerate() {
            for i in 0..s.kv_len.div_ceil(case.page_size) {
                block_table[b * max_pages + i] = pages[next];
                next += 1;
            }
        }
        let kv_lens: Vec<i32> = case.seqs.iter().map(|s| s.kv_len as i32).collect();
        let q_lens: Vec<i32> = case.seqs.iter().map(|s| s.q_len as i32).collect();
        let mut starts = Vec::with_capacity(batch);
        let mut acc = 0i32;
        for &q in &q_lens {
            starts.push(acc);
            acc += q;
        }
        let num_tokens = acc as usize;
        let meta = BatchMetadata::new(
            starts,
            q_lens,
            kv_lens.clone(),
            block_table.clone(),
            max_pages,
        )?;
        let mut hist_starts = Vec::with_capacity(batch);
        let mut hacc = 0i32;
        for &l in &kv_lens {
            hist_starts.push(hacc);
            hacc += l;
        }
        let total_hist = hacc as usize;
        let prefill_meta = BatchMetadata::new(
            hist_starts.clone(),
            kv_lens.clone(),
            kv_lens,
            block_table,
            max_pages,
        )?;

        let h = case.num_kv_heads;
        let hist_k = llm_like(&mut rng, total_hist, h, case.head_dim_k, 12.0, act);
        let hist_v = llm_like(&mut rng, total_hist, h, case.head_dim_v, 4.0, act);
        let (k_row, v_row) = (h * case.head_dim_k, h * case.head_dim_v);
        let (k_row_stride, v_row_stride) = (k_row + case.row_pad, v_row + case.row_pad);
        let mut k_new = vec![f32::NAN; num_tokens * k_row_stride];
        let mut v_new = vec![f32::NAN; num_tokens * v_row_stride];
        for (b, s) in case.seqs.iter().enumerate() {
            for i in 0..s.q_len {
                let src_tok = hist_starts[b] as usize + s.kv_len - s.q_len + i;
                let dst_tok = meta.q_start_loc()[b] as usize + i;
                k_new[dst_tok * k_row_stride..][..k_row]
                    .copy_from_slice(&hist_k[src_tok * k_row..][..k_row]);
                v_new[dst_tok * v_row_stride..][..v_row]
                    .copy_from_slice(&hist_v[src_tok * v_row..][..v_row]);
            }
        }
        // Queries correlated with the keys' outlier channels, as real queries are.
        let q = llm_like(
            &mut rng,
            num_tokens,
            case.num_heads,
            case.head_dim_k,
            4.0,
            act,
        );
        Ok(Problem {
            layout,
            meta,
            prefill_meta,
            num_tokens,
            k_new,
            v_new,
            k_row_stride,
            v_row_stride,
            hist_k,
            hist_v,
            q,
        })
    }

    /// Total cached tokens (the flattened token count).
    pub fn total_kv_tokens(&self) -> usize {
        self.prefill_meta.total_new_tokens()
    }

    /// New K rows as reference-kernel input.
    pub fn k_rows(&self) -> HostRows<'_> {
        HostRows {
            data: &self.k_new,
            row_stride: self.k_row_stride,
        }
    }

    /// New V rows as reference-kernel input.
    pub fn v_rows(&self) -> HostRows<'_> {
        HostRows {
            data: &self.v_new,
            row_stride: self.v_row_stride,
        }
    }

    /// A cache (every byte `poison`, spec from `policy`, `cache_dtype` and `scales`) with every
    /// position of every sequence written by the reference fill: the state decode and flatten
    /// read.
    pub fn full_cache(
        &self,
        policy: QuantPolicy,
        cache_dtype: Dtype,
        scales: &KvScales,
        poison: u8,
    ) -> Result<HostKvCache> {
        let spec = CacheSpec::from_parts(self.layout, policy, cache_dtype, *scales)?;
        let mut cache = HostKvCache::new(spec, poison)?;
        let k = HostRows {
            data: &self.hist_k,
            row_stride: self.layout.num_kv_heads() * self.layout.head_dim_k(),
        };
        let v = HostRows {
            data: &self.hist_v,
            row_stride: self.layout.num_kv_heads() * self.layout.head_dim_v(),
        };
        reference::fill(&mut cache, k, v, self.total_kv_tokens(), &self.prefill_meta)?;
        Ok(cache)
    }
}

/// A CUDA client for a GPU test, or `None` after printing `SKIPPED <test>: <reason>` when there
/// is no usable device. With `FP8KV_REQUIRE_GPU=1` a missing device fails the test instead.
/// Shared by the GPU tests of every crate in the workspace.
pub fn client_or_skip(test: &str) -> Option<ComputeClient<Cuda>> {
    match cuda_client() {
        Ok(c) => Some(c),
        Err(e) => {
            if std::env::var("FP8KV_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("{test}: FP8KV_REQUIRE_GPU=1 but {e}");
            }
            // Straight to the stream: libtest captures print!/eprint! of passing tests.
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {e}");
            None
        }
    }
}
