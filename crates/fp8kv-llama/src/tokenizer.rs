//! The model's tokenizer, built from GGUF metadata: GPT-2 byte-level BPE with the `smollm`
//! pre-tokenizer, and ChatML prompts.
//!
//! Encoding follows llama.cpp (`llama-vocab.cpp`), which the tests compare with token for token:
//!
//! 1. With `special = true`, control tokens (`<|im_start|>`, `<|im_end|>`, ...) are cut out of
//!    the text first, longest token text first, and become their own ids; user-defined tokens
//!    are cut out always. With `special = false` a control token's text is ordinary text.
//! 2. Each remaining piece is pre-tokenized by the `smollm` rules: every digit is split off on
//!    its own (`\p{N}`), then the GPT-2 regex
//!    `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` splits the
//!    rest.
//! 3. Each word's bytes are mapped to GPT-2's printable byte alphabet and merged by BPE rank.
//!
//! Steps 2 and 3 are Hugging Face's `tokenizers` crate (its `Digits` and `ByteLevel`
//! pre-tokenizers and its BPE model); step 1 and decoding are here. Decoding maps byte-level
//! text back to bytes; control and user-defined tokens decode to their text, as llama.cpp's
//! `token_to_piece(.., special = true)` does.

use std::collections::HashMap;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

use super::error::{ModelError, Result};
use super::gguf::Gguf;

/// How a GGUF vocabulary entry is to be treated (`tokenizer.ggml.token_type`, llama.cpp's
/// `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// 0: not specified.
    Undefined,
    /// 1: an ordinary BPE token.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: a control token (`<|im_start|>`): recognised in text only with `special = true`.
    Control,
    /// 4: a user-defined token: always recognised in text.
    UserDefined,
    /// 5: unused.
    Unused,
    /// 6: a byte token (SentencePiece byte fallback).
    Byte,
}

impl TokenType {
    fn from_gguf(value: i32) -> Option<Self> {
        Some(match value {
            0 => TokenType::Undefined,
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return None,
        })
    }
}

/// GGUF's `tokenizer.ggml.model` this tokenizer implements.
const SUPPORTED_MODEL: &str = "gpt2";
/// GGUF's `tokenizer.ggml.pre` this tokenizer implements.
const SUPPORTED_PRE: &str = "smollm";

/// The tokenizer of a GGUF model (SmolLM2: 49,152 tokens, 48,900 merges).
pub struct Tokenizer {
    /// Hugging Face BPE with the smollm pre-tokenizer, no added tokens: it sees only the text
    /// between special tokens.
    bpe: tokenizers::Tokenizer,
    /// Each token's text as stored in the GGUF (byte-level alphabet for normal tokens).
    tokens: Vec<String>,
    token_types: Vec<TokenType>,
    /// The bytes each token decodes to.
    pieces: Vec<Vec<u8>>,
    /// Ids cut out of the text before BPE (control, unknown, user-defined), longest text first.
    specials: Vec<u32>,
    bos_id: u32,
    eos_id: u32,
    unk_id: Option<u32>,
    padding_id: Option<u32>,
    chat_template: Option<String>,
    default_system_prompt: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("specials", &self.specials.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata: `model` must be `gpt2` and `pre`
    /// `smollm`; `tokens`, `token_type`, `merges`, `bos_token_id` and `eos_token_id` are
    /// required, `unknown_token_id`, `padding_token_id` and `tokenizer.chat_template` optional.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self> {
        for (key, supported) in [
            ("tokenizer.ggml.model", SUPPORTED_MODEL),
            ("tokenizer.ggml.pre", SUPPORTED_PRE),
        ] {
            let value = gguf.get_str(key)?;
            if value != supported {
                return Err(ModelError::Unsupported {
                    key: key.to_string(),
                    value: value.to_string(),
                    supported,
                });
            }
        }
        let tokens: Vec<String> = gguf
            .get_str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let raw_types = gguf.get_i32_array("tokenizer.ggml.token_type")?;
        if raw_types.len() != tokens.len() {
            return Err(ModelError::Tokenizer(format!(
                "{} token types for {} tokens",
                raw_types.len(),
                tokens.len()
            )));
        }
        let token_types = raw_types
            .iter()
            .enumerate()
            .map(|(id, &t)| {
                TokenType::from_gguf(t).ok_or_else(|| {
                    ModelError::Tokenizer(format!("token {id} has unknown token type {t}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let merges = gguf
            .get_str_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::Tokenizer(format!("merge `{m}` is not `A B`")))
            })
            .collect::<Result<Vec<_>>>()?;

        let vocab_size = tokens.len();
        let id_key = |key: &str| -> Result<u32> {
            let id = gguf.get_u32(key)?;
            if (id as usize) < vocab_size {
                Ok(id)
            } else {
                Err(ModelError::UnknownTokenId { id, vocab_size })
            }
        };
        let optional_id = |key: &str| -> Result<Option<u32>> {
            if gguf.contains_key(key) {
                id_key(key).map(Some)
            } else {
                Ok(None)
            }
        };
        let bos_id = id_key("tokenizer.ggml.bos_token_id")?;
        let eos_id = id_key("tokenizer.ggml.eos_token_id")?;
        let unk_id = optional_id("tokenizer.ggml.unknown_token_id")?;
        let padding_id = optional_id("tokenizer.ggml.padding_token_id")?;
        let chat_template = if gguf.contains_key("tokenizer.chat_template") {
            Some(gguf.get_str("tokenizer.chat_template")?.to_string())
        } else {
            None
        };

        let bpe = build_bpe(&tokens, merges)?;
        let byte_of_char: HashMap<char, u8> = byte_to_char_table()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let pieces = tokens
            .iter()
            .zip(&token_types)
            .map(|(text, ty)| token_piece(text, *ty, &byte_of_char))
            .collect();

        let mut specials: Vec<u32> = (0..vocab_size as u32)
            .filter(|&id| {
                let ty = token_types[id as usize];
                matches!(
                    ty,
                    TokenType::Control | TokenType::Unknown | TokenType::UserDefined
                ) && !tokens[id as usize].is_empty()
            })
            .collect();
        // llama.cpp partitions with the longest special text first.
        specials.sort_by_key(|&id| (std::cmp::Reverse(tokens[id as usize].len()), id));

        let default_system_prompt = chat_template.as_deref().and_then(default_system_prompt);
        Ok(Tokenizer {
            bpe,
            tokens,
            token_types,
            pieces,
            specials,
            bos_id,
            eos_id,
            unk_id,
            padding_id,
            chat_template,
            default_system_prompt,
        })
    }

    /// Token ids of `text`, without a BOS. With `special = true` control tokens written in the
    /// text (`<|im_start|>`) become their ids; with `false` they are tokenized as plain text.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for fragment in self.partition(text, special) {
            match fragment {
                Fragment::Token(id) => ids.push(id),
                Fragment::Text(text) => {
                    let encoding = self
                        .bpe
                        .encode(text, false)
                        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
                    ids.extend_from_slice(encoding.get_ids());
                }
            }
        }
        Ok(ids)
    }

    /// Cuts the special tokens out of `text`, as llama.cpp's `tokenizer_st_partition`: for each
    /// special token, longest first, every occurrence in every remaining text fragment, left
    /// to right.
    fn partition<'t>(&self, text: &'t str, special: bool) -> Vec<Fragment<'t>> {
        let mut fragments = vec![Fragment::Text(text)];
        for &id in &self.specials {
            let always = self.token_types[id as usize] == TokenType::UserDefined;
            if !(special || always) {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len());
            for fragment in fragments {
                let Fragment::Text(text) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut rest = 0;
                for (at, _) in text.match_indices(needle) {
                    if at > rest {
                        next.push(Fragment::Text(&text[rest..at]));
                    }
                    next.push(Fragment::Token(id));
                    rest = at + needle.len();
                }
                if rest < text.len() {
                    next.push(Fragment::Text(&text[rest..]));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// The text of `ids`. Control and user-defined tokens decode to their text; bytes that do
    /// not form valid UTF-8 (a multi-byte character cut between tokens) become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.piece(id)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A decoder for one token at a time that holds back the bytes of a character split
    /// between tokens (for printing while generating).
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tokenizer: self,
            pending: Vec::new(),
        }
    }

    /// The bytes token `id` decodes to.
    pub fn piece(&self, id: u32) -> Result<&[u8]> {
        self.pieces
            .get(id as usize)
            .map(Vec::as_slice)
            .ok_or(ModelError::UnknownTokenId {
                id,
                vocab_size: self.pieces.len(),
            })
    }

    /// Token `id` as stored in the GGUF (byte-level alphabet: `"Ġthe"` for `" the"`).
    pub fn token_text(&self, id: u32) -> Result<&str> {
        self.tokens
            .get(id as usize)
            .map(String::as_str)
            .ok_or(ModelError::UnknownTokenId {
                id,
                vocab_size: self.tokens.len(),
            })
    }

    /// Token `id`'s type.
    pub fn token_type(&self, id: u32) -> Result<TokenType> {
        self.token_types
            .get(id as usize)
            .copied()
            .ok_or(ModelError::UnknownTokenId {
                id,
                vocab_size: self.token_types.len(),
            })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// `tokenizer.ggml.bos_token_id` (SmolLM2: 1, `<|im_start|>`; it does not add one).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// `tokenizer.ggml.eos_token_id` (SmolLM2: 2, `<|im_end|>`).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// `tokenizer.ggml.unknown_token_id`, if present.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    /// `tokenizer.ggml.padding_token_id`, if present.
    pub fn padding_id(&self) -> Option<u32> {
        self.padding_id
    }

    /// Whether generation should stop at `id`: the EOS, or a control token that ends a turn or
    /// a document (`<|im_end|>`, `<|endoftext|>`), as llama.cpp's end-of-generation set.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        id == self.eos_id
            || (self.token_types.get(id as usize) == Some(&TokenType::Control)
                && matches!(
                    self.tokens[id as usize].as_str(),
                    "<|im_end|>" | "<|endoftext|>"
                ))
    }

    /// `tokenizer.chat_template` (Jinja), if present.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The system prompt the chat template inserts when the conversation has none (SmolLM2:
    /// "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
    pub fn default_system_prompt(&self) -> Option<&str> {
        self.default_system_prompt.as_deref()
    }

    /// One user turn rendered in ChatML with the generation prompt, as the GGUF's chat template
    /// renders `[system?, user]` with `add_generation_prompt`:
    ///
    /// ```text
    /// <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n
    /// ```
    ///
    /// Without `system` the template's default system prompt is used (if it has one; else the
    /// system turn is left out). Encode the result with `special = true`.
    pub fn chat_prompt(&self, system: Option<&str>, user: &str) -> String {
        let mut prompt = String::new();
        if let Some(system) = system.or(self.default_system_prompt.as_deref()) {
            prompt.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
        }
        prompt.push_str(&format!(
            "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ));
        prompt
    }
}

/// A piece of the text being encoded: a special token cut out, or text for BPE.
enum Fragment<'t> {
    Token(u32),
    Text(&'t str),
}

/// Decodes one token at a time: [`TokenStream::push`] returns the text that token completes,
/// holding back a character whose bytes are split across tokens. The pushes' outputs followed
/// by [`TokenStream::finish`] are exactly [`Tokenizer::decode`] of all the ids.
#[derive(Debug)]
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u8>,
}

impl TokenStream<'_> {
    /// Adds token `id` and returns the text that is now complete (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.pending.extend_from_slice(self.tokenizer.piece(id)?);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return Ok(out);
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return Ok(out);
                        }
                        // Bytes that can never be valid: U+FFFD, as from_utf8_lossy does.
                        Some(len) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + len);
                        }
                    }
                }
            }
        }
    }

    /// The text still held back (an incomplete character at the very end becomes U+FFFD).
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

/// GPT-2's map from bytes to printable characters (`bytes_to_unicode` in OpenAI's
/// `encoder.py`): printable Latin-1 bytes map to themselves, the other 68 bytes, in order, to
/// U+0100 onwards (space is `Ġ` U+0120, newline `Ċ` U+010A).
pub fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_shifted = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
        *slot = if printable {
            char::from(b as u8)
        } else {
            next_shifted += 1;
            char::from_u32(0xff + next_shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
    }
    table
}

/// The bytes a token decodes to, as llama.cpp's `token_to_piece(.., special = true)`: normal
/// tokens through the byte-level alphabet, control/unknown/user-defined tokens as their text,
/// the other types as nothing.
fn token_piece(text: &str, ty: TokenType, byte_of_char: &HashMap<char, u8>) -> Vec<u8> {
    match ty {
        TokenType::Normal => {
            let mut bytes = Vec::with_capacity(text.len());
            for c in text.chars() {
                match byte_of_char.get(&c) {
                    Some(&b) => bytes.push(b),
                    // Not in the alphabet (should not occur in a byte-level vocab): keep as is.
                    None => bytes.extend_from_slice(c.encode_utf8(&mut [0u8; 4]).as_bytes()),
                }
            }
            bytes
        }
        TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
            text.as_bytes().to_vec()
        }
        TokenType::Undefined | TokenType::Unused | TokenType::Byte => Vec::new(),
    }
}

/// Hugging Face BPE over the GGUF vocabulary and merges, with the smollm pre-tokenizer.
///
/// A character whose byte-level form is not a token (SmolLM2 lacks 21 of the 256: bytes 0x04,
/// 0x06, 0x13, 0x14, 0x16, 0x1d and lead bytes 0xc0, 0xc1, 0xf1, 0xf2, 0xf5..=0xff) is dropped,
/// by Hugging Face's BPE (no unknown token) as by llama.cpp (whose per-byte fallback finds no
/// token either). Merges whose result is not a token are rejected by the BPE builder.
fn build_bpe(tokens: &[String], merges: Vec<(String, String)>) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    // smollm (llama.cpp): `\p{N}` split first, one digit per piece, then the GPT-2 regex. No
    // prefix space (tokenizer.ggml.add_space_prefix is false).
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, false, true).into(),
    ])));
    Ok(tokenizer)
}

/// The system prompt a ChatML template inserts by default: the text between a literal
/// `<|im_start|>system` plus newline and the next `<|im_end|>`, if the template has one.
fn default_system_prompt(template: &str) -> Option<String> {
    let start = template.find("<|im_start|>system")? + "<|im_start|>system".len();
    let rest = &template[start..];
    // The newline is a real one in SmolLM2's template, `\n` in a Jinja string in others.
    let rest = rest
        .strip_prefix('\n')
        .or_else(|| rest.strip_prefix("\\n"))?;
    let end = rest.find("<|im_end|>")?;
    Some(rest[..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_gpt2_known_values() {
        let t = byte_to_char_table();
        // Known entries of GPT-2's bytes_to_unicode: NUL is the first shifted byte, then 1..=32
        // in order (space 32 is the 33rd: U+0120), DEL 127 the 34th, 0x80..=0xa0 after it, and
        // the soft hyphen 0xad last (U+0143).
        assert_eq!(t[0], '\u{100}');
        assert_eq!(t[b'\n' as usize], '\u{10a}');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[0x7f], '\u{121}');
        assert_eq!(t[0x80], '\u{122}');
        assert_eq!(t[0xa0], '\u{142}');
        assert_eq!(t[0xad], '\u{143}');
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[0xe9], 'é');
        let mut sorted = t.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256, "the map is one to one");
    }

    #[test]
    fn default_system_prompt_is_read_from_either_newline_spelling() {
        let real = "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}";
        let escaped = r"{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}";
        assert_eq!(default_system_prompt(real).as_deref(), Some("Be brief."));
        assert_eq!(default_system_prompt(escaped).as_deref(), Some("Be brief."));
        assert_eq!(
            default_system_prompt("{{'<|im_start|>' + message['role'] }}"),
            None
        );
    }
}
