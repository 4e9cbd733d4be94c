//! [`KvCacheConfig`]: the caches of a whole model from one policy, layout and scales.

use fp8kv::error::{Fp8KvError, Result};
use fp8kv::layout::PagedKvLayout;
use fp8kv::policy::{Dtype, QuantPolicy};
use fp8kv::scales::KvScales;

use crate::{CacheSpec, KvCache, PagedKvBackend};

/// Everything needed to create the caches of a model: policy, layout, scales, layers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvCacheConfig {
    /// Quantization policy.
    pub policy: QuantPolicy,
    /// Element of the unquantized (`none`) cache: f16 or bf16 (default bf16). FP8 policies
    /// ignore it.
    pub unquantized: Dtype,
    /// Every layer's layout.
    pub layout: PagedKvLayout,
    /// Initial scales of every layer (1.0 by default).
    pub scales: KvScales,
    /// Layers [`KvCacheConfig::init`] creates.
    pub num_layers: usize,
}

impl KvCacheConfig {
    /// A one-layer config from a policy as users type it (`"fp8"`, `"fp8_e5m2"`, `"none"`, ...),
    /// scales 1.0, a bf16 unquantized cache.
    pub fn new(policy: &str, layout: PagedKvLayout) -> Result<Self> {
        Ok(KvCacheConfig {
            policy: policy.parse()?,
            unquantized: Dtype::Bf16,
            layout,
            scales: KvScales::default(),
            num_layers: 1,
        })
    }

    /// The same config for `num_layers` layers (> 0).
    pub fn with_layers(mut self, num_layers: usize) -> Result<Self> {
        if num_layers == 0 {
            return Err(Fp8KvError::ZeroSize { what: "num_layers" });
        }
        self.num_layers = num_layers;
        Ok(self)
    }

    /// The same config with these scales for every layer.
    pub fn with_scales(mut self, scales: KvScales) -> Self {
        self.scales = scales;
        self
    }

    /// The same config with an f16 or bf16 unquantized cache.
    pub fn with_unquantized(mut self, dtype: Dtype) -> Result<Self> {
        QuantPolicy::None.check_cache_dtype(dtype)?;
        self.unquantized = dtype;
        Ok(self)
    }

    /// The cache element type this config stores.
    pub fn cache_dtype(&self) -> Result<Dtype> {
        let dtype = match self.policy.fp8_format() {
            Some(_) => self.policy.cache_dtype(Dtype::Bf16)?,
            None => self.unquantized,
        };
        self.policy.check_cache_dtype(dtype)?;
        Ok(dtype)
    }

    /// One layer's spec.
    pub fn spec(&self) -> Result<CacheSpec> {
        CacheSpec::new(self.layout, self.cache_dtype()?, self.scales)
    }

    /// Device bytes of all layers' K and V caches.
    pub fn size_bytes(&self) -> usize {
        self.num_layers * self.layout.cache_bytes(self.policy)
    }

    /// Allocates every layer's cache on `device`.
    pub fn init<B: PagedKvBackend>(&self, device: &B::Device) -> Result<Vec<KvCache<B>>> {
        (0..self.num_layers)
            .map(|_| KvCache::new(self, device))
            .collect()
    }
}
