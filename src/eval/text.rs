//! The Python string operations that lm-evaluation-harness's prompts are made with, with
//! Python's semantics where they differ from Rust's: `str.isspace` (and so `strip`,
//! `rstrip`), `str.capitalize` (titlecase, not uppercase, for the first character), and
//! HellaSwag's `preprocess`. Lengths are in code points, as Python's `len`.

/// `c.isspace()`: Unicode White_Space plus the four information separators U+001C..U+001F
/// that Python counts as whitespace (bidirectional class B or S) and Rust does not.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `s.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// `s.rstrip()`.
pub fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(is_py_space)
}

/// `len(s)`: code points.
pub fn py_len(s: &str) -> usize {
    s.chars().count()
}

/// The titlecase mapping of `c` (Python's `str.capitalize` of a one-character string),
/// where it differs from the uppercase mapping; `None` where they agree.
fn titlecase_exception(c: char) -> Option<&'static str> {
    Some(match c {
        'ß' => "Ss",
        '\u{1c4}'..='\u{1c6}' => "\u{1c5}",
        '\u{1c7}'..='\u{1c9}' => "\u{1c8}",
        '\u{1ca}'..='\u{1cc}' => "\u{1cb}",
        '\u{1f1}'..='\u{1f3}' => "\u{1f2}",
        '\u{587}' => "\u{535}\u{582}",
        '\u{fb00}' => "Ff",
        '\u{fb01}' => "Fi",
        '\u{fb02}' => "Fl",
        '\u{fb03}' => "Ffi",
        '\u{fb04}' => "Ffl",
        '\u{fb05}' | '\u{fb06}' => "St",
        '\u{fb13}' => "\u{544}\u{576}",
        '\u{fb14}' => "\u{544}\u{565}",
        '\u{fb15}' => "\u{544}\u{56b}",
        '\u{fb16}' => "\u{54e}\u{576}",
        '\u{fb17}' => "\u{544}\u{56d}",
        '\u{1fb2}' => "\u{1fba}\u{345}",
        '\u{1fb4}' => "\u{386}\u{345}",
        '\u{1fb7}' => "\u{391}\u{342}\u{345}",
        '\u{1fc2}' => "\u{1fca}\u{345}",
        '\u{1fc4}' => "\u{389}\u{345}",
        '\u{1fc7}' => "\u{397}\u{342}\u{345}",
        '\u{1ff2}' => "\u{1ffa}\u{345}",
        '\u{1ff4}' => "\u{38f}\u{345}",
        '\u{1ff7}' => "\u{3a9}\u{342}\u{345}",
        _ => return None,
    })
}

/// The titlecase of `c` as one character, for the mappings that are one character.
fn titlecase_char(c: char) -> Option<char> {
    let u = c as u32;
    let t = match u {
        // Georgian Mkhedruli: titlecase is the letter itself (uppercase is Mtavruli).
        0x10d0..=0x10fa | 0x10fd..=0x10ff => u,
        // Greek with ypogegrammeni: the prosgegrammeni forms.
        0x1f80..=0x1faf => u | 0x8,
        0x1fb3 | 0x1fbc => 0x1fbc,
        0x1fc3 | 0x1fcc => 0x1fcc,
        0x1ff3 | 0x1ffc => 0x1ffc,
        _ => return None,
    };
    char::from_u32(t)
}

/// `s.capitalize()` (Python 3.8 and later): the first character in titlecase, the rest in
/// lowercase (with Greek final sigma decided in the context of the whole string).
pub fn py_capitalize(s: &str) -> String {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return String::new();
    };
    let mut out = String::with_capacity(s.len());
    if let Some(t) = titlecase_exception(first) {
        out.push_str(t);
    } else if let Some(t) = titlecase_char(first) {
        out.push(t);
    } else {
        out.extend(first.to_uppercase());
    }
    // Lowercase the whole string so that a final sigma sees the first character, then drop
    // the first character's lowercase (its length does not depend on the context).
    let lower = s.to_lowercase();
    let first_lower: usize = first.to_lowercase().map(char::len_utf8).sum();
    out.push_str(&lower[first_lower..]);
    out
}

/// HellaSwag's `preprocess` in lm-evaluation-harness: strip, `" [title]"` → `". "`, remove
/// every `[...]` that closes on the same line (`re.sub("\\[.*?\\]", "", text)`), then
/// replace each pair of spaces by one space (`text.replace("  ", " ")`, left to right, not
/// repeated).
pub fn hellaswag_preprocess(text: &str) -> String {
    let text = py_strip(text).replace(" [title]", ". ");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        // `.` does not match a newline: the bracket must close before the next one.
        match after.find([']', '\n']) {
            Some(close) if after.as_bytes()[close] == b']' => rest = &after[close + 1..],
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn reference() -> Value {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/eval/python.json");
        let text = std::fs::read_to_string(&path).expect("tests/data/eval/python.json");
        serde_json::from_str::<Value>(&text).unwrap()["text"].clone()
    }

    #[test]
    fn isspace_is_pythons_for_every_code_point() {
        let want: std::collections::BTreeSet<u32> = reference()["isspace"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got: std::collections::BTreeSet<u32> = (0..=0x10ffffu32)
            .filter_map(char::from_u32)
            .filter(|&c| is_py_space(c))
            .map(|c| c as u32)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn strip_and_rstrip_are_pythons() {
        for case in reference()["strip"].as_array().unwrap() {
            let s = case["s"].as_str().unwrap();
            assert_eq!(py_strip(s), case["strip"].as_str().unwrap(), "{s:?}");
            assert_eq!(py_rstrip(s), case["rstrip"].as_str().unwrap(), "{s:?}");
        }
    }

    #[test]
    fn titlecase_differs_from_uppercase_exactly_where_python_says() {
        let cases = reference()["titlecase_not_upper"]
            .as_array()
            .unwrap()
            .clone();
        assert!(cases.len() > 100);
        for case in &cases {
            let c = char::from_u32(case["c"].as_u64().unwrap() as u32).unwrap();
            assert_eq!(
                py_capitalize(&c.to_string()),
                case["title"].as_str().unwrap(),
                "U+{:04X}",
                c as u32
            );
        }
        // Everywhere else (in the Basic Multilingual Plane) titlecase is uppercase.
        let listed: std::collections::BTreeSet<u64> =
            cases.iter().map(|c| c["c"].as_u64().unwrap()).collect();
        for c in (0..=0xffffu32).filter_map(char::from_u32) {
            if !listed.contains(&u64::from(c as u32)) {
                assert!(
                    titlecase_exception(c).is_none() && titlecase_char(c).is_none(),
                    "U+{:04X}",
                    c as u32
                );
            }
        }
    }

    #[test]
    fn capitalize_is_pythons() {
        for case in reference()["capitalize"].as_array().unwrap() {
            let s = case["s"].as_str().unwrap();
            assert_eq!(
                py_capitalize(s),
                case["capitalize"].as_str().unwrap(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn hellaswag_preprocess_follows_the_regex() {
        assert_eq!(
            hellaswag_preprocess("  How to bake [title] Take flour [step] and water.  "),
            "How to bake. Take flour and water."
        );
        assert_eq!(hellaswag_preprocess("a [b\nc] d [e] f"), "a [b\nc] d f");
        assert_eq!(hellaswag_preprocess("x [unclosed"), "x [unclosed");
        assert_eq!(hellaswag_preprocess("a   b"), "a  b");
        assert_eq!(hellaswag_preprocess("[a][b]c"), "c");
        assert_eq!(hellaswag_preprocess("[[a]]"), "]");
    }
}
