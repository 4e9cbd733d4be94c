//! GGUF files written by the loader tests, following the GGUF v3 spec byte by byte
//! (independently of the parser under test).

use std::path::PathBuf;

/// GGUF metadata value types (spec: `gguf_metadata_value_type`).
pub mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// GGML tensor type ids (spec: `ggml_type`).
pub mod gt {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_1: u32 = 3;
    pub const Q8_0: u32 = 8;
    pub const Q4_K: u32 = 12;
}

pub struct GgufWriter {
    pub alignment: usize,
    kvs: Vec<u8>,
    num_kvs: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            alignment: 32,
            kvs: Vec::new(),
            num_kvs: 0,
            tensors: Vec::new(),
        }
    }

    /// A key with a value of type `ty` whose encoding is `value`.
    pub fn kv(&mut self, key: &str, ty: u32, value: &[u8]) -> &mut Self {
        put_str(&mut self.kvs, key);
        self.kvs.extend(ty.to_le_bytes());
        self.kvs.extend(value);
        self.num_kvs += 1;
        self
    }

    pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv(key, vt::U32, &v.to_le_bytes())
    }

    pub fn kv_f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.kv(key, vt::F32, &v.to_le_bytes())
    }

    pub fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        let mut value = Vec::new();
        put_str(&mut value, v);
        self.kv(key, vt::STRING, &value)
    }

    pub fn kv_str_array(&mut self, key: &str, items: &[&str]) -> &mut Self {
        let mut value = vt::STRING.to_le_bytes().to_vec();
        value.extend((items.len() as u64).to_le_bytes());
        for s in items {
            put_str(&mut value, s);
        }
        self.kv(key, vt::ARRAY, &value)
    }

    pub fn kv_i32_array(&mut self, key: &str, items: &[i32]) -> &mut Self {
        let mut value = vt::I32.to_le_bytes().to_vec();
        value.extend((items.len() as u64).to_le_bytes());
        for v in items {
            value.extend(v.to_le_bytes());
        }
        self.kv(key, vt::ARRAY, &value)
    }

    pub fn tensor(&mut self, name: &str, shape: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), shape.to_vec(), ty, data));
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let align = |n: usize| n.div_ceil(self.alignment) * self.alignment;
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.num_kvs.to_le_bytes());
        out.extend(&self.kvs);
        // Offsets are relative to the data section, each aligned.
        let mut offset = 0;
        let mut offsets = Vec::new();
        for (name, shape, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((shape.len() as u32).to_le_bytes());
            for d in shape {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = align(offset + data.len());
        }
        out.resize(align(out.len()), 0);
        let data_start = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend(data);
        }
        out
    }

    pub fn write(&self, name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "fp8kv-model-loader-{name}-{}.gguf",
            std::process::id()
        ));
        std::fs::write(&path, self.bytes()).unwrap();
        path
    }
}
