//! Token bytes → text, one token at a time: whole UTF-8 characters only, special tokens kept out
//! of the output, and stop strings found and held back across token boundaries.
//!
//! The batching loop runs one [`Detokenizer`] per sequence and puts its [`Piece`]s into the
//! [`GeneratedToken`](super::queue::GeneratedToken)s it sends; a stop reported by
//! [`Detokenizer::push`] ends the sequence with
//! [`FinishReason::StopSequence`](super::queue::FinishReason).

/// Incremental decoder of one sequence's tokens.
#[derive(Debug, Default)]
pub struct Detokenizer {
    /// Bytes of a UTF-8 character split across tokens.
    pending: Vec<u8>,
    /// Output not yet released: the longest tail that may still begin a stop string.
    held: String,
    stops: Vec<String>,
    stopped: bool,
}

/// What one token adds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Piece {
    /// Whole characters completed by this token (special tokens as their text).
    pub text: String,
    /// Output released by this token: no special token's text, nothing of a stop string.
    pub output: String,
    /// The stop string the output now contains, if any (the sequence is over).
    pub stop: Option<String>,
}

impl Detokenizer {
    /// A decoder that stops at any of `stops` (empty strings are ignored).
    #[must_use]
    pub fn new(stops: Vec<String>) -> Detokenizer {
        Detokenizer {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Detokenizer::default()
        }
    }

    /// Adds a token's bytes.
    pub fn push(&mut self, bytes: &[u8], special: bool) -> Piece {
        let mut piece = Piece::default();
        if special {
            // A special token is text of its own: whatever was pending is cut off before it.
            let flushed = lossy(&std::mem::take(&mut self.pending));
            piece.text = flushed.clone() + &String::from_utf8_lossy(bytes);
            self.add_output(&flushed, &mut piece);
        } else {
            self.pending.extend_from_slice(bytes);
            piece.text = take_whole_chars(&mut self.pending);
            let text = piece.text.clone();
            self.add_output(&text, &mut piece);
        }
        piece
    }

    /// The end of the sequence: `(text_tail, output_tail)`, what is still pending or held back.
    pub fn finish(&mut self) -> (String, String) {
        let text_tail = lossy(&std::mem::take(&mut self.pending));
        if self.stopped {
            return (text_tail, String::new());
        }
        let mut output = std::mem::take(&mut self.held);
        output.push_str(&text_tail);
        (text_tail, output)
    }

    fn add_output(&mut self, text: &str, piece: &mut Piece) {
        if self.stopped || text.is_empty() {
            return;
        }
        self.held.push_str(text);
        // The earliest complete stop string wins.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|&(at, s)| (at, std::cmp::Reverse(s.len())));
        if let Some((at, stop)) = found {
            piece.output.push_str(&self.held[..at]);
            piece.stop = Some(stop.clone());
            self.held.clear();
            self.stopped = true;
            return;
        }
        // Release all but the longest tail that some stop string begins with.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        piece.output.push_str(&self.held[..keep]);
        self.held.drain(..keep);
    }
}

/// Decodes the whole characters at the start of `bytes` and removes them; invalid bytes become
/// U+FFFD; a character still incomplete at the end stays in `bytes`.
fn take_whole_chars(bytes: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&bytes[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = bytes.len();
                break;
            }
            Err(e) => {
                let valid = start + e.valid_up_to();
                // `from_utf8` has just found these bytes valid.
                out.push_str(std::str::from_utf8(&bytes[start..valid]).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        start = valid + n;
                    }
                    None => {
                        start = valid;
                        break;
                    }
                }
            }
        }
    }
    bytes.drain(..start);
    out
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `tokens` and returns (pieces, text tail, output tail).
    fn run(stops: &[&str], tokens: &[(&[u8], bool)]) -> (Vec<Piece>, String, String) {
        let mut d = Detokenizer::new(stops.iter().map(|s| s.to_string()).collect());
        let mut pieces = Vec::new();
        for (bytes, special) in tokens {
            let p = d.push(bytes, *special);
            let stop = p.stop.is_some();
            pieces.push(p);
            if stop {
                break;
            }
        }
        let (t, o) = d.finish();
        (pieces, t, o)
    }

    fn outputs(pieces: &[Piece]) -> Vec<&str> {
        pieces.iter().map(|p| p.output.as_str()).collect()
    }

    #[test]
    fn split_utf8_character_is_emitted_whole() {
        // "é" = C3 A9, "🦅" = F0 9F A6 85
        let (p, t, o) = run(
            &[],
            &[
                (b"caf\xc3", false),
                (b"\xa9 ", false),
                (b"\xf0\x9f", false),
                (b"\xa6", false),
                (b"\x85!", false),
            ],
        );
        let texts: Vec<&str> = p.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(texts, ["caf", "é ", "", "", "🦅!"]);
        assert_eq!(outputs(&p), texts);
        assert_eq!((t.as_str(), o.as_str()), ("", ""));
    }

    #[test]
    fn invalid_and_unfinished_bytes_become_replacement_characters() {
        let (p, t, o) = run(&[], &[(b"a\xffb", false), (b"c\xe2\x82", false)]);
        assert_eq!(p[0].text, "a\u{fffd}b");
        assert_eq!(p[1].text, "c");
        assert_eq!(t, "\u{fffd}");
        assert_eq!(o, "\u{fffd}");
    }

    #[test]
    fn special_tokens_are_text_but_not_output() {
        let (p, _, o) = run(&[], &[(b"Hi", false), (b"<|endoftext|>", true)]);
        assert_eq!(p[1].text, "<|endoftext|>");
        assert_eq!(outputs(&p), ["Hi", ""]);
        assert_eq!(o, "");
    }

    #[test]
    fn stop_string_across_tokens_is_held_back_and_cut() {
        let (p, t, o) = run(
            &["\nUser:"],
            &[
                (b"Paris.", false),
                (b"\n", false),
                (b"Us", false),
                (b"er", false),
                (b": more", false),
                (b"never", false),
            ],
        );
        assert_eq!(outputs(&p), ["Paris.", "", "", "", ""]);
        assert_eq!(p.last().unwrap().stop.as_deref(), Some("\nUser:"));
        assert_eq!(p.len(), 5, "no token after the stop");
        assert_eq!((t.as_str(), o.as_str()), ("", ""));
        // The raw text keeps everything, as TGI's does.
        let text: String = p.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(text, "Paris.\nUser: more");
    }

    #[test]
    fn false_start_of_a_stop_string_is_released() {
        let (p, _, o) = run(&["\nUser:"], &[(b"a\nUs", false), (b"ually b", false)]);
        assert_eq!(outputs(&p), ["a", "\nUsually b"]);
        assert_eq!(o, "");
        // Held back at the end of the sequence: released by finish().
        let (p, _, o) = run(&["\nUser:"], &[(b"a\nUs", false)]);
        assert_eq!(outputs(&p), ["a"]);
        assert_eq!(o, "\nUs");
    }

    #[test]
    fn text_before_a_stop_in_the_same_token_is_released() {
        let (p, _, _) = run(&["###", "\n\n"], &[(b"ab", false), (b"c\n\nd###", false)]);
        assert_eq!(outputs(&p), ["ab", "c"]);
        assert_eq!(p[1].stop.as_deref(), Some("\n\n"));
    }

    #[test]
    fn earliest_stop_wins_and_overlapping_prefixes_are_handled() {
        // "aab" contains "ab" starting at 1; "aa" is a prefix of "aab" only.
        let (p, _, _) = run(
            &["aab", "b"],
            &[(b"xa", false), (b"a", false), (b"b", false)],
        );
        assert_eq!(outputs(&p), ["x", "", ""]);
        assert_eq!(p[2].stop.as_deref(), Some("aab"));
    }

    #[test]
    fn multibyte_stop_strings_cut_on_character_boundaries() {
        let (p, _, _) = run(
            &["—end"],
            &[(b"ok \xe2\x80", false), (b"\x94en", false), (b"d", false)],
        );
        assert_eq!(outputs(&p), ["ok ", "", ""]);
        assert_eq!(p[2].stop.as_deref(), Some("—end"));
    }

    #[test]
    fn special_token_text_never_matches_a_stop_string() {
        let (p, _, o) = run(
            &["<|endoftext|>"],
            &[(b"a", false), (b"<|endoftext|>", true)],
        );
        assert!(p.iter().all(|p| p.stop.is_none()));
        assert_eq!(o, "");
    }
}
