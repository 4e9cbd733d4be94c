//! The Llama architecture (SmolLM2-135M) in Burn, generic over the backend, its KV cache
//! entirely through the fp8kv extension: embedding → blocks of (RMSNorm, attention with RoPE
//! and GQA, RMSNorm, SwiGLU MLP) → RMSNorm → logits (tied embedding).
//!
//! Attention is one call per layer into the cache: [`KvCache::fill_rope`] writes this step's K
//! and V (K rotated), then [`KvCache::decode`] reads the paged cache in place for any number of
//! new tokens per sequence, causal among them, so prefill and decode attend to the same
//! dequantized values through one kernel ([`Attend::Decode`], [`decode_block`] per layer).
//! [`Attend::Prefill`] instead flattens each sequence's cache and runs [`causal_attention`]
//! (Burn's tensor ops, f32): an independent path the tests compare against. Every number
//! (heads, dims, RoPE base, eps) comes from the GGUF.

use std::sync::Mutex;

use burn_tensor::backend::Backend;
use burn_tensor::{DType, Int, Tensor, TensorData};

use super::error::{ModelError, Result};
use super::gguf::{Gguf, LlamaConfig};
use super::layer::ops::{
    add_rms_norm, argmax, decode_block, linear, linear_swiglu, rms_norm, rope_qkv, BlockWeights,
};
use super::layer::{LayerBackend, QkvHeads, RopeTable, RopeTableTensor};
use fp8kv::layout::{KvLayoutKind, PagedKvLayout};
use fp8kv::{AttentionOptions, FlattenLayout, KvScales, QuantPolicy};
use fp8kv_burn::{causal_attention, KvBatch, KvCache, KvCacheConfig, PagedKvBackend};

/// How a step's attention reads the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attend {
    /// The paged decode kernel (any number of new tokens per sequence, causal among them):
    /// decode steps and, by default, prefill chunks ([`super::engine::Engine::prefill_attend`]).
    Decode,
    /// Flatten each sequence's cache and run [`causal_attention`] over it (Burn's tensor ops;
    /// 2.0–2.2× slower for a 2048-token prompt on an H100): kept as an independent check.
    Prefill,
}

/// One sequence's share of a step: its rows `[q_start, q_start + q_len)` of the packed tokens,
/// and its cached tokens after the step (`kv_len`, the new ones included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan {
    /// First packed row.
    pub q_start: usize,
    /// New tokens.
    pub q_len: usize,
    /// Cached tokens after the step.
    pub kv_len: usize,
}

/// One engine step's input: the packed new tokens, their positions, each sequence's span and
/// the step's metadata (validated and uploaded once, shared by every layer).
pub struct Step<B: PagedKvBackend> {
    /// Packed new tokens.
    pub tokens: Vec<u32>,
    /// Position of each token in its sequence.
    pub positions: Vec<usize>,
    /// Each sequence's span, in packing order.
    pub spans: Vec<SeqSpan>,
    /// The metadata.
    pub batch: KvBatch<B>,
}

/// One layer's K and V values as written to the cache (after RoPE, before quantization),
/// accumulated over the steps that collected them: the amax calibration needs and the count of
/// values each FP8 format saturates at scale 1.0.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LayerKvStats {
    /// Largest |K|.
    pub k_amax: f32,
    /// Largest |V|.
    pub v_amax: f32,
    /// K values with |x| > 448 (E4M3's MAX).
    pub k_over_e4m3: u64,
    /// V values with |x| > 448.
    pub v_over_e4m3: u64,
    /// K values with |x| > 57344 (E5M2's MAX).
    pub k_over_e5m2: u64,
    /// V values with |x| > 57344.
    pub v_over_e5m2: u64,
    /// K (and V) values seen.
    pub values: u64,
}

impl LayerKvStats {
    /// Adds one step's K and V through the library's statistics kernel
    /// ([`fp8kv_burn::PagedKvBackend::kv_stats`], what `KvCache::calibrate` and `saturation`
    /// run): once per FP8 format at scale 1.0 (the amax is the same both times).
    fn add<B: PagedKvBackend>(&mut self, k: &Tensor<B, 3>, v: &Tensor<B, 3>) -> Result<()> {
        let prim = |x: &Tensor<B, 3>| x.clone().into_primitive().tensor();
        let one = KvScales::default();
        let e4m3 = B::kv_stats(prim(k), prim(v), one, QuantPolicy::Fp8E4m3)?;
        let e5m2 = B::kv_stats(prim(k), prim(v), one, QuantPolicy::Fp8E5m2)?;
        self.k_amax = self.k_amax.max(e4m3.k_amax);
        self.v_amax = self.v_amax.max(e4m3.v_amax);
        self.k_over_e4m3 += u64::from(e4m3.k_saturated);
        self.v_over_e4m3 += u64::from(e4m3.v_saturated);
        self.k_over_e5m2 += u64::from(e5m2.k_saturated);
        self.v_over_e5m2 += u64::from(e5m2.v_saturated);
        self.values += k.dims().iter().product::<usize>() as u64;
        Ok(())
    }
}

/// SmolLM2 (any `llama`-architecture GGUF this loader reads) on backend `B`.
pub struct Llama<B: Backend> {
    config: LlamaConfig,
    act: DType,
    device: B::Device,
    embedding: Tensor<B, 2>,
    /// Projections stored `[out, in]` as in the file ([`linear`] applies them), Q|K|V and
    /// gate|up stacked along `out` once at load (one matmul each).
    blocks: Vec<BlockWeights<B>>,
    out_norm: Tensor<B, 1>,
    lm_head: Tensor<B, 2>,
    /// RoPE angles for positions `0..positions()`, grown (doubled) when a step goes past them.
    rope: Mutex<RopeTableTensor<B>>,
}

/// GGUF matrices (`[ne0 = in, ne1 = out]`, `in` contiguous, all of one `in`) as one `[Σ out,
/// in]` tensor (the file's own row-major `[out, in]`, stacked in order): one upload, one
/// matmul. [`linear`] applies it.
fn matrices<B: Backend>(
    gguf: &Gguf,
    names: &[String],
    act: DType,
    device: &B::Device,
) -> Result<Tensor<B, 2>> {
    let mut parts = Vec::with_capacity(names.len());
    for name in names {
        let t = gguf.tensor_f32(name)?;
        match t.shape[..] {
            [cols, rows] => parts.push((cols, rows, t.data)),
            _ => {
                return Err(ModelError::BadTensor {
                    tensor: name.clone(),
                    reason: format!("expected 2 dimensions, got {:?}", t.shape),
                })
            }
        }
    }
    let cols = parts[0].0;
    if let Some((i, p)) = parts.iter().enumerate().find(|(_, p)| p.0 != cols) {
        return Err(ModelError::BadTensor {
            tensor: names[i].clone(),
            reason: format!("input size {} differs from {}'s {cols}", p.0, names[0]),
        });
    }
    let width: usize = parts.iter().map(|p| p.1).sum();
    let mut data = Vec::with_capacity(cols * width);
    for (_, _, src) in &parts {
        data.extend_from_slice(src);
    }
    Ok(Tensor::from_data(
        TensorData::new(data, [width, cols]),
        (device, act),
    ))
}

fn vector<B: Backend>(gguf: &Gguf, name: &str, device: &B::Device) -> Result<Tensor<B, 1>> {
    let t = gguf.tensor_f32(name)?;
    let n = t.data.len();
    // Norm weights stay f32: the norms run in f32.
    Ok(Tensor::from_data(
        TensorData::new(t.data, [n]),
        (device, DType::F32),
    ))
}

impl<B: LayerBackend> Llama<B> {
    /// Loads every weight (dequantized to f32, then cast to `act`: f32, f16 or bf16) onto
    /// `device`.
    pub fn load(gguf: &Gguf, act: DType, device: &B::Device) -> Result<Self> {
        let config = gguf.llama_config()?;
        let emb = gguf.tensor_f32("token_embd.weight")?;
        let [hidden, vocab] = match emb.shape[..] {
            [a, b] => [a, b],
            _ => {
                return Err(ModelError::BadTensor {
                    tensor: "token_embd.weight".into(),
                    reason: format!("expected 2 dimensions, got {:?}", emb.shape),
                })
            }
        };
        let embedding =
            Tensor::<B, 2>::from_data(TensorData::new(emb.data, [vocab, hidden]), (device, act));
        // Tied output projection (no `output.weight` in this file): logits = x · Eᵀ, E being
        // `[vocab, hidden]`, the `[out, in]` that `linear` takes.
        let lm_head = if gguf.tensor_info("output.weight").is_ok() {
            matrices::<B>(gguf, &["output.weight".into()], act, device)?
        } else {
            embedding.clone()
        };
        let blocks = (0..config.block_count)
            .map(|i| {
                let m = |ws: &[&str]| {
                    let names: Vec<String> =
                        ws.iter().map(|w| format!("blk.{i}.{w}.weight")).collect();
                    matrices::<B>(gguf, &names, act, device)
                };
                Ok(BlockWeights {
                    attn_norm: vector::<B>(gguf, &format!("blk.{i}.attn_norm.weight"), device)?,
                    wqkv: m(&["attn_q", "attn_k", "attn_v"])?,
                    wo: m(&["attn_output"])?,
                    ffn_norm: vector::<B>(gguf, &format!("blk.{i}.ffn_norm.weight"), device)?,
                    w_gate_up: m(&["ffn_gate", "ffn_up"])?,
                    w_down: m(&["ffn_down"])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rope = Self::rope_table(&config, config.context_length.max(1), device)?;
        Ok(Llama {
            config,
            act,
            device: device.clone(),
            embedding,
            blocks,
            out_norm: vector::<B>(gguf, "output_norm.weight", device)?,
            lm_head,
            rope: Mutex::new(rope),
        })
    }

    /// The RoPE table of `config` for `positions` positions, uploaded to `device`.
    fn rope_table(
        config: &LlamaConfig,
        positions: usize,
        device: &B::Device,
    ) -> Result<RopeTableTensor<B>> {
        let d = config.head_dim();
        let table = RopeTable::new(
            config.rope_freq_base as f64,
            d,
            config.rope_dimension_count.min(d),
            positions,
        )?;
        Ok(RopeTableTensor::new(&table, device))
    }

    /// The RoPE table, covering at least `positions` positions (doubled when a step goes
    /// past it: a new upload once per doubling, not per step).
    pub fn rope_for(&self, positions: usize) -> Result<RopeTableTensor<B>> {
        let mut table = self
            .rope
            .lock()
            .map_err(|_| ModelError::Request("the RoPE table's lock was poisoned".into()))?;
        if table.positions() < positions {
            let grown = positions.max(2 * table.positions());
            *table = Self::rope_table(&self.config, grown, &self.device)?;
        }
        Ok(table.clone())
    }

    /// The hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
    /// The activation dtype.
    pub fn act(&self) -> DType {
        self.act
    }
    /// The device.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// A cache config for this model: `num_pages` pages of `page_size` tokens per layer,
    /// `policy` as users type it, the unquantized cache in bf16 (f16 when activations are f16).
    pub fn cache_config(
        &self,
        policy: &str,
        num_pages: usize,
        page_size: usize,
    ) -> Result<KvCacheConfig> {
        let c = &self.config;
        let d = c.head_dim();
        let layout = PagedKvLayout::new(
            num_pages,
            page_size,
            c.head_count_kv,
            d,
            d,
            KvLayoutKind::Bshd,
        )?;
        let unq = if self.act == DType::F16 {
            fp8kv::Dtype::F16
        } else {
            fp8kv::Dtype::Bf16
        };
        Ok(KvCacheConfig::new(policy, layout)?
            .with_layers(c.block_count)?
            .with_unquantized(unq)?)
    }

    /// One engine step over `step.tokens` (packed, `step.positions[i]` the position of
    /// `step.tokens[i]` in its sequence): writes their K/V into `caches` (one per layer) and returns the final hidden
    /// states `[num_tokens, hidden]` (normalised; apply [`Self::logits`] to the rows you need).
    /// With `stats` (one per layer), the K/V values are also measured (a device sync per layer:
    /// for calibration and reports, not the hot path).
    pub fn forward(
        &self,
        caches: &mut [KvCache<B>],
        step: &Step<B>,
        attend: Attend,
        mut stats: Option<&mut [LayerKvStats]>,
    ) -> Result<Tensor<B, 2>> {
        let (tokens, positions, batch, spans) =
            (&step.tokens, &step.positions, &step.batch, &step.spans);
        let c = &self.config;
        let (n, d) = (tokens.len(), c.head_dim());
        if positions.len() != n || caches.len() != self.blocks.len() {
            return Err(ModelError::Request(format!(
                "forward: {n} tokens with {} positions and {} caches for {} layers",
                positions.len(),
                caches.len(),
                self.blocks.len()
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::UnknownTokenId {
                id: t,
                vocab_size: c.vocab_size,
            });
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), &self.device);
        let mut x = self.embedding.clone().select(0, ids);
        let opts = AttentionOptions::default();
        let table = self.rope_for(batch.max_kv_len())?;
        let heads = QkvHeads {
            q_heads: c.head_count,
            kv_heads: c.head_count_kv,
            head_dim: d,
        };
        let eps = c.rms_norm_eps;
        // The MLP output of the block before, added to the residual stream by the next norm.
        let mut pending: Option<Tensor<B, 2>> = None;
        for (l, (block, cache)) in self.blocks.iter().zip(caches.iter_mut()).enumerate() {
            let want_stats = stats.as_deref().is_some_and(|s| l < s.len());
            if attend == Attend::Decode && !want_stats {
                // One call a block: one custom operation on Fusion (its host cost paid once).
                let (sum, mlp) = decode_block(
                    x,
                    pending.take(),
                    block,
                    cache,
                    batch,
                    &table,
                    heads,
                    eps,
                    &opts,
                )?;
                x = sum;
                pending = Some(mlp);
                continue;
            }
            let h = match pending.take() {
                None => rms_norm(x.clone(), &block.attn_norm, eps)?,
                Some(mlp) => {
                    let (sum, h) = add_rms_norm(x, mlp, &block.attn_norm, eps)?;
                    x = sum;
                    h
                }
            };
            let qkv = linear(h, &block.wqkv)?;
            let q = match stats.as_deref_mut().and_then(|s| s.get_mut(l)) {
                // Statistics read K and V: rotate them apart, then fill.
                Some(s) => {
                    let (q, k, v) = rope_qkv(qkv, batch, &table, heads)?;
                    s.add(&k, &v)?;
                    cache.fill(k, v, batch)?;
                    q
                }
                None => cache.fill_rope(qkv, batch, &table, heads)?,
            };
            let attn = match attend {
                Attend::Decode => cache.decode(q, batch, &opts)?,
                Attend::Prefill => {
                    let (k_all, v_all) = cache.flatten(batch, FlattenLayout::Shd, self.act)?;
                    let starts = batch.kv_start_loc();
                    let mut outs = Vec::with_capacity(spans.len());
                    for (b, s) in spans.iter().enumerate().filter(|(_, s)| s.q_len > 0) {
                        outs.push(causal_attention(
                            q.clone().slice(s.q_start..s.q_start + s.q_len),
                            k_all.clone().slice(starts[b]..starts[b + 1]),
                            v_all.clone().slice(starts[b]..starts[b + 1]),
                            None,
                        )?);
                    }
                    Tensor::cat(outs, 0)
                }
            };
            let o = linear(attn.reshape([n, c.head_count * d]), &block.wo)?;
            let (sum, h) = add_rms_norm(x, o, &block.ffn_norm, eps)?;
            x = sum;
            pending = Some(linear(linear_swiglu(h, &block.w_gate_up)?, &block.w_down)?);
        }
        Ok(match pending {
            Some(mlp) => add_rms_norm(x, mlp, &self.out_norm, eps)?.1,
            None => rms_norm(x, &self.out_norm, eps)?,
        })
    }

    /// Logits `[rows, vocab]` in f32 of final hidden states.
    pub fn logits(&self, hidden: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        Ok(self.logits_act(hidden)?.cast(DType::F32))
    }

    /// Logits `[rows, vocab]` in the activation dtype (what a greedy argmax needs: no cast
    /// launch).
    pub fn logits_act(&self, hidden: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        Ok(linear(hidden, &self.lm_head)?)
    }

    /// The greedy next token of each row of final hidden states: logits and their argmax on
    /// the device, `rows` indices read back.
    pub fn greedy(&self, hidden: Tensor<B, 2>) -> Result<Vec<u32>> {
        let idx = argmax(self.logits_act(hidden)?)?;
        let data = idx
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .map_err(|e| ModelError::Request(format!("reading argmax: {e:?}")))?;
        Ok(data.into_iter().map(|i| i as u32).collect())
    }
}
