//! Checked generation parameters: what validation produces from either API and what the batching
//! loop consumes. Every value here is already within its range.

/// How the next token is drawn. The fields follow llama.cpp's sampler chain (penalties, then
/// greedy when `temperature <= 0`, else top-k, top-p, min-p, temperature and a seeded draw);
/// "off" values are the ones that leave the distribution unchanged.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// `0` = greedy.
    pub temperature: f32,
    /// `0` = off.
    pub top_k: i32,
    /// `1` = off.
    pub top_p: f32,
    /// `0` = off.
    pub min_p: f32,
    /// Multiplicative penalty of tokens seen in the last `repeat_last_n`; `1` = off.
    pub repeat_penalty: f32,
    /// Tokens the penalties look back on.
    pub repeat_last_n: i32,
    /// OpenAI's additive penalties, `-2..=2`; `0` = off.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Seed of the draw: the client's, or one chosen at validation (reported back by TGI's
    /// `details.seed`). llama.cpp's sampler takes 32 bits: the loop passes `seed as u32`.
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding with no penalties.
    #[must_use]
    pub fn greedy() -> Sampling {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: REPEAT_LAST_N,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }

    /// Whether the draw is greedy (then the seed does not matter).
    #[must_use]
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Tokens the repetition and OpenAI penalties look back on (llama.cpp's default).
pub const REPEAT_LAST_N: i32 = 64;

/// Everything the loop needs to run one sequence, besides its prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationParams {
    pub sampling: Sampling,
    /// At most this many new tokens; validation has checked that the prompt plus this many
    /// fit in one sequence's context.
    pub max_new_tokens: u32,
    /// Generation stops when the output text contains one of these (none is empty); see
    /// [`crate::serve::text::Detokenizer`].
    pub stop: Vec<String>,
    /// How many alternatives to report with each token's log-probability (`0` = none).
    pub top_logprobs: u32,
}
