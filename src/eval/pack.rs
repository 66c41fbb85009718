//! Packing requests into llama.cpp batches so that no token is evaluated twice.
//!
//! A request is scored by feeding its context and all but the last continuation token, and
//! reading the distribution at the last context token and at every fed continuation token.
//! Requests often share a beginning: an item's choices share their context, MMLU's items of
//! one subject share the few-shot examples, Winogrande's two options share the sentence up
//! to the blank, TruthfulQA's mc1 and mc2 answers repeat. The planner puts the fed token
//! sequences of a group of requests (a *round*) into a prefix tree: each node is one KV cell,
//! evaluated once, and carries the sequence ids of every request that passes through it;
//! each request's own suffix carries only its own id. A request whose fed tokens are a
//! prefix of another's (or equal, as MMLU's one-token answers " A".." D" are) needs no
//! sequence id and no token of its own: it only reads rows.
//!
//! Planning is pure logic: [`Plan::new`] sorts the distinct requests by their fed tokens
//! (so that requests with a common beginning are neighbours), fills rounds up to a KV-cell
//! budget and a sequence-id budget, and [`Plan::round`] lays a round out as decode calls of
//! at most `max_batch` entries in depth-first order, each entry a token with its position,
//! its sequence ids (a contiguous range, the first id being one whose cells it may attend
//! to, as llama.cpp's mask uses a token's first id), and whether its logits are kept. The
//! layout obeys llama.cpp's batch rules (every sequence's positions consecutive from 0
//! across the round's decodes, non-decreasing within a batch, coupled sequences with equal
//! histories); the KV cache must be unified (`kv_unified`) for tokens with several ids.
//!
//! [`PackedScorer`] runs a plan through any [`Decoder`] (the engine's context, or in the
//! tests a simulated one) and turns the rows into [`Scored`] results.

use std::collections::HashMap;
use std::ops::Range;

use super::metrics::Scored;
use super::tasks::Request;
use super::{Scorer, Token};

/// The budgets of one round and one decode.
///
/// For llama.cpp: a context with `n_ctx >= max_tokens` (it rounds `n_ctx` up to a multiple of
/// 256), `n_batch >= max_batch`, a unified KV cache, and `max_seqs <= 256` (`LLAMA_MAX_SEQ`,
/// the most sequence ids a unified cache accepts); its batch must hold `max_seqs` ids per
/// token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// KV cells a round may fill (the context's `n_ctx`); at least the longest request's
    /// fed tokens.
    pub max_tokens: usize,
    /// Entries per decode call (the context's `n_batch`).
    pub max_batch: usize,
    /// Sequence ids per round (the context's `n_seq_max`).
    pub max_seqs: usize,
}

/// Why a plan cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// A request does not fit in one round.
    #[error(
        "a request feeds {tokens} tokens but a round holds {max_tokens}; use a larger context"
    )]
    TooLong {
        /// Its fed tokens.
        tokens: usize,
        /// The budget.
        max_tokens: usize,
    },
    /// A budget of zero.
    #[error("packing limits must be positive: {0:?}")]
    ZeroLimit(Limits),
}

/// One token of a decode call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The token.
    pub token: Token,
    /// Its position (depth in the prefix tree, from 0).
    pub pos: u32,
    /// The sequence ids of every request passing through it; pass them in this order (the
    /// first decides what the token attends to).
    pub seqs: Range<i32>,
    /// Whether its logits are read.
    pub logits: bool,
}

impl Entry {
    /// The sequence ids as a vector, first id first.
    pub fn seq_ids(&self) -> Vec<i32> {
        self.seqs.clone().collect()
    }
}

/// A read of one logits row for one distinct request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Read {
    /// The entry of its decode whose row it reads.
    entry: usize,
    /// The distinct request.
    request: usize,
    /// The token whose log-probability it takes.
    target: Token,
}

/// One decode call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decode {
    /// The batch.
    pub entries: Vec<Entry>,
    /// The rows read after it, by entry.
    reads: Vec<Read>,
}

/// A round: decode calls into an emptied KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    /// In order.
    pub decodes: Vec<Decode>,
}

impl Round {
    /// Entries (KV cells) of the round.
    pub fn tokens(&self) -> usize {
        self.decodes.iter().map(|d| d.entries.len()).sum()
    }

    /// Entries whose logits are kept.
    pub fn rows(&self) -> usize {
        self.decodes
            .iter()
            .map(|d| d.entries.iter().filter(|e| e.logits).count())
            .sum()
    }
}

/// The fed tokens of a request: its context and all of its continuation but the last token.
fn fed(r: &Request) -> impl Iterator<Item = &Token> + Clone {
    r.context
        .iter()
        .chain(&r.continuation[..r.continuation.len() - 1])
}

fn fed_len(r: &Request) -> usize {
    r.context.len() + r.continuation.len() - 1
}

fn fed_at(r: &Request, d: usize) -> Token {
    if d < r.context.len() {
        r.context[d]
    } else {
        r.continuation[d - r.context.len()]
    }
}

fn lcp(a: &Request, b: &Request) -> usize {
    fed(a).zip(fed(b)).take_while(|(x, y)| x == y).count()
}

/// A packing of requests into rounds.
#[derive(Debug, Clone)]
pub struct Plan {
    limits: Limits,
    /// For each request, its distinct request.
    distinct_of: Vec<usize>,
    /// The distinct requests (as indices of a representative request) in fed-token order.
    sorted: Vec<usize>,
    /// For each sorted position, the common prefix with the previous one (0 for the first).
    lcp: Vec<usize>,
    /// The rounds, as ranges of `sorted`.
    rounds: Vec<Range<usize>>,
}

impl Plan {
    /// Plans `requests` (each with a non-empty context and continuation).
    ///
    /// # Errors
    /// A zero limit, or a request that feeds more tokens than a round holds.
    pub fn new(requests: &[Request], limits: Limits) -> Result<Plan, PackError> {
        if limits.max_tokens == 0 || limits.max_batch == 0 || limits.max_seqs == 0 {
            return Err(PackError::ZeroLimit(limits));
        }
        let mut first: HashMap<&Request, usize> = HashMap::new();
        let mut representatives = Vec::new();
        let distinct_of = requests
            .iter()
            .enumerate()
            .map(|(i, r)| {
                assert!(!r.context.is_empty() && !r.continuation.is_empty());
                *first.entry(r).or_insert_with(|| {
                    representatives.push(i);
                    representatives.len() - 1
                })
            })
            .collect();
        let mut sorted: Vec<usize> = representatives.clone();
        // Stable: equal fed tokens keep their first-appearance order.
        sorted.sort_by(|&a, &b| fed(&requests[a]).cmp(fed(&requests[b])));
        let mut lcps = Vec::with_capacity(sorted.len());
        let mut rounds = Vec::new();
        let (mut start, mut tokens, mut seqs) = (0, 0, 0);
        for (j, &i) in sorted.iter().enumerate() {
            let r = &requests[i];
            let n = fed_len(r);
            if n > limits.max_tokens {
                return Err(PackError::TooLong {
                    tokens: n,
                    max_tokens: limits.max_tokens,
                });
            }
            let common = if j == 0 {
                0
            } else {
                lcp(&requests[sorted[j - 1]], r)
            };
            lcps.push(common);
            let (cost, new_seq) = if j == start {
                (n, 1)
            } else {
                // The previous path stops being a leaf if it is a prefix of this one.
                let prev_len = fed_len(&requests[sorted[j - 1]]);
                (n - common, usize::from(common < prev_len))
            };
            if j > start && (tokens + cost > limits.max_tokens || seqs + new_seq > limits.max_seqs)
            {
                rounds.push(start..j);
                start = j;
                tokens = n;
                seqs = 1;
            } else {
                tokens += cost;
                seqs += new_seq;
            }
        }
        if start < sorted.len() {
            rounds.push(start..sorted.len());
        }
        Ok(Plan {
            limits,
            distinct_of,
            sorted,
            lcp: lcps,
            rounds,
        })
    }

    /// Number of rounds.
    pub fn rounds(&self) -> usize {
        self.rounds.len()
    }

    /// Number of distinct requests.
    pub fn distinct(&self) -> usize {
        self.sorted.len()
    }

    /// Distinct requests in round `i`.
    pub fn round_requests(&self, i: usize) -> usize {
        self.rounds[i].len()
    }

    /// Lays out round `i` of the plan of `requests` (the same requests as [`Plan::new`]'s).
    pub fn round(&self, requests: &[Request], i: usize) -> Round {
        let range = self.rounds[i].clone();
        let paths: Vec<&Request> = self.sorted[range.clone()]
            .iter()
            .map(|&k| &requests[k])
            .collect();
        let distinct: Vec<usize> = self.sorted[range.clone()]
            .iter()
            .map(|&k| self.distinct_of[k])
            .collect();
        // Common prefix with the previous path in the round (0 for the first).
        let lcp: Vec<usize> = (0..paths.len())
            .map(|j| if j == 0 { 0 } else { self.lcp[range.start + j] })
            .collect();
        let len: Vec<usize> = paths.iter().map(|r| fed_len(r)).collect();
        // Leaves (paths that are not a prefix of the next one) get the sequence ids, in
        // order; a path's id is that of the first leaf at or after it.
        let is_leaf: Vec<bool> = (0..paths.len())
            .map(|j| j + 1 == paths.len() || lcp[j + 1] < len[j])
            .collect();
        let mut leaf_id = vec![0i32; paths.len()];
        let mut next = is_leaf.iter().filter(|&&l| l).count() as i32;
        for j in (0..paths.len()).rev() {
            if is_leaf[j] {
                next -= 1;
            }
            leaf_id[j] = next;
        }

        let mut entries: Vec<Entry> = Vec::new();
        let mut reads: Vec<Read> = Vec::new();
        // The entries of the current path, by depth.
        let mut stack: Vec<usize> = Vec::new();
        for j in 0..paths.len() {
            let r = paths[j];
            stack.truncate(lcp[j]);
            // The last path sharing the node at each new depth: later paths share depth d
            // while every consecutive common prefix from here on exceeds d.
            let mut last_sharer = vec![j; len[j] - lcp[j]];
            let mut run = usize::MAX;
            for t in j + 1..paths.len() {
                run = run.min(lcp[t]);
                if run <= lcp[j] {
                    break;
                }
                for slot in &mut last_sharer[..run.min(len[j]) - lcp[j]] {
                    *slot = t;
                }
            }
            for d in lcp[j]..len[j] {
                stack.push(entries.len());
                entries.push(Entry {
                    token: fed_at(r, d),
                    pos: d as u32,
                    seqs: leaf_id[j]..leaf_id[last_sharer[d - lcp[j]]] + 1,
                    logits: false,
                });
            }
            let c = r.context.len();
            for (step, &target) in r.continuation.iter().enumerate() {
                let entry = stack[c - 1 + step];
                entries[entry].logits = true;
                reads.push(Read {
                    entry,
                    request: distinct[j],
                    target,
                });
            }
        }
        // Split into decode calls; reads go with the decode of their entry, in entry order
        // (which, along one request, is token order).
        reads.sort_by_key(|r| r.entry);
        let b = self.limits.max_batch;
        let mut decodes: Vec<Decode> = entries
            .chunks(b)
            .map(|chunk| Decode {
                entries: chunk.to_vec(),
                reads: Vec::new(),
            })
            .collect();
        for read in reads {
            decodes[read.entry / b].reads.push(Read {
                entry: read.entry % b,
                ..read
            });
        }
        Round { decodes }
    }
}

/// A model behind a KV cache with several sequences, as llama.cpp's context is.
pub trait Decoder {
    /// Its error.
    type Error;
    /// Empties the KV cache (every sequence).
    ///
    /// # Errors
    /// As the implementation has them.
    fn clear(&mut self) -> Result<(), Self::Error>;
    /// Evaluates one batch.
    ///
    /// # Errors
    /// As the implementation has them (e.g. no KV space).
    fn decode(&mut self, entries: &[Entry]) -> Result<(), Self::Error>;
    /// The logits of entry `i` of the last decode (one added with `logits`).
    fn logits(&self, i: usize) -> &[f32];
}

/// What a logits row gives: the log of its softmax's denominator and its argmax.
#[derive(Debug, Clone, Copy)]
pub struct RowStats {
    /// `log(sum(exp(logits)))`, in f64.
    pub log_sum_exp: f64,
    /// The first index of the largest logit.
    pub argmax: usize,
}

/// [`RowStats`] of a row.
pub fn row_stats(logits: &[f32]) -> RowStats {
    let mut argmax = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[argmax] {
            argmax = i;
        }
    }
    let max = f64::from(logits[argmax]);
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    RowStats {
        log_sum_exp: max + sum.ln(),
        argmax,
    }
}

/// Errors of a [`PackedScorer`].
#[derive(Debug, thiserror::Error)]
pub enum PackedError<E: std::error::Error + 'static> {
    /// The requests could not be planned.
    #[error(transparent)]
    Pack(#[from] PackError),
    /// The decoder failed.
    #[error(transparent)]
    Decode(E),
}

/// A [`Scorer`] that runs packed rounds through a [`Decoder`].
pub struct PackedScorer<'p, D> {
    decoder: D,
    limits: Limits,
    progress: Option<Box<dyn FnMut(usize, usize) + 'p>>,
}

impl<D> std::fmt::Debug for PackedScorer<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedScorer")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<'p, D: Decoder> PackedScorer<'p, D> {
    /// A scorer over `decoder` with these budgets.
    pub fn new(decoder: D, limits: Limits) -> Self {
        Self {
            decoder,
            limits,
            progress: None,
        }
    }

    /// Calls `progress(done, total)` (distinct requests) after each round.
    #[must_use]
    pub fn with_progress(mut self, progress: impl FnMut(usize, usize) + 'p) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// The decoder back.
    pub fn into_inner(self) -> D {
        self.decoder
    }
}

impl<D> Scorer for PackedScorer<'_, D>
where
    D: Decoder,
    D::Error: std::error::Error + 'static,
{
    type Error = PackedError<D::Error>;

    fn score(&mut self, requests: &[Request]) -> Result<Vec<Scored>, Self::Error> {
        let plan = Plan::new(requests, self.limits)?;
        let mut sums = vec![
            Scored {
                loglikelihood: 0.0,
                is_greedy: true
            };
            plan.distinct()
        ];
        let mut done = 0;
        for i in 0..plan.rounds() {
            let round = plan.round(requests, i);
            self.decoder.clear().map_err(PackedError::Decode)?;
            for decode in &round.decodes {
                self.decoder
                    .decode(&decode.entries)
                    .map_err(PackedError::Decode)?;
                let mut row: Option<(usize, RowStats)> = None;
                for read in &decode.reads {
                    let logits = self.decoder.logits(read.entry);
                    let stats = match row {
                        Some((e, s)) if e == read.entry => s,
                        _ => {
                            let s = row_stats(logits);
                            row = Some((read.entry, s));
                            s
                        }
                    };
                    let t = read.target as usize;
                    let sum = &mut sums[read.request];
                    sum.loglikelihood += f64::from(logits[t]) - stats.log_sum_exp;
                    sum.is_greedy &= stats.argmax == t;
                }
            }
            done += plan.round_requests(i);
            if let Some(p) = self.progress.as_mut() {
                p(done, plan.distinct());
            }
        }
        Ok(plan.distinct_of.iter().map(|&d| sums[d]).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::pyrandom::PyRandom;
    use crate::eval::tasks::tests::{items_for, mini_tokenizer, reference};
    use crate::eval::tasks::{flatten, tokenize_items};
    use std::collections::{BTreeMap, BTreeSet, HashSet};

    const VOCAB: usize = 24;

    /// A deterministic "model": the logits after a prefix are a hash of the whole prefix,
    /// so a token that attends to anything but exactly its own sequence's earlier tokens
    /// gets other logits.
    fn table_logits(prefix: &[Token]) -> Vec<f32> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &t in prefix {
            h = (h ^ (t as u64 + 1)).wrapping_mul(0x100_0000_01b3);
        }
        let mut rnd = PyRandom::new(u128::from(h));
        (0..VOCAB)
            .map(|_| (rnd.random() * 8.0 - 4.0) as f32)
            .collect()
    }

    /// The naive scorer: every request alone, token by token.
    fn naive(requests: &[Request]) -> Vec<Scored> {
        requests
            .iter()
            .map(|r| {
                let mut prefix = r.context.clone();
                let mut s = Scored {
                    loglikelihood: 0.0,
                    is_greedy: true,
                };
                for &t in &r.continuation {
                    let logits = table_logits(&prefix);
                    let stats = row_stats(&logits);
                    s.loglikelihood += f64::from(logits[t as usize]) - stats.log_sum_exp;
                    s.is_greedy &= stats.argmax == t as usize;
                    prefix.push(t);
                }
                s
            })
            .collect()
    }

    /// A KV cache with llama.cpp's rules and masking, over [`table_logits`].
    struct SimulatedContext {
        limits: Limits,
        /// (token, pos, seqs) per cell.
        cells: Vec<(Token, u32, Range<i32>)>,
        rows: BTreeMap<usize, Vec<f32>>,
        decoded_tokens: usize,
        decodes: usize,
        clears: usize,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Broken(String);

    impl SimulatedContext {
        fn new(limits: Limits) -> Self {
            Self {
                limits,
                cells: Vec::new(),
                rows: BTreeMap::new(),
                decoded_tokens: 0,
                decodes: 0,
                clears: 0,
            }
        }

        fn seq_max(&self, s: i32) -> Option<u32> {
            self.cells
                .iter()
                .filter(|c| c.2.contains(&s))
                .map(|c| c.1)
                .max()
        }

        fn seq_min(&self, s: i32) -> Option<u32> {
            self.cells
                .iter()
                .filter(|c| c.2.contains(&s))
                .map(|c| c.1)
                .min()
        }
    }

    impl Decoder for SimulatedContext {
        type Error = Broken;

        fn clear(&mut self) -> Result<(), Broken> {
            self.cells.clear();
            self.clears += 1;
            Ok(())
        }

        fn decode(&mut self, entries: &[Entry]) -> Result<(), Broken> {
            let fail = |m: String| Err(Broken(m));
            if entries.is_empty() || entries.len() > self.limits.max_batch {
                return fail(format!("batch of {}", entries.len()));
            }
            if self.cells.len() + entries.len() > self.limits.max_tokens {
                return fail("no KV space".into());
            }
            // llama_batch_allocr::init's checks.
            let mut per_seq: BTreeMap<i32, Vec<u32>> = BTreeMap::new();
            let mut set_of: BTreeMap<i32, BTreeSet<i32>> = BTreeMap::new();
            let mut coupled: BTreeSet<(i32, i32)> = BTreeSet::new();
            for e in entries {
                if e.seqs.is_empty()
                    || e.seqs.start < 0
                    || e.seqs.end as usize > self.limits.max_seqs
                {
                    return fail(format!("bad seqs {:?}", e.seqs));
                }
                let set: BTreeSet<i32> = e.seqs.clone().collect();
                for s in e.seqs.clone() {
                    let positions = per_seq.entry(s).or_default();
                    if positions.last().is_some_and(|&p| e.pos < p) {
                        return fail(format!("sequence {s} positions are decreasing"));
                    }
                    positions.push(e.pos);
                    let cur = set_of.entry(s).or_insert_with(|| set.clone());
                    *cur = cur.intersection(&set).copied().collect();
                    if cur.is_empty() {
                        return fail(format!(
                            "sequence {s} belongs to incompatible sequence sets"
                        ));
                    }
                    for s1 in e.seqs.clone() {
                        coupled.insert((s, s1));
                    }
                }
            }
            for (&s, positions) in &per_seq {
                let (min, max) = (positions[0], *positions.last().unwrap());
                match self.seq_max(s) {
                    Some(p0) if min != p0 + 1 => {
                        return fail(format!("sequence {s}: Y = {min} != X + 1 = {}", p0 + 1))
                    }
                    None if min != 0 => return fail(format!("sequence {s} starts at {min}")),
                    _ => {}
                }
                if (max - min + 1) as usize != positions.len() {
                    return fail(format!("sequence {s} positions are not continuous"));
                }
            }
            for &(a, b) in &coupled {
                if (self.seq_min(a), self.seq_max(a)) != (self.seq_min(b), self.seq_max(b)) {
                    return fail(format!(
                        "sequence {a} is coupled to {b} but they have diverged"
                    ));
                }
            }
            for e in entries {
                self.cells.push((e.token, e.pos, e.seqs.clone()));
            }
            // Outputs: a token sees the cells of its first sequence up to its position.
            self.rows.clear();
            for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.logits) {
                let mut seen: Vec<(u32, Token)> = self
                    .cells
                    .iter()
                    .filter(|c| c.2.contains(&e.seqs.start) && c.1 <= e.pos)
                    .map(|c| (c.1, c.0))
                    .collect();
                seen.sort_unstable();
                if seen.iter().enumerate().any(|(k, c)| c.0 as usize != k)
                    || seen.len() != e.pos as usize + 1
                {
                    return fail(format!(
                        "entry {i} sees positions {:?}",
                        seen.iter().map(|c| c.0).collect::<Vec<_>>()
                    ));
                }
                let prefix: Vec<Token> = seen.iter().map(|c| c.1).collect();
                self.rows.insert(i, table_logits(&prefix));
            }
            self.decoded_tokens += entries.len();
            self.decodes += 1;
            Ok(())
        }

        fn logits(&self, i: usize) -> &[f32] {
            &self.rows[&i]
        }
    }

    fn run(requests: &[Request], limits: Limits) -> (Vec<Scored>, SimulatedContext) {
        let mut calls = Vec::new();
        let mut scorer = PackedScorer::new(SimulatedContext::new(limits), limits)
            .with_progress(|done, total| calls.push((done, total)));
        let scored = scorer.score(requests).unwrap();
        let sim = scorer.into_inner();
        assert_eq!(calls.len(), sim.clears);
        assert_eq!(calls.last().map(|c| c.0 == c.1), Some(true));
        (scored, sim)
    }

    /// Distinct non-empty prefixes of the requests' fed tokens: the tokens a single round
    /// must evaluate.
    fn distinct_prefixes(requests: &[Request]) -> usize {
        let mut set: HashSet<Vec<Token>> = HashSet::new();
        for r in requests {
            let f: Vec<Token> = fed(r).copied().collect();
            for n in 1..=f.len() {
                set.insert(f[..n].to_vec());
            }
        }
        set.len()
    }

    /// Requests with shared contexts, prefixes of one another, duplicates, one-token
    /// continuations, over a small vocabulary.
    fn synthetic(seed: u128, n: usize) -> Vec<Request> {
        let mut rnd = PyRandom::new(seed);
        let mut tok = |k: u64| rnd.randbelow(k) as Token;
        let shared: Vec<Vec<Token>> = (0..4)
            .map(|_| (0..1 + tok(12)).map(|_| tok(VOCAB as u64)).collect())
            .collect();
        let mut out: Vec<Request> = Vec::new();
        while out.len() < n {
            let mut context = shared[tok(4) as usize].clone();
            context.extend((0..tok(6)).map(|_| tok(VOCAB as u64)));
            for _ in 0..1 + tok(4) {
                let continuation: Vec<Token> = (0..1 + tok(5)).map(|_| tok(4)).collect();
                out.push(Request {
                    context: context.clone(),
                    continuation,
                });
            }
            if tok(5) == 0 {
                let copy = out[tok(out.len() as u64) as usize].clone();
                out.push(copy);
            }
        }
        out
    }

    #[test]
    fn packed_scores_equal_scoring_each_request_alone() {
        for seed in 0..20u128 {
            let requests = synthetic(seed, 40);
            let want = naive(&requests);
            for limits in [
                Limits {
                    max_tokens: 64,
                    max_batch: 7,
                    max_seqs: 3,
                },
                Limits {
                    max_tokens: 40,
                    max_batch: 1,
                    max_seqs: 1,
                },
                Limits {
                    max_tokens: 4096,
                    max_batch: 4096,
                    max_seqs: 256,
                },
                Limits {
                    max_tokens: 30,
                    max_batch: 30,
                    max_seqs: 64,
                },
            ] {
                let (got, _) = run(&requests, limits);
                assert_eq!(got, want, "seed {seed} {limits:?}");
            }
        }
    }

    #[test]
    fn one_round_evaluates_each_distinct_prefix_once() {
        for seed in 0..10u128 {
            let requests = synthetic(seed, 60);
            let limits = Limits {
                max_tokens: 100_000,
                max_batch: 50,
                max_seqs: 10_000,
            };
            let plan = Plan::new(&requests, limits).unwrap();
            assert_eq!(plan.rounds(), 1);
            let (_, sim) = run(&requests, limits);
            assert_eq!(
                sim.decoded_tokens,
                distinct_prefixes(&requests),
                "seed {seed}"
            );
            // Rows: the last context token and every fed continuation token, once per node.
            let round = plan.round(&requests, 0);
            let mut rows: HashSet<Vec<Token>> = HashSet::new();
            for r in &requests {
                let f: Vec<Token> = fed(r).copied().collect();
                for n in r.context.len()..=f.len() {
                    rows.insert(f[..n].to_vec());
                }
            }
            assert_eq!(round.rows(), rows.len());
        }
    }

    #[test]
    fn budgets_are_kept() {
        let requests = synthetic(7, 200);
        for limits in [
            Limits {
                max_tokens: 50,
                max_batch: 16,
                max_seqs: 4,
            },
            Limits {
                max_tokens: 25,
                max_batch: 25,
                max_seqs: 2,
            },
        ] {
            let plan = Plan::new(&requests, limits).unwrap();
            for i in 0..plan.rounds() {
                let round = plan.round(&requests, i);
                assert!(round.tokens() <= limits.max_tokens);
                let seqs = round
                    .decodes
                    .iter()
                    .flat_map(|d| d.entries.iter().map(|e| e.seqs.end))
                    .max()
                    .unwrap();
                assert!(seqs as usize <= limits.max_seqs);
                assert!(round
                    .decodes
                    .iter()
                    .all(|d| d.entries.len() <= limits.max_batch));
            }
            // The simulated context checks the same budgets while scoring.
            run(&requests, limits);
        }
    }

    #[test]
    fn the_harness_requests_pack_and_score_as_alone() {
        let reference = reference();
        let mut tokenize = mini_tokenizer();
        let mut requests = Vec::new();
        for (name, task) in reference["tasks"].as_object().unwrap() {
            let items = items_for(name, task);
            let flat = flatten(tokenize_items(&items, &mut tokenize, 11, 256));
            assert!(flat.ranges.iter().all(Option::is_some));
            requests.extend(flat.requests);
        }
        // Token ids from falcon-mini's 2048-token vocabulary: fold them into the table's.
        let folded: Vec<Request> = requests
            .iter()
            .map(|r| Request {
                context: r.context.iter().map(|&t| t % VOCAB as Token).collect(),
                continuation: r.continuation.iter().map(|&t| t % VOCAB as Token).collect(),
            })
            .collect();
        let want = naive(&folded);
        let limits = Limits {
            max_tokens: 512,
            max_batch: 96,
            max_seqs: 8,
        };
        let (got, sim) = run(&folded, limits);
        assert_eq!(got, want);
        let fed_total: usize = folded.iter().map(fed_len).sum();
        assert!(
            sim.decoded_tokens * 2 < fed_total,
            "{} of {fed_total}",
            sim.decoded_tokens
        );

        // An MMLU item: the four one-token answers share every fed token and one row.
        let mmlu = &reference["tasks"]["mmlu"];
        let items = items_for("mmlu", mmlu);
        let one = flatten(tokenize_items(&items[..1], &mut tokenize, 11, 256)).requests;
        assert_eq!(one.len(), 4);
        let plan = Plan::new(&one, limits).unwrap();
        let round = plan.round(&one, 0);
        assert_eq!(round.tokens(), one[0].context.len());
        assert_eq!(round.rows(), 1);
    }

    #[test]
    fn a_request_longer_than_a_round_is_refused() {
        let r = Request {
            context: vec![1; 10],
            continuation: vec![2; 3],
        };
        let e = Plan::new(
            std::slice::from_ref(&r),
            Limits {
                max_tokens: 11,
                max_batch: 4,
                max_seqs: 1,
            },
        )
        .unwrap_err();
        assert_eq!(
            e,
            PackError::TooLong {
                tokens: 12,
                max_tokens: 11
            }
        );
        assert!(Plan::new(
            &[r],
            Limits {
                max_tokens: 12,
                max_batch: 4,
                max_seqs: 1
            }
        )
        .is_ok());
        assert!(matches!(
            Plan::new(
                &[],
                Limits {
                    max_tokens: 0,
                    max_batch: 4,
                    max_seqs: 1
                }
            ),
            Err(PackError::ZeroLimit(_))
        ));
    }
}
