//! Sampler chains (llama.cpp's, through llama-cpp-2), applied to logits the caller holds, so
//! that one context can sample many sequences with one sampler each.

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;

use super::Token;

/// Sampling settings. The chain is llama.cpp's usual one: penalties, then greedy when
/// `temperature <= 0`, else top-k, top-p, min-p, temperature and a seeded draw.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: i32,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// Multiplicative penalty of recent tokens; 1 = off.
    pub repeat_penalty: f32,
    /// Tokens the penalties look back on.
    pub repeat_last_n: i32,
    /// OpenAI's frequency penalty (subtracted once per earlier occurrence); 0 = off.
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty (subtracted once if the token occurred); 0 = off.
    pub presence_penalty: f32,
    /// Seed of the draw.
    pub seed: u32,
}

impl SamplingParams {
    /// Greedy decoding.
    #[must_use]
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

/// A sampler chain built by [`super::Model::sampler`].
#[derive(Debug)]
pub struct Sampler {
    chain: LlamaSampler,
    greedy: bool,
    penalties: bool,
}

impl Sampler {
    pub(crate) fn new(p: &SamplingParams, n_vocab: usize) -> Self {
        let mut chain = Vec::new();
        let penalties =
            p.repeat_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
        if penalties {
            chain.push(LlamaSampler::penalties(
                i32::try_from(n_vocab).unwrap_or(i32::MAX),
                p.repeat_last_n,
                p.repeat_penalty,
                p.frequency_penalty,
                p.presence_penalty,
            ));
        }
        let greedy = p.temperature <= 0.0;
        if greedy {
            chain.push(LlamaSampler::greedy());
        } else {
            if p.top_k > 0 {
                chain.push(LlamaSampler::top_k(p.top_k));
            }
            if p.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(p.top_p, 1));
            }
            if p.min_p > 0.0 {
                chain.push(LlamaSampler::min_p(p.min_p, 1));
            }
            chain.push(LlamaSampler::temp(p.temperature));
            chain.push(LlamaSampler::dist(p.seed));
        }
        Sampler {
            chain: LlamaSampler::chain_simple(chain),
            greedy,
            penalties,
        }
    }

    /// Feeds tokens the sampler should remember (the prompt, for the penalties).
    pub fn accept(&mut self, tokens: &[Token]) {
        for &t in tokens {
            self.chain.accept(LlamaToken(t));
        }
    }

    /// Picks the next token from these logits and remembers it.
    pub fn sample(&mut self, logits: &[f32]) -> Token {
        let mut data = LlamaTokenDataArray::from_iter(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
            false,
        );
        data.apply_sampler(&mut self.chain);
        let token = data
            .selected_token()
            .map_or_else(|| argmax(logits), |t| t.0);
        self.chain.accept(LlamaToken(token));
        token
    }

    /// Whether the chain picks the most likely token.
    #[must_use]
    pub fn is_greedy(&self) -> bool {
        self.greedy
    }

    /// Whether the chain picks the most likely token of the raw logits (greedy, no penalties):
    /// then the caller's argmax is its choice, and it keeps no state worth feeding.
    #[must_use]
    pub fn is_argmax(&self) -> bool {
        self.greedy && !self.penalties
    }
}

fn argmax(logits: &[f32]) -> Token {
    logits
        .iter()
        .enumerate()
        .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0 as Token
}
