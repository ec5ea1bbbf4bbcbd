//! The JavaScript form of a JSON document: exactly the bytes `JSON.stringify(JSON.parse(text))`
//! gives. Receivers built from the source systems' guides compute their HMAC over that, not
//! over the bytes on the wire, so Herald sends (and signs) this form. It is computed once, at
//! ingest; the stored payload is then shared unchanged by every attempt (computed again only
//! for a delivery made as sent whose subscription has changed to this form since: see
//! `payload::build`).
//!
//! What JavaScript does, and so what this does: no whitespace; object keys that are array
//! indices (`"0"` … `"4294967294"`) first in ascending order, then the other keys in the order
//! they first appeared; a repeated key keeps its first position and its last value; strings
//! escape `"`, `\`, the control characters (`\b \f \n \r \t`, else lowercase `\u00xx`) and
//! unpaired surrogates, nothing else; numbers as ECMAScript's `Number#toString` prints the
//! double `JSON.parse` reads (`1.0` → `1`, `1e2` → `100`, `1e21` → `1e+21`, `-0` → `0`).
//!
//! One deliberate difference: an integer literal beyond 2^53, which a JavaScript number cannot
//! hold, keeps its digits (JavaScript would round it), so Herald never changes a value. A
//! receiver that re-stringifies such a payload cannot verify its signature.

use bytes::Bytes;

/// Why a document has no JavaScript form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// The text is not JSON.
    #[error("not valid JSON at byte {0}")]
    Syntax(usize),
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// So many nested objects whose keys JavaScript reorders, each around much of the
    /// document, that rearranging them would copy it more than [`REARRANGED_PER_BYTE`] times.
    #[error("too many nested objects whose keys JavaScript reorders (index-like keys such as \"0\" after others)")]
    TooCostly,
    /// A number JavaScript would read as `Infinity` (and `JSON.stringify` print as `null`):
    /// refused rather than silently changed.
    #[error("the number {0} is too large for a double")]
    OutOfRange(String),
}

/// Deepest nesting accepted (the API's JSON parser stops well before this).
pub const MAX_DEPTH: usize = 512;

/// The digits of 2^53: a longer (or larger) integer literal is kept as written.
const EXACT_DIGITS: &[u8] = b"9007199254740992";

/// Bytes rearranged (copied to reorder an object's keys) per byte of the document at most,
/// past a first [`REARRANGED_FREE`]: each reordered object copies what it holds, so nested
/// ones copy the same bytes once per level.
pub const REARRANGED_PER_BYTE: usize = 8;
const REARRANGED_FREE: usize = 1 << 20;

/// Objects with more members than this find repeated keys through a hash map.
const LINEAR_MEMBERS: usize = 16;

/// The JavaScript form of `text` (see the module documentation).
pub fn canonical(text: &[u8]) -> Result<Bytes, CanonicalError> {
    let budget = text.len().saturating_mul(REARRANGED_PER_BYTE).saturating_add(REARRANGED_FREE);
    let mut parser = Parser { s: text, i: 0, depth: 0, rearranged: 0, budget };
    let mut out = Vec::with_capacity(text.len());
    parser.value(&mut out)?;
    parser.whitespace();
    if parser.i != text.len() {
        return Err(CanonicalError::Syntax(parser.i));
    }
    Ok(Bytes::from(out))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
    /// Bytes copied so far to reorder objects' keys, and the most allowed.
    rearranged: usize,
    budget: usize,
}

/// One object member as written to the output: its key's bytes and the whole `"key":value`.
struct Member {
    key: std::ops::Range<usize>,
    text: std::ops::Range<usize>,
}

impl Parser<'_> {
    fn syntax(&self) -> CanonicalError {
        CanonicalError::Syntax(self.i)
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), CanonicalError> {
        self.whitespace();
        if self.peek() != Some(byte) {
            return Err(self.syntax());
        }
        self.i += 1;
        Ok(())
    }

    fn value(&mut self, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
        self.whitespace();
        match self.peek() {
            Some(b'{') => self.nested(out, Self::object),
            Some(b'[') => self.nested(out, Self::array),
            Some(b'"') => self.string(out),
            Some(b'-' | b'0'..=b'9') => self.number(out),
            Some(b't') => self.literal(out, b"true"),
            Some(b'f') => self.literal(out, b"false"),
            Some(b'n') => self.literal(out, b"null"),
            _ => Err(self.syntax()),
        }
    }

    fn nested(
        &mut self,
        out: &mut Vec<u8>,
        body: fn(&mut Self, &mut Vec<u8>) -> Result<(), CanonicalError>,
    ) -> Result<(), CanonicalError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(CanonicalError::TooDeep);
        }
        body(self, out)?;
        self.depth -= 1;
        Ok(())
    }

    fn literal(&mut self, out: &mut Vec<u8>, word: &[u8]) -> Result<(), CanonicalError> {
        if !self.s[self.i..].starts_with(word) {
            return Err(self.syntax());
        }
        self.i += word.len();
        out.extend_from_slice(word);
        Ok(())
    }

    fn array(&mut self, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
        self.i += 1;
        out.push(b'[');
        self.whitespace();
        if self.peek() == Some(b']') {
            self.i += 1;
            out.push(b']');
            return Ok(());
        }
        loop {
            self.value(out)?;
            self.whitespace();
            match self.peek() {
                Some(b',') => out.push(b','),
                Some(b']') => break,
                _ => return Err(self.syntax()),
            }
            self.i += 1;
        }
        self.i += 1;
        out.push(b']');
        Ok(())
    }

    /// Writes members as they come, then rearranges the object's bytes once if a key repeats
    /// or JavaScript orders the keys differently (the common case needs no second copy).
    fn object(&mut self, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
        self.i += 1;
        out.push(b'{');
        let start = out.len();
        let mut members: Vec<Member> = Vec::new();
        let mut index: Option<std::collections::HashMap<Vec<u8>, usize>> = None;
        let mut rearrange = false;
        self.whitespace();
        if self.peek() == Some(b'}') {
            self.i += 1;
            out.push(b'}');
            return Ok(());
        }
        loop {
            self.whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.syntax());
            }
            let text_at = out.len();
            self.string(out)?;
            let key = text_at + 1..out.len() - 1;
            self.expect(b':')?;
            out.push(b':');
            self.value(out)?;
            let member = Member { key, text: text_at..out.len() };
            let seen = match &index {
                Some(map) => map.get(&out[member.key.clone()]).copied(),
                None => members.iter().position(|m| out[m.key.clone()] == out[member.key.clone()]),
            };
            match seen {
                Some(at) => {
                    // JavaScript keeps the first position and the last value.
                    members[at].text = member.text;
                    members[at].key = member.key;
                    rearrange = true;
                }
                None => {
                    let before = members.last().map(|m| order_key(&out[m.key.clone()]));
                    if let (Some(before), now) = (before, order_key(&out[member.key.clone()])) {
                        rearrange |= now < before;
                    }
                    if let Some(map) = &mut index {
                        map.insert(out[member.key.clone()].to_vec(), members.len());
                    }
                    members.push(member);
                    if index.is_none() && members.len() > LINEAR_MEMBERS {
                        index =
                            Some(members.iter().enumerate().map(|(i, m)| (out[m.key.clone()].to_vec(), i)).collect());
                    }
                }
            }
            self.whitespace();
            match self.peek() {
                Some(b',') => out.push(b','),
                Some(b'}') => break,
                _ => return Err(self.syntax()),
            }
            self.i += 1;
        }
        self.i += 1;
        if rearrange {
            self.rearranged = self.rearranged.saturating_add(out.len() - start);
            if self.rearranged > self.budget {
                return Err(CanonicalError::TooCostly);
            }
            let mut order: Vec<usize> = (0..members.len()).collect();
            // A stable sort: array-index keys by value, the rest keep their first position.
            order.sort_by_key(|&m| order_key(&out[members[m].key.clone()]));
            let mut arranged = Vec::with_capacity(out.len() - start);
            for (n, &m) in order.iter().enumerate() {
                if n > 0 {
                    arranged.push(b',');
                }
                arranged.extend_from_slice(&out[members[m].text.clone()]);
            }
            out.truncate(start);
            out.extend_from_slice(&arranged);
        }
        out.push(b'}');
        Ok(())
    }

    fn number(&mut self, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let digits_at = self.i;
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.syntax()),
        }
        let digits_end = self.i;
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.required_digits()?;
            integer = false;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            self.required_digits()?;
            integer = false;
        }
        let literal = &self.s[start..self.i];
        let digits = &self.s[digits_at..digits_end];
        if integer && (digits.len(), digits) > (EXACT_DIGITS.len(), EXACT_DIGITS) {
            // Beyond 2^53: kept as written rather than rounded (see the module documentation).
            out.extend_from_slice(literal);
            return Ok(());
        }
        let text = std::str::from_utf8(literal).expect("a number literal is ASCII");
        let value: f64 = text.parse().map_err(|_| CanonicalError::Syntax(start))?;
        if !value.is_finite() {
            return Err(CanonicalError::OutOfRange(text.to_string()));
        }
        out.extend_from_slice(ryu_js::Buffer::new().format_finite(value).as_bytes());
        Ok(())
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
    }

    fn required_digits(&mut self) -> Result<(), CanonicalError> {
        let at = self.i;
        self.digits();
        if self.i == at {
            return Err(self.syntax());
        }
        Ok(())
    }

    /// Copies a string in `JSON.stringify`'s escaping: runs that need no change are copied as
    /// they are, escapes are decoded and written again the one way JavaScript writes them.
    fn string(&mut self, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
        self.i += 1;
        out.push(b'"');
        loop {
            let run = self.i;
            while matches!(self.peek(), Some(b) if b != b'"' && b != b'\\' && b >= 0x20) {
                self.i += 1;
            }
            out.extend_from_slice(&self.s[run..self.i]);
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    out.push(b'"');
                    return Ok(());
                }
                Some(b'\\') => self.escape(out)?,
                // End of input, or a raw control character (not allowed in JSON strings).
                _ => return Err(self.syntax()),
            }
        }
    }

    fn escape(&mut self, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
        let at = self.i;
        self.i += 1;
        let Some(c) = self.peek() else { return Err(self.syntax()) };
        self.i += 1;
        let unit = match c {
            b'"' | b'\\' | b'/' => u16::from(c),
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => 0x0a,
            b'r' => 0x0d,
            b't' => 0x09,
            b'u' => self.hex4().ok_or(CanonicalError::Syntax(at))?,
            _ => return Err(CanonicalError::Syntax(at)),
        };
        let ch = if (0xd800..0xdc00).contains(&unit) && self.s[self.i..].starts_with(b"\\u") {
            // A high surrogate followed by an escape: a pair makes one character.
            let save = self.i;
            self.i += 2;
            match self.hex4() {
                Some(low) if (0xdc00..0xe000).contains(&low) => {
                    char::from_u32(0x10000 + ((unit as u32 - 0xd800) << 10) + (low as u32 - 0xdc00))
                }
                _ => {
                    self.i = save;
                    None
                }
            }
        } else {
            char::from_u32(unit as u32)
        };
        match ch {
            Some(ch) => write_char(out, ch),
            // An unpaired surrogate: ES2019's JSON.stringify writes it as an escape.
            None => out.extend_from_slice(format!("\\u{unit:04x}").as_bytes()),
        }
        Ok(())
    }

    fn hex4(&mut self) -> Option<u16> {
        let hex = self.s.get(self.i..self.i + 4)?;
        let text = std::str::from_utf8(hex).ok()?;
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.i += 4;
        u16::from_str_radix(text, 16).ok()
    }
}

/// One character as `JSON.stringify` writes it inside a string.
fn write_char(out: &mut Vec<u8>, ch: char) {
    match ch {
        '"' => out.extend_from_slice(b"\\\""),
        '\\' => out.extend_from_slice(b"\\\\"),
        '\u{08}' => out.extend_from_slice(b"\\b"),
        '\u{0c}' => out.extend_from_slice(b"\\f"),
        '\n' => out.extend_from_slice(b"\\n"),
        '\r' => out.extend_from_slice(b"\\r"),
        '\t' => out.extend_from_slice(b"\\t"),
        c if (c as u32) < 0x20 => out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes()),
        c => out.extend_from_slice(c.encode_utf8(&mut [0u8; 4]).as_bytes()),
    }
}

/// Where JavaScript puts a key (given as its canonical string bytes): array indices first, by
/// value; every other key after them, in insertion order (a stable sort keeps that).
fn order_key(key: &[u8]) -> (bool, u32) {
    match array_index(key) {
        Some(n) => (false, n),
        None => (true, 0),
    }
}

/// The array index a key names: a canonical decimal below 2^32 − 1 (`"01"`, `"-1"` and
/// `"4294967295"` are ordinary keys).
fn array_index(key: &[u8]) -> Option<u32> {
    if key.is_empty() || key.len() > 10 || (key.len() > 1 && key[0] == b'0') || !key.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(key).ok()?.parse().ok()?;
    (n < u32::MAX as u64).then_some(n as u32)
}

/// `text` with each unpaired surrogate escape (`"\ud800"` alone) written `\ufffd`: JSON
/// text as JavaScript reads it (and ingest takes) may hold one, a `serde_json::Value` cannot,
/// and a schema judges the replacement alike (one character). Pairs, and everything else,
/// are left as written.
pub fn without_lone_surrogates(text: &[u8]) -> Vec<u8> {
    let hex = |at: usize| -> Option<u16> {
        let digits = text.get(at..at + 4)?;
        digits
            .iter()
            .all(u8::is_ascii_hexdigit)
            .then(|| u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok())?
    };
    let (mut out, mut i, mut in_string) = (Vec::with_capacity(text.len()), 0, false);
    while i < text.len() {
        let b = text[i];
        let taken = match (in_string, b) {
            (false, b'"') | (true, b'"') => {
                in_string = !in_string;
                1
            }
            (true, b'\\') if text.get(i + 1) == Some(&b'u') => match hex(i + 2) {
                Some(high) if (0xd800..0xdc00).contains(&high) => {
                    let low = (text.get(i + 6..i + 8) == Some(b"\\u")).then(|| hex(i + 8)).flatten();
                    if low.is_some_and(|low| (0xdc00..0xe000).contains(&low)) {
                        12
                    } else {
                        out.extend_from_slice(b"\\ufffd");
                        i += 6;
                        continue;
                    }
                }
                Some(low) if (0xdc00..0xe000).contains(&low) => {
                    out.extend_from_slice(b"\\ufffd");
                    i += 6;
                    continue;
                }
                _ => 2,
            },
            (true, b'\\') => 2,
            _ => 1,
        };
        out.extend_from_slice(&text[i..(i + taken).min(text.len())]);
        i += taken;
    }
    out
}

/// A digest of a document in its JavaScript form (what [`canonical`] made) that does not
/// depend on the order of objects' members: a producer's retry re-serialized from a hash map
/// is the same document. Read straight from the bytes — strings and numbers as they stand
/// there, already in one form — so whatever a document holds (an integer past 2^64, a lone
/// surrogate, nesting past a `serde_json::Value`'s 128 levels) counts, nothing is allocated,
/// and its time is linear in its length. `None` for bytes that are not such a form.
pub fn digest(form: &[u8]) -> Option<u64> {
    let mut at = 0;
    let d = Digest { s: form }.value(&mut at)?;
    (at == form.len()).then_some(d)
}

/// Walks a document in its JavaScript form: compact, valid, every key once.
struct Digest<'a> {
    s: &'a [u8],
}

impl Digest<'_> {
    fn hash(parts: impl FnOnce(&mut std::hash::DefaultHasher)) -> u64 {
        use std::hash::Hasher;
        let mut h = std::hash::DefaultHasher::new();
        parts(&mut h);
        h.finish()
    }

    fn value(&self, at: &mut usize) -> Option<u64> {
        use std::hash::Hash;
        match *self.s.get(*at)? {
            b'{' => {
                *at += 1;
                // Each member hashed with its key, and the members summed: the same sum in
                // any order.
                let (mut sum, mut n) = (0u64, 0u64);
                if self.s.get(*at) == Some(&b'}') {
                    *at += 1;
                } else {
                    loop {
                        let key = self.string(at)?;
                        (self.s.get(*at) == Some(&b':')).then_some(())?;
                        *at += 1;
                        let value = self.value(at)?;
                        sum = sum.wrapping_add(Self::hash(|h| (key, value).hash(h)));
                        n += 1;
                        match self.s.get(*at)? {
                            b',' => *at += 1,
                            b'}' => {
                                *at += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
                Some(Self::hash(|h| (b'{', sum, n).hash(h)))
            }
            b'[' => {
                use std::hash::Hasher;
                *at += 1;
                // Items hashed in order as they are read.
                let mut h = std::hash::DefaultHasher::new();
                b'['.hash(&mut h);
                if self.s.get(*at) == Some(&b']') {
                    *at += 1;
                } else {
                    loop {
                        self.value(at)?.hash(&mut h);
                        match self.s.get(*at)? {
                            b',' => *at += 1,
                            b']' => {
                                *at += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
                Some(h.finish())
            }
            b'"' => self.string(at).map(|s| Self::hash(|h| (b'"', s).hash(h))),
            _ => {
                // A number or a literal: up to the next delimiter.
                let start = *at;
                while self.s.get(*at).is_some_and(|b| !matches!(b, b',' | b']' | b'}')) {
                    *at += 1;
                }
                (*at > start).then(|| Self::hash(|h| (b'#', &self.s[start..*at]).hash(h)))
            }
        }
    }

    /// A string's bytes between its quotes (escapes as the form writes them: one way each).
    fn string<'s>(&'s self, at: &mut usize) -> Option<&'s [u8]> {
        (self.s.get(*at) == Some(&b'"')).then_some(())?;
        let start = *at + 1;
        let mut i = start;
        loop {
            match *self.s.get(i)? {
                b'\\' => i += 2,
                b'"' => break,
                _ => i += 1,
            }
        }
        *at = i + 1;
        Some(&self.s[start..i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lone surrogates become U+FFFD, where strings are; pairs, escaped backslashes and
    /// what is outside strings stay as written.
    #[test]
    fn lone_surrogates_are_replaced_and_nothing_else() {
        let cases: [(&str, &str); 6] = [
            (r#"{"s":"\ud800"}"#, r#"{"s":"\ufffd"}"#),
            (r#"["\udc00\ud800x"]"#, r#"["\ufffd\ufffdx"]"#),
            (r#"["\ud83d\ude00"]"#, r#"["\ud83d\ude00"]"#),
            (r#"["\\ud800"]"#, r#"["\\ud800"]"#),
            (r#"["\ud800\u0041"]"#, r#"["\ufffd\u0041"]"#),
            (r#"{"\ud800":1}"#, r#"{"\ufffd":1}"#),
        ];
        for (text, want) in cases {
            let got = without_lone_surrogates(text.as_bytes());
            assert_eq!(String::from_utf8(got).unwrap(), want, "{text}");
            assert!(serde_json::from_str::<serde_json::Value>(want).is_ok(), "{want}");
        }
    }

    fn js(text: &str) -> String {
        String::from_utf8(canonical(text.as_bytes()).unwrap().to_vec()).unwrap()
    }

    #[test]
    fn whitespace_goes_and_compact_documents_stay_byte_for_byte() {
        assert_eq!(js(r#" { "i" : 1 , "a" : [ 1 , 2 ] } "#), r#"{"i":1,"a":[1,2]}"#);
        let compact = r#"{"z":{"y":[true,false,null]},"x":"\u00e9"}"#;
        assert_eq!(js(compact), r#"{"z":{"y":[true,false,null]},"x":"é"}"#);
        assert_eq!(js("[]"), "[]");
        assert_eq!(js("{ }"), "{}");
    }

    #[test]
    fn keys_follow_javascript_property_order() {
        assert_eq!(js(r#"{"b":1,"2":1,"a":1,"1":1,"10":1}"#), r#"{"1":1,"2":1,"10":1,"b":1,"a":1}"#);
        // Not array indices: leading zero, sign, fraction, 2^32 - 1 itself.
        assert_eq!(
            js(r#"{"x":0,"01":0,"-1":0,"1.5":0,"4294967295":0,"4294967294":0}"#),
            r#"{"4294967294":0,"x":0,"01":0,"-1":0,"1.5":0,"4294967295":0}"#
        );
        // A repeated key keeps its first place and its last value.
        assert_eq!(js(r#"{"a":1,"b":2,"a":3}"#), r#"{"a":3,"b":2}"#);
        assert_eq!(js(r#"{"a":1,"a":{"c":1,"c":[2]}}"#), r#"{"a":{"c":[2]}}"#);
        // Escaped and plain spellings of one key are the same key.
        assert_eq!(js(r#"{"a":1,"\u0061":2}"#), r#"{"a":2}"#);
    }

    #[test]
    fn reordering_at_every_level_of_a_deep_document_is_bounded() {
        // Each level's keys reordered (the index-like "0" after "a") copied the whole level
        // again, a megabyte 511 times over: half a gigabyte of copying for one event, on the
        // thread that took the request. Refused past a bounded amount of rearranging.
        let pad = "x".repeat(1_000_000);
        let nested = format!("{}\"{pad}\"{}", "{\"a\":".repeat(511), ",\"0\":0}".repeat(511));
        let started = std::time::Instant::now();
        assert_eq!(canonical(nested.as_bytes()), Err(CanonicalError::TooCostly));
        assert!(started.elapsed() < std::time::Duration::from_millis(500), "{:?}", started.elapsed());
        // What documents do: one reordered object holding a large value, and many small ones.
        assert!(canonical(format!("{{\"a\":\"{pad}\",\"0\":0}}").as_bytes()).is_ok());
        let small: Vec<String> = (0..20_000).map(|i| format!("{{\"b\":{i},\"1\":{{\"c\":1,\"0\":2}}}}")).collect();
        assert!(canonical(format!("[{}]", small.join(",")).as_bytes()).is_ok());
        let three = format!("{}\"{pad}\"{}", "{\"a\":".repeat(3), ",\"0\":0}".repeat(3));
        assert!(canonical(three.as_bytes()).is_ok(), "a few levels of a large value");
    }

    #[test]
    fn many_members_and_repeats_stay_linear() {
        let members: Vec<String> = (0..50_000).map(|i| format!("\"k{}\":{i}", i % 25_000)).collect();
        let text = format!("{{{}}}", members.join(","));
        let out = js(&text);
        assert!(out.starts_with(r#"{"k0":25000,"k1":25001"#), "{}", &out[..40]);
    }

    #[test]
    fn strings_are_escaped_as_json_stringify_does() {
        assert_eq!(js(r#""\/\"\\\b\f\n\r\t""#), r#""/\"\\\b\f\n\r\t""#);
        assert_eq!(js(r#""\u0001\u001F\u007f""#), "\"\\u0001\\u001f\u{7f}\"");
        assert_eq!(js(r#""\u00E9\u2028 \uD83D\uDE00""#), "\"é\u{2028} 😀\"");
        assert_eq!(js("\"é😀\""), "\"é😀\"");
        // An unpaired surrogate stays an escape, in lower case.
        assert_eq!(js(r#""\uD800x\uDC00""#), r#""\ud800x\udc00""#);
    }

    #[test]
    fn numbers_print_as_javascript_numbers() {
        for (given, expected) in [
            ("1.0", "1"),
            ("1e2", "100"),
            ("1E+2", "100"),
            ("-0", "0"),
            ("-0.0", "0"),
            ("0.1", "0.1"),
            ("1.50", "1.5"),
            ("1e21", "1e+21"),
            ("1e20", "100000000000000000000"),
            ("1e-7", "1e-7"),
            ("0.000001", "0.000001"),
            ("123e-20", "1.23e-18"),
            ("5e-324", "5e-324"),
            ("1e-400", "0"),
            ("0.30000000000000004", "0.30000000000000004"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            ("9007199254740992", "9007199254740992"),
            // Integer literals beyond 2^53 keep their digits.
            ("9007199254740993", "9007199254740993"),
            ("-12345678901234567890", "-12345678901234567890"),
        ] {
            assert_eq!(js(given), expected, "{given}");
        }
        assert_eq!(canonical(b"1e400"), Err(CanonicalError::OutOfRange("1e400".into())));
    }

    #[test]
    fn the_digest_ignores_members_order_and_tells_every_other_difference() {
        let d = |text: &str| digest(&canonical(text.as_bytes()).unwrap()).unwrap();
        assert_eq!(d(r#"{"a":1,"b":[2,{"c":3,"d":4}]}"#), d(r#"{"b":[2,{"d":4,"c":3}],"a":1.0}"#));
        let deep = |leaf: &str| format!("{}{leaf}{}", "[".repeat(300), "]".repeat(300));
        for (a, b) in [
            ("123456789012345678901234", "123456789012345678901235"),
            (r#""\ud800""#, r#""\ud801""#),
            (&deep("1"), &deep("2")),
            ("[1,2]", "[2,1]"),
            (r#"{"a":1,"b":2}"#, r#"{"a":2,"b":1}"#),
            (r#"{"a":{"b":1}}"#, r#"{"a":{"c":1}}"#),
            (r#"["a,b"]"#, r#"["a","b"]"#),
            ("{}", "[]"),
            (r#""1""#, "1"),
            ("null", "false"),
            (r#"["a\"b"]"#, r#"["a\\","b"]"#),
            (r#"{"a":[]}"#, r#"{"a":{}}"#),
            ("[[]]", "[[],[]]"),
            ("1e21", "1e22"),
            (r#"{"a\\":"b"}"#, r#"{"a":"\\b"}"#),
        ] {
            assert_ne!(d(a), d(b), "{a} and {b}");
        }
        assert_eq!(d(r#"{"q\"":"\\","n":1e21}"#), d(r#"{"n":10E20,"q\"":"\\"}"#));
        assert_eq!(digest(b"[1,"), None);
        assert_eq!(digest(b"{\"a\":1}x"), None);
    }

    #[test]
    fn broken_documents_are_errors_not_panics() {
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\"}",
            "{\"a\":}",
            "01",
            "1.",
            "1e",
            "-",
            "\"\\x\"",
            "\"\\u12\"",
            "tru",
            "\"a",
            "[1] x",
            "{,}",
            "\"\u{1}\"",
        ] {
            assert!(canonical(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(canonical(deep.as_bytes()), Err(CanonicalError::TooDeep));
    }
}
