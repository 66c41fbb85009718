//! CPython's `random.Random`, the parts lm-evaluation-harness draws few-shot examples with:
//! the Mersenne Twister (MT19937) seeded from an integer, `getrandbits`, `random`,
//! `_randbelow`, `shuffle` and `sample`.
//!
//! The same seed gives the same numbers as CPython (`Modules/_randommodule.c` and
//! `Lib/random.py`, unchanged in these parts from Python 3.2 to 3.13), so the harness's
//! `random.Random(42)`, its shuffle of the evaluation documents and its draws of few-shot
//! examples can be reproduced exactly. The expected values in the tests were printed by
//! CPython (`models/make_python_reference.py` → `tests/data/eval/python.json`).
//!
//! ```
//! use falcon::eval::pyrandom::PyRandom;
//! let mut rnd = PyRandom::new(42);
//! let mut docs: Vec<usize> = (0..10).collect();
//! rnd.shuffle(&mut docs);                  // random.Random(42).shuffle(docs)
//! let shots = rnd.sample(&docs, 3);        // then rnd.sample(docs, 3)
//! assert_eq!(shots.len(), 3);
//! ```

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// CPython's `random.Random`: an MT19937 generator and the methods built on it.
#[derive(Clone)]
pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

impl std::fmt::Debug for PyRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyRandom")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl PyRandom {
    /// `random.Random(seed)` for a non-negative integer seed that fits in 128 bits.
    pub fn new(seed: u128) -> Self {
        // random_seed(): the absolute value of the int, as 32-bit words, least significant
        // first; at least one word (zero seeds as [0]).
        let mut key = Vec::new();
        let mut n = seed;
        while n != 0 {
            key.push(n as u32);
            n >>= 32;
        }
        if key.is_empty() {
            key.push(0);
        }
        let mut r = Self {
            mt: [0; N],
            index: N,
        };
        r.init_by_array(&key);
        r
    }

    /// `random.Random(seed)` for any `i64`: CPython seeds with the absolute value.
    pub fn from_i64(seed: i64) -> Self {
        Self::new(u128::from(seed.unsigned_abs()))
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..N {
            let prev = self.mt[i - 1];
            self.mt[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19_650_218);
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
        }
        self.mt[0] = 0x8000_0000;
    }

    fn twist(&mut self) {
        let mag = |y: u32| if y & 1 == 0 { 0 } else { MATRIX_A };
        for kk in 0..N {
            let y = (self.mt[kk] & UPPER_MASK) | (self.mt[(kk + 1) % N] & LOWER_MASK);
            self.mt[kk] = self.mt[(kk + M) % N] ^ (y >> 1) ^ mag(y);
        }
        self.index = 0;
    }

    /// The next 32-bit output (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `getrandbits(k)` for `k <= 64`: the top `k` bits of one word, or for `k > 32` one
    /// word per 32 bits, least significant word first, the last one keeping its top bits.
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        assert!(k <= 64, "getrandbits({k}): at most 64 bits here");
        if k == 0 {
            return 0;
        }
        if k <= 32 {
            return u64::from(self.next_u32() >> (32 - k));
        }
        let low = u64::from(self.next_u32());
        let high = u64::from(self.next_u32() >> (64 - k));
        low | (high << 32)
    }

    /// `random()`: a float in [0, 1) with 53 random bits.
    pub fn random(&mut self) -> f64 {
        let a = self.next_u32() >> 5;
        let b = self.next_u32() >> 6;
        (f64::from(a) * 67_108_864.0 + f64::from(b)) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `_randbelow(n)` (`_randbelow_with_getrandbits`): a uniform integer in [0, n) by
    /// rejection sampling of `n.bit_length()` bits. `n` must be positive.
    pub fn randbelow(&mut self, n: u64) -> u64 {
        assert!(n > 0, "randbelow(0)");
        let k = 64 - n.leading_zeros();
        let mut r = self.getrandbits(k);
        while r >= n {
            r = self.getrandbits(k);
        }
        r
    }

    /// `shuffle(x)`: Fisher–Yates from the end, as CPython does it.
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.randbelow(i as u64 + 1) as usize;
            x.swap(i, j);
        }
    }

    /// The indices `sample(range(n), k)` returns, in order. Panics if `k > n` (CPython
    /// raises `ValueError`).
    pub fn sample_indices(&mut self, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n, "sample larger than population ({k} > {n})");
        let mut result = Vec::with_capacity(k);
        // The size of a small set minus that of an empty list; for k > 5 the table size of
        // a bigger set: 4 ** ceil(log(3k, 4)) (math.log(x, base) is log(x) / log(base)).
        let mut setsize = 21usize;
        if k > 5 {
            let exponent = (((k * 3) as f64).ln() / 4f64.ln()).ceil() as u32;
            setsize += 4usize.pow(exponent);
        }
        if n <= setsize {
            // An n-length list is smaller than a k-length set: draw from a pool.
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.randbelow((n - i) as u64) as usize;
                result.push(pool[j]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = std::collections::HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.randbelow(n as u64) as usize;
                while selected.contains(&j) {
                    j = self.randbelow(n as u64) as usize;
                }
                selected.insert(j);
                result.push(j);
            }
        }
        result
    }

    /// `sample(population, k)`: `k` distinct elements in selection order.
    pub fn sample<T: Clone>(&mut self, population: &[T], k: usize) -> Vec<T> {
        self.sample_indices(population.len(), k)
            .into_iter()
            .map(|i| population[i].clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn reference() -> Value {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/eval/python.json");
        let text = std::fs::read_to_string(&path).expect("tests/data/eval/python.json");
        serde_json::from_str::<Value>(&text).unwrap()["random"].clone()
    }

    fn usizes(v: &Value) -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    }

    fn seed(v: &Value) -> PyRandom {
        let s = v
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string());
        match s.strip_prefix('-') {
            Some(abs) => PyRandom::from_i64(-abs.parse::<i64>().unwrap()),
            None => PyRandom::new(s.parse().unwrap()),
        }
    }

    #[test]
    fn first_words_match_cpython_for_every_seed_width() {
        let r = reference();
        let cases = r["first_words"].as_array().unwrap();
        assert!(cases.len() >= 8);
        for case in cases {
            let mut rnd = seed(&case["seed"]);
            let got: Vec<u64> = (0..8).map(|_| u64::from(rnd.next_u32())).collect();
            let want: Vec<u64> = case["words"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w.as_u64().unwrap())
                .collect();
            assert_eq!(got, want, "seed {}", case["seed"]);
        }
    }

    #[test]
    fn getrandbits_random_and_randbelow_match_cpython() {
        let r = reference();
        let mut rnd = PyRandom::new(42);
        for case in r["getrandbits_seed42"].as_array().unwrap() {
            let k = case["k"].as_u64().unwrap() as u32;
            let want: u64 = case["value"].as_str().unwrap().parse().unwrap();
            assert_eq!(rnd.getrandbits(k), want, "getrandbits({k})");
        }
        let mut rnd = PyRandom::new(42);
        for want in r["random_seed42"].as_array().unwrap() {
            let got = rnd.random();
            assert_eq!(crate::eval::hexfloat::format(got), want.as_str().unwrap());
        }
        let mut rnd = PyRandom::new(7);
        for case in r["randbelow_seed7"].as_array().unwrap() {
            let n = case["n"].as_u64().unwrap();
            assert_eq!(
                rnd.randbelow(n),
                case["value"].as_u64().unwrap(),
                "randbelow({n})"
            );
        }
    }

    #[test]
    fn shuffle_matches_cpython() {
        for case in reference()["shuffle"].as_array().unwrap() {
            let n = case["n"].as_u64().unwrap() as usize;
            let mut x: Vec<usize> = (0..n).collect();
            PyRandom::new(u128::from(case["seed"].as_u64().unwrap())).shuffle(&mut x);
            assert_eq!(x, usizes(&case["permutation"]), "shuffle of {n}");
        }
    }

    #[test]
    fn sample_matches_cpython_in_both_branches() {
        let cases = reference()["sample"].as_array().unwrap().clone();
        for case in &cases {
            let (n, k) = (
                case["n"].as_u64().unwrap() as usize,
                case["k"].as_u64().unwrap() as usize,
            );
            let mut rnd = PyRandom::new(u128::from(case["seed"].as_u64().unwrap()));
            let population: Vec<usize> = (0..n).collect();
            assert_eq!(
                rnd.sample(&population, k),
                usizes(&case["sample"]),
                "sample(range({n}), {k})"
            );
        }
        // The cases cross the pool/set boundary for k <= 5 (21) and for k = 6 (85), 25 (277).
        let has = |n: usize, k: usize| {
            cases
                .iter()
                .any(|c| c["n"].as_u64() == Some(n as u64) && c["k"].as_u64() == Some(k as u64))
        };
        assert!(
            has(21, 3) && has(22, 3) && has(85, 6) && has(86, 6) && has(277, 25) && has(278, 25)
        );
    }

    #[test]
    fn one_generator_through_a_shuffle_and_many_draws_matches_cpython() {
        let s = &reference()["harness_stream"];
        let mut rnd = PyRandom::new(42);
        let mut docs: Vec<usize> = (0..12).collect();
        rnd.shuffle(&mut docs);
        assert_eq!(docs, usizes(&s["shuffled"]));
        for want in s["draws"].as_array().unwrap() {
            assert_eq!(rnd.sample_indices(1119, 25), usizes(want));
        }
        for want in s["same_split_draws"].as_array().unwrap() {
            assert_eq!(rnd.sample_indices(12, 4), usizes(want));
        }
    }

    #[test]
    #[should_panic(expected = "sample larger than population")]
    fn sample_larger_than_population_panics_as_cpython_raises() {
        PyRandom::new(1).sample_indices(3, 4);
    }
}
