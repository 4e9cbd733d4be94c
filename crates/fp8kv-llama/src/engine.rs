//! Batched generation over the paged cache: a page allocator with a free list and reference
//! counts (sequences take pages as they grow, give them back when they finish, and a fork
//! shares its parent's full pages), chunked prefill, batched greedy decode, and teacher-forced
//! scoring for quality measurements.

use burn_tensor::backend::Backend;
use burn_tensor::{Tensor, TensorData};

use super::error::{ModelError, Result};
use super::layer::LayerBackend;
use super::llama::{Attend, LayerKvStats, Llama, SeqSpan, Step};
use fp8kv::layout::BatchMetadata;
use fp8kv::scales::KvScales;
use fp8kv_burn::{KvBatch, KvCache, KvCacheConfig, PagedKvBackend};

/// Physical pages with reference counts: a page is free when no sequence holds it.
#[derive(Debug, Clone)]
pub struct PagePool {
    free: Vec<i32>,
    refs: Vec<u32>,
}

impl PagePool {
    /// `num_pages` free pages (handed out lowest first).
    pub fn new(num_pages: usize) -> Self {
        PagePool {
            free: (0..num_pages as i32).rev().collect(),
            refs: vec![0; num_pages],
        }
    }
    /// Takes a free page (reference count 1).
    pub fn alloc(&mut self) -> Result<i32> {
        let p = self.free.pop().ok_or_else(|| {
            ModelError::Request(format!(
                "out of KV cache pages (all {} in use)",
                self.refs.len()
            ))
        })?;
        self.refs[p as usize] = 1;
        Ok(p)
    }
    /// One more holder of `page` (a fork sharing it).
    pub fn retain(&mut self, page: i32) {
        self.refs[page as usize] += 1;
    }
    /// One holder fewer; the page is free again at zero.
    pub fn release(&mut self, page: i32) {
        let r = &mut self.refs[page as usize];
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.free.push(page);
        }
    }
    /// Pages nobody holds.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    /// Holders of `page`.
    pub fn refs(&self, page: i32) -> u32 {
        self.refs[page as usize]
    }
}

/// One sequence: all its tokens (prompt and generated), its pages, how many tokens are cached.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    /// Its block-table row.
    pub pages: Vec<i32>,
    /// Tokens whose K/V are in the cache.
    pub cached: usize,
    /// Prompt length.
    pub prompt_len: usize,
}

/// A model, one cache per layer, a page pool and the live sequences.
pub struct Engine<B: LayerBackend> {
    /// The model.
    pub model: Llama<B>,
    caches: Vec<KvCache<B>>,
    config: KvCacheConfig,
    pool: PagePool,
    seqs: Vec<Option<Sequence>>,
    /// Tokens of one sequence a prefill step takes at most (default 2048: the paged kernel's
    /// prefill of a 2048-token prompt in one step is 2.4× its four 512-token chunks).
    pub prefill_chunk: usize,
    /// How steps with more than one new token per sequence attend: [`Attend::Decode`] (the
    /// default: the paged kernel reads the cache in place, causal among the new tokens) or
    /// [`Attend::Prefill`] (flatten, then Burn's tensor ops; kept for comparison).
    pub prefill_attend: Attend,
    /// When set (one entry per layer), steps accumulate K/V statistics into it (slow: for
    /// calibration and reports).
    pub kv_stats: Option<Vec<LayerKvStats>>,
}

impl<B: LayerBackend> Engine<B> {
    /// An engine with a `policy` cache (`"none"`, `"fp8"`, ...) of `num_pages` pages of
    /// `page_size` tokens per layer.
    pub fn new(model: Llama<B>, policy: &str, num_pages: usize, page_size: usize) -> Result<Self> {
        let config = model.cache_config(policy, num_pages, page_size)?;
        Self::with_config(model, config)
    }

    /// An engine with caches made from `config` (its layers must be the model's).
    pub fn with_config(model: Llama<B>, config: KvCacheConfig) -> Result<Self> {
        if config.num_layers != model.config().block_count {
            return Err(ModelError::Request(format!(
                "a cache config of {} layers for a model of {}",
                config.num_layers,
                model.config().block_count
            )));
        }
        let num_pages = config.layout.num_pages();
        let caches = config.init::<B>(model.device())?;
        Ok(Engine {
            model,
            caches,
            config,
            pool: PagePool::new(num_pages),
            seqs: Vec::new(),
            prefill_chunk: 2048,
            prefill_attend: Attend::Decode,
            kv_stats: None,
        })
    }

    /// The cache config (policy, layout, layers).
    pub fn cache_config(&self) -> &KvCacheConfig {
        &self.config
    }
    /// KV bytes one token takes over all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.config.num_layers * self.config.layout.bytes_per_token(self.config.policy)
    }
    /// The page pool.
    pub fn pool(&self) -> &PagePool {
        &self.pool
    }
    /// A live sequence.
    pub fn sequence(&self, id: usize) -> Option<&Sequence> {
        self.seqs.get(id).and_then(Option::as_ref)
    }
    /// Sets layer `layer`'s scales (calibrated, or from a checkpoint).
    pub fn set_scales(&mut self, layer: usize, scales: KvScales) -> Result<()> {
        let cache = self.caches.get_mut(layer).ok_or_else(|| {
            ModelError::Request(format!("layer {layer} of {}", self.config.num_layers))
        })?;
        cache.set_scales(scales);
        Ok(())
    }

    /// Adds a sequence with this prompt; returns its id. No page is taken until it runs.
    pub fn add(&mut self, prompt: Vec<u32>) -> Result<usize> {
        if prompt.is_empty() {
            return Err(ModelError::Request("empty prompt".into()));
        }
        let seq = Sequence {
            prompt_len: prompt.len(),
            tokens: prompt,
            pages: Vec::new(),
            cached: 0,
        };
        self.seqs.push(Some(seq));
        Ok(self.seqs.len() - 1)
    }

    /// A new sequence continuing `parent`'s tokens: it shares the parent's full cached pages
    /// (reference counted, never written again) and gets a copy of the partial last page, so
    /// the two can grow apart without recomputing the shared prefix.
    pub fn fork(&mut self, parent: usize) -> Result<usize> {
        let p = self
            .sequence(parent)
            .ok_or_else(|| ModelError::Request(format!("no sequence {parent}")))?
            .clone();
        let page_size = self.config.layout.page_size();
        let full = p.cached / page_size;
        let mut pages = p.pages[..full].to_vec();
        for &pg in &pages {
            self.pool.retain(pg);
        }
        if p.cached % page_size != 0 {
            let copy = self.pool.alloc()?;
            for cache in &mut self.caches {
                cache.copy_blocks(&[(p.pages[full] as usize, copy as usize)])?;
            }
            pages.push(copy);
        }
        self.seqs.push(Some(Sequence { pages, ..p }));
        Ok(self.seqs.len() - 1)
    }

    /// A sequence whose first `context` tokens count as cached without running them (their
    /// K/V is whatever the pages hold), then one more token to decode: for timing decode at a
    /// long context without a long prefill. Not for generating text.
    pub fn add_synthetic(&mut self, context: usize, token: u32) -> Result<usize> {
        let page_size = self.config.layout.page_size();
        let mut pages = Vec::with_capacity(context.div_ceil(page_size));
        for _ in 0..context.div_ceil(page_size) {
            pages.push(self.pool.alloc()?);
        }
        self.seqs.push(Some(Sequence {
            tokens: vec![token; context + 1],
            pages,
            cached: context,
            prompt_len: context + 1,
        }));
        Ok(self.seqs.len() - 1)
    }

    /// Ends a sequence and gives its pages back.
    pub fn release(&mut self, id: usize) {
        if let Some(seq) = self.seqs.get_mut(id).and_then(Option::take) {
            for pg in seq.pages {
                self.pool.release(pg);
            }
        }
    }

    /// Appends a token to a sequence (the next step caches it).
    pub fn push(&mut self, id: usize, token: u32) -> Result<()> {
        self.seqs
            .get_mut(id)
            .and_then(Option::as_mut)
            .ok_or_else(|| ModelError::Request(format!("no sequence {id}")))?
            .tokens
            .push(token);
        Ok(())
    }

    /// The metadata of the next step over sequences `ids` (taking the pages it needs): each
    /// sequence's pending tokens, at most [`Self::prefill_chunk`] of them. Does not run it.
    pub fn plan_step(&mut self, ids: &[usize]) -> Result<StepPlan<B>> {
        let page_size = self.config.layout.page_size();
        let (mut tokens, mut positions, mut rows, mut spans) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &id in ids {
            let seq = self
                .seqs
                .get_mut(id)
                .and_then(Option::as_mut)
                .ok_or_else(|| ModelError::Request(format!("no sequence {id}")))?;
            let q_len = (seq.tokens.len() - seq.cached).min(self.prefill_chunk);
            let kv_len = seq.cached + q_len;
            while seq.pages.len() * page_size < kv_len {
                seq.pages.push(self.pool.alloc()?);
            }
            spans.push(SeqSpan {
                q_start: tokens.len(),
                q_len,
                kv_len,
            });
            for pos in seq.cached..kv_len {
                tokens.push(seq.tokens[pos]);
                positions.push(pos);
                rows.push((id, pos));
            }
        }
        let max_pages = ids
            .iter()
            .filter_map(|&id| self.sequence(id))
            .map(|s| s.pages.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut table = Vec::with_capacity(ids.len() * max_pages);
        for &id in ids {
            let pages = self
                .sequence(id)
                .map(|s| s.pages.as_slice())
                .unwrap_or_default();
            table.extend(pages.iter().copied());
            // Columns past a sequence's pages are never read; 0 keeps them in range anyway.
            table.extend(std::iter::repeat_n(0, max_pages - pages.len()));
        }
        let meta = BatchMetadata::new(
            spans.iter().map(|s| s.q_start as i32).collect(),
            spans.iter().map(|s| s.q_len as i32).collect(),
            spans.iter().map(|s| s.kv_len as i32).collect(),
            table,
            max_pages,
        )?;
        let batch =
            KvBatch::<B>::new(meta, &self.config.layout, tokens.len(), self.model.device())?;
        Ok(StepPlan {
            rows,
            step: Step {
                tokens,
                positions,
                spans,
                batch,
            },
        })
    }

    /// One step over sequences `ids` ([`Self::plan_step`], then the model): attention through
    /// [`Self::prefill_attend`] when any sequence brings more than one token, the paged decode
    /// kernel otherwise. Returns the final hidden
    /// states `[rows, hidden]` of every new token and each row's `(sequence id, position)`.
    pub fn step(&mut self, ids: &[usize]) -> Result<StepOutput<B>> {
        let plan = self.plan_step(ids)?;
        let attend = if plan.step.spans.iter().any(|s| s.q_len > 1) {
            self.prefill_attend
        } else {
            Attend::Decode
        };
        let hidden = self.model.forward(
            &mut self.caches,
            &plan.step,
            attend,
            self.kv_stats.as_deref_mut(),
        )?;
        for (&id, s) in ids.iter().zip(&plan.step.spans) {
            if let Some(seq) = self.seqs.get_mut(id).and_then(Option::as_mut) {
                seq.cached += s.q_len;
            }
        }
        Ok((hidden, plan.rows))
    }

    /// The per-layer caches (for timing the attention calls alone).
    pub fn caches_mut(&mut self) -> &mut [KvCache<B>] {
        &mut self.caches
    }

    /// Gives the model back (to build an engine with another cache policy).
    pub fn into_model(self) -> Llama<B> {
        self.model
    }

    /// Greedy generation for several prompts of different lengths, batched: prefill (chunked),
    /// then one decode step per token for every unfinished sequence. A sequence ends at
    /// `max_new` tokens or when `stop(token)`; its pages go back to the pool then. Returns the
    /// generated tokens of each prompt and the number of decode steps run.
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        max_new: usize,
        stop: &dyn Fn(u32) -> bool,
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>> {
        let ids: Vec<usize> = prompts
            .iter()
            .map(|p| self.add(p.clone()))
            .collect::<Result<_>>()?;
        let mut out = vec![Vec::new(); prompts.len()];
        let mut live: Vec<usize> = (0..prompts.len()).collect();
        while !live.is_empty() {
            let step_ids: Vec<usize> = live.iter().map(|&i| ids[i]).collect();
            let (hidden, rows) = self.step(&step_ids)?;
            // Only a sequence's last cached row predicts its next token.
            let mut last = Vec::new();
            for (r, &(id, pos)) in rows.iter().enumerate() {
                let seq = self.sequence(id).expect("stepped sequences are live");
                if pos + 1 == seq.tokens.len() {
                    last.push((r, id));
                }
            }
            if last.is_empty() {
                continue; // a prefill chunk that did not reach any prompt's end
            }
            // Every row is a last row in decode steps: no gather then.
            let hidden = if last.len() == rows.len() {
                hidden
            } else {
                let idx: Vec<i64> = last.iter().map(|&(r, _)| r as i64).collect();
                let idx = Tensor::<B, 1, burn_tensor::Int>::from_data(
                    TensorData::new(idx, [last.len()]),
                    self.model.device(),
                );
                hidden.select(0, idx)
            };
            let next = self.model.greedy(hidden)?;
            for (&(_, id), &tok) in last.iter().zip(&next) {
                let i = ids.iter().position(|&x| x == id).expect("own sequence");
                out[i].push(tok);
                on_token(i, tok);
                self.push(id, tok)?;
                if out[i].len() >= max_new || stop(tok) {
                    live.retain(|&l| l != i);
                    self.release(id);
                }
            }
        }
        Ok(out)
    }

    /// Teacher-forced logits of `tokens` in a fresh sequence: the first `prefill_len` tokens
    /// prefilled (in [`Self::prefill_chunk`] chunks), then one decode step per token. Returns the
    /// f32 logits predicting tokens `prefill_len..` (one row per position, on the host), and
    /// the sequence is released afterwards.
    pub fn score(&mut self, tokens: &[u32], prefill_len: usize) -> Result<Vec<Vec<f32>>> {
        if prefill_len == 0 || prefill_len > tokens.len() {
            return Err(ModelError::Request(format!(
                "prefill_len {prefill_len} must be in 1..={}",
                tokens.len()
            )));
        }
        let id = self.add(tokens[..prefill_len].to_vec())?;
        let mut rows = Vec::new();
        let mut last = None;
        while self.sequence(id).map(|s| s.cached) != Some(prefill_len) {
            let (hidden, r) = self.step(&[id])?;
            let n = r.len();
            last = Some(hidden.slice(n - 1..n));
        }
        for &tok in &tokens[prefill_len..] {
            let h = last.take().expect("a step ran");
            rows.extend(logits_rows(self.model.logits(h)?)?);
            self.push(id, tok)?;
            let (hidden, _) = self.step(&[id])?;
            last = Some(hidden);
        }
        self.release(id);
        Ok(rows)
    }
}

/// A planned step: the model's input and each packed token's `(sequence id, position)`.
pub struct StepPlan<B: PagedKvBackend> {
    /// `(sequence id, position)` of each packed token.
    pub rows: Vec<(usize, usize)>,
    /// The model's input.
    pub step: Step<B>,
}

/// What [`Engine::step`] returns: final hidden states `[rows, hidden]` and each row's
/// `(sequence id, position)`.
pub type StepOutput<B> = (Tensor<B, 2>, Vec<(usize, usize)>);

/// `[rows, vocab]` f32 logits as host rows.
pub fn logits_rows<B: Backend>(logits: Tensor<B, 2>) -> Result<Vec<Vec<f32>>> {
    let [_, vocab] = logits.dims();
    let data = logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| ModelError::Request(format!("reading logits: {e:?}")))?;
    Ok(data.chunks(vocab).map(<[f32]>::to_vec).collect())
}
