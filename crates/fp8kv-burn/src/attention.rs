//! Causal attention of one sequence's new tokens over its flattened cache, with Burn's own
//! tensor ops: the prefill half of "fill the chunk, flatten the sequence, attend", so a
//! chunked prefill reads exactly the dequantized values decode will read.

use burn_tensor::activation::softmax;
use burn_tensor::backend::Backend;
use burn_tensor::{Bool, DType, Tensor};

use fp8kv::error::{Fp8KvError, Result};

/// Attention of `q` (`[q_len, num_heads, head_dim_k]`, query `i` at position
/// `kv_len - q_len + i`) over one sequence's keys and values (`[kv_len, num_kv_heads, d]`, the
/// sequence's rows of a [`super::FlattenLayout::Shd`] flatten output): causal, GQA (query head
/// `h` reads KV head `h / (num_heads / num_kv_heads)`), scale `sm_scale` (default
/// `1/sqrt(head_dim_k)`). Scores, softmax and the weighted sum run in f32; the result is
/// `[q_len, num_heads, head_dim_v]` in `q`'s dtype.
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    sm_scale: Option<f32>,
) -> Result<Tensor<B, 3>> {
    let [n, heads, dk] = q.dims();
    let [t, kv_heads, dk2] = k.dims();
    let [t2, kv_heads2, dv] = v.dims();
    if dk2 != dk || t2 != t || kv_heads2 != kv_heads {
        return Err(Fp8KvError::ShapeMismatch {
            what: "k / v",
            expected: format!("k [kv_len, kv_heads, {dk}] and v [kv_len, kv_heads, d] of equal kv_len and kv_heads"),
            actual: format!("k {:?}, v {:?}", k.dims(), v.dims()),
        });
    }
    if kv_heads == 0 || heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(Fp8KvError::HeadRatio {
            num_heads: heads,
            num_kv_heads: kv_heads,
        });
    }
    if n > t {
        return Err(Fp8KvError::QueryLongerThanKv {
            seq: 0,
            q_len: n as i64,
            kv_len: t as i64,
        });
    }
    let out_dtype = q.dtype();
    let group = heads / kv_heads;
    let device = q.device();
    // [t, g, d] -> [g, group, t, d] -> [heads, t, d]: each KV head repeated for its group.
    let per_head = |x: Tensor<B, 3>, d: usize| -> Tensor<B, 3> {
        x.cast(DType::F32)
            .swap_dims(0, 1)
            .unsqueeze_dim::<4>(1)
            .expand([kv_heads, group, t, d])
            .reshape([heads, t, d])
    };
    let (k, v) = (per_head(k, dk), per_head(v, dv));
    let q = q.cast(DType::F32).swap_dims(0, 1); // [heads, n, dk]
    let scale = sm_scale.unwrap_or(1.0 / (dk as f32).sqrt());
    let scores = q.matmul(k.swap_dims(1, 2)) * scale; // [heads, n, t]
                                                      // Query i sits at position t - n + i and sees keys j <= t - n + i.
    let mask =
        Tensor::<B, 2, Bool>::tril_mask([n, t], (t - n) as i64, &device).unsqueeze_dim::<3>(0);
    let probs = softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 2);
    Ok(probs.matmul(v).swap_dims(0, 1).cast(out_dtype))
}
