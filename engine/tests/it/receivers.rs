//! Receivers written from the source systems' integration guides verify every webhook: random
//! JSON documents, published with the formatting producers really use, are checked by `node`
//! running each guide's snippet (and CryptoJS for Punt Uit's), which is the oracle for both
//! the body bytes and the signatures.

use crate::support::verify::hmac_sha256;
use crate::support::{Receiver, TestHerald, TOKEN};
use base64::Engine;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

/// Random documents published per run.
const DOCUMENTS: usize = 300;

/// One generated document: the text a producer sends.
struct Doc {
    text: String,
}

/// Random JSON as producers write it: nested objects and arrays, array-index and ordinary
/// keys, repeated keys, unicode and control characters in every escape style, numbers of
/// every shape, and whitespace anywhere whitespace may go.
struct Gen {
    rng: StdRng,
}

impl Gen {
    fn ws(&mut self) -> &'static str {
        const SPACES: &[&str] = &["", "", "", " ", "  ", "\n", "\n    ", "\t", "\r\n  "];
        SPACES[self.rng.gen_range(0..SPACES.len())]
    }

    fn value(&mut self, depth: usize, out: &mut String) {
        let pick = if depth >= 4 { self.rng.gen_range(2..7) } else { self.rng.gen_range(0..7) };
        match pick {
            0 => self.object(depth, out),
            1 => self.array(depth, out),
            2 | 3 => self.string(out),
            4 | 5 => self.number(out),
            _ => out.push_str(["true", "false", "null"][self.rng.gen_range(0..3)]),
        }
    }

    fn object(&mut self, depth: usize, out: &mut String) {
        let n = self.rng.gen_range(0..7);
        let mut keys: Vec<String> = Vec::new();
        out.push('{');
        for i in 0..n {
            if i > 0 {
                out.push(',');
            }
            out.push_str(self.ws());
            let key = if !keys.is_empty() && self.rng.gen_bool(0.15) {
                keys[self.rng.gen_range(0..keys.len())].clone() // a repeated key
            } else {
                self.key()
            };
            keys.push(key.clone());
            out.push_str(&key);
            out.push_str(self.ws());
            out.push(':');
            out.push_str(self.ws());
            self.value(depth + 1, out);
            out.push_str(self.ws());
        }
        out.push('}');
    }

    fn key(&mut self) -> String {
        const INDEX_LIKE: &[&str] = &[
            "\"0\"",
            "\"1\"",
            "\"2\"",
            "\"10\"",
            "\"9\"",
            "\"4294967294\"",
            "\"4294967295\"",
            "\"01\"",
            "\"-1\"",
            "\"1.5\"",
            "\"1e3\"",
            "\"\\u0031\"",
        ];
        if self.rng.gen_bool(0.3) {
            return INDEX_LIKE[self.rng.gen_range(0..INDEX_LIKE.len())].to_string();
        }
        let mut s = String::new();
        self.string(&mut s);
        s
    }

    fn array(&mut self, depth: usize, out: &mut String) {
        let n = self.rng.gen_range(0..5);
        out.push('[');
        for i in 0..n {
            if i > 0 {
                out.push(',');
            }
            out.push_str(self.ws());
            self.value(depth + 1, out);
            out.push_str(self.ws());
        }
        out.push(']');
    }

    fn string(&mut self, out: &mut String) {
        const CHARS: &[char] = &[
            'a', 'b', 'z', 'A', '0', ' ', '/', '"', '\\', '\n', '\r', '\t', '\u{8}', '\u{c}', '\u{1}', '\u{1f}',
            '\u{7f}', 'é', 'ß', '中', '文', '😀', '𝄞', '\u{2028}', '\u{2029}', '\u{feff}', '\u{301}', '\u{a0}',
        ];
        out.push('"');
        for _ in 0..self.rng.gen_range(0..10) {
            let c = CHARS[self.rng.gen_range(0..CHARS.len())];
            let style = self.rng.gen_range(0..4);
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '/' if style == 0 => out.push_str("\\/"),
                '\n' if style < 2 => out.push_str("\\n"),
                '\t' if style < 2 => out.push_str("\\t"),
                c if (c as u32) < 0x20 || style == 0 => {
                    // \uXXXX in upper or lower case; characters beyond the BMP as a pair.
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        if self.rng.gen_bool(0.5) {
                            out.push_str(&format!("\\u{unit:04X}"));
                        } else {
                            out.push_str(&format!("\\u{unit:04x}"));
                        }
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    fn number(&mut self, out: &mut String) {
        const SHAPES: &[&str] = &[
            "0",
            "-0",
            "0.0",
            "-0.0",
            "1.0",
            "1.50",
            "1e2",
            "1E+2",
            "1e-2",
            "2.5e-3",
            "1e21",
            "1e20",
            "1e-7",
            "0.000001",
            "123456.789e3",
            "5e-324",
            "1.7976931348623157e308",
            "0.1",
            "0.30000000000000004",
            "9007199254740991",
            "-9007199254740991",
            "100",
            "3.14159",
            "1e-400",
            "12.3400E+03",
        ];
        match self.rng.gen_range(0..4) {
            0 => out.push_str(SHAPES[self.rng.gen_range(0..SHAPES.len())]),
            1 => out.push_str(&self.rng.gen_range(-1_000_000i64..1_000_000).to_string()),
            2 => out.push_str(&format!("{:e}", self.rng.gen::<f64>() * 10f64.powi(self.rng.gen_range(-30..30)))),
            _ => out.push_str(&format!("{}", self.rng.gen_range(-1e6..1e6f64))),
        }
    }

    fn document(&mut self) -> Doc {
        let mut text = String::new();
        text.push_str(self.ws());
        if self.rng.gen_bool(0.8) {
            self.object(0, &mut text);
        } else {
            self.value(0, &mut text);
        }
        text.push_str(self.ws());
        Doc { text }
    }
}

/// The subscriptions under test: each guide's header, encoding and payload, plus one that
/// keeps the producer's bytes untouched.
fn guides() -> Vec<(&'static str, serde_json::Value)> {
    let hmac = |header: &str, encoding: &str| json!({"scheme": "hmac", "header": header, "encoding": encoding});
    vec![
        (
            "opentrack",
            json!({"signature": hmac("X-OpenTrack-Signature", "hex"), "payload": "envelope", "secret": "ot-secret"}),
        ),
        (
            "puntuit",
            json!({"signature": hmac("x-hook-signature", "base64"), "payload": "raw", "secret": "punt uit sécret"}),
        ),
        (
            "packnet",
            json!({"signature": hmac("x-packsize-signature", "base64"), "payload": "envelope", "secret": "pn-key"}),
        ),
        ("automation", json!({"signature": hmac("X-Signature", "base64"), "payload": "raw", "secret": "automation"})),
        ("raw_bytes", json!({"signature": hmac("X-Signature", "base64"), "payload": "raw_bytes", "secret": "as-sent"})),
    ]
}

fn node() -> std::path::PathBuf {
    let found = std::process::Command::new("node").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "node is needed for the receivers' oracle; ./scripts/test installs it (Debian's nodejs)"
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/receivers");
    assert!(
        dir.join("node_modules/crypto-js").exists(),
        "crypto-js is missing: run `npm ci --prefix engine/tests/receivers` (./scripts/test does)"
    );
    dir.join("verify.js")
}

#[tokio::test]
async fn receivers_written_from_the_guides_verify_every_webhook() {
    let verify = node();
    let seed = std::env::var("HERALD_PROPTEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261130u64);
    println!("seed {seed} (set HERALD_PROPTEST_SEED to repeat another run)");
    let mut gen = Gen { rng: StdRng::seed_from_u64(seed) };
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let mut secrets = HashMap::new();
    for (guide, mut body) in guides() {
        body["url"] = rx.url(&format!("/{guide}")).into();
        secrets.insert(format!("/{guide}"), body["secret"].as_str().unwrap().to_string());
        h.api.subscribe(body).await;
    }
    // Publish in batches whose bodies keep each document's formatting as generated.
    let mut docs: HashMap<String, Doc> = HashMap::new();
    for batch in 0..DOCUMENTS / 50 {
        let mut events = Vec::new();
        for i in 0..50 {
            let id = format!("doc-{batch}-{i}");
            let doc = gen.document();
            events.push(format!("{{\"id\":\"{id}\",\"type\":\"guide.check\",{} \"data\" :{}}}", gen.ws(), doc.text));
            docs.insert(id, doc);
        }
        let body = Bytes::from(format!("[{}]", events.join(",\n")));
        let (status, answer) = h.api.raw("POST", "/v1/events/batch", Some(body), Some(TOKEN)).await;
        assert_eq!(status, 202, "{answer}");
    }
    let n = docs.len();
    let mut cases = Vec::new();
    for (guide, body) in guides() {
        let path = format!("/{guide}");
        let got = rx.wait_on(&path, n).await;
        assert_eq!(got.len(), n, "each document once on {path}");
        let header = body["signature"]["header"].as_str().unwrap().to_ascii_lowercase();
        for r in got {
            let doc = &docs[r.header("webhook-id")];
            if guide == "raw_bytes" {
                // The producer's bytes, untouched, signed as they are.
                assert_eq!(std::str::from_utf8(&r.body).unwrap(), doc.text.trim_matches(|c| " \t\r\n".contains(c)));
                let expected =
                    base64::engine::general_purpose::STANDARD.encode(hmac_sha256(secrets[&path].as_bytes(), &r.body));
                assert_eq!(r.header(&header), expected);
                continue;
            }
            cases.push(json!({
                "guide": guide,
                "payload": body["payload"],
                "body": base64::engine::general_purpose::STANDARD.encode(&r.body),
                "signature": r.header(&header),
                "secret": secrets[&path],
                "sent": doc.text,
            }));
        }
    }
    let file = h.dir.path().join("cases.json");
    std::fs::write(&file, serde_json::to_vec(&cases).unwrap()).unwrap();
    let ran = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("node").arg(&verify).arg(&file).output(),
    )
    .await
    .expect("node finished within 60 s")
    .expect("node runs");
    let said = String::from_utf8_lossy(&ran.stdout);
    assert!(ran.status.success(), "the guides' receivers rejected webhooks:\n{said}");
    assert_eq!(said.trim(), format!("verified {}", cases.len()));
    println!("{n} random documents, {} webhooks verified by node", cases.len());
}

#[tokio::test]
async fn an_integer_beyond_two_to_the_53_keeps_its_digits() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    h.api
        .subscribe(json!({"url": rx.url("/big"), "payload": "raw",
                          "signature": {"scheme": "hmac", "header": "X-Signature"}, "secret": "s"}))
        .await;
    let body = Bytes::from_static(br#"{"type":"t","data":{ "id" : 12345678901234567890, "n": 1.0 }}"#);
    let (status, answer) = h.api.raw("POST", "/v1/events", Some(body), Some(TOKEN)).await;
    assert_eq!(status, 202, "{answer}");
    let got = rx.wait_on("/big", 1).await;
    assert_eq!(&got[0].body[..], br#"{"id":12345678901234567890,"n":1}"#);
    // A number JavaScript would read as Infinity is refused, naming the field, not changed.
    let body = Bytes::from_static(br#"{"type":"t","data":{"x":1e400}}"#);
    let (status, answer) = h.api.raw("POST", "/v1/events", Some(body), Some(TOKEN)).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["field"], "data");
}

#[tokio::test]
async fn the_automation_apis_webhook_section_is_a_static_webhook() {
    let rx = Receiver::start().await;
    let section: herald::config::AutomationWebHook = serde_json::from_value(json!({
        "enabled": true, "endpoint": rx.url("/notify"), "key": "erp-key", "connectionTimeout": 5000,
        "secret": "shared-secret", "useSslTrustAll": false
    }))
    .unwrap();
    let h = TestHerald::start_with(|c| c.web_hook = Some(section)).await;
    let (status, sub) = h.api.get("/v1/subscriptions/static-webHook").await;
    assert_eq!(status, 200, "{sub}");
    assert_eq!(sub["timeout"], "5s");
    let body = Bytes::from_static(br#"{"type":"Imported","data":{"a" : [1.0, 2]}}"#);
    let (status, answer) = h.api.raw("POST", "/v1/events", Some(body), Some(TOKEN)).await;
    assert_eq!(status, 202, "{answer}");
    let got = rx.wait_on("/notify", 1).await;
    assert_eq!(got[0].query.as_deref(), Some("key=erp-key"));
    assert_eq!(&got[0].body[..], br#"{"a":[1,2]}"#);
    let expected = base64::engine::general_purpose::STANDARD.encode(hmac_sha256(b"shared-secret", &got[0].body));
    assert_eq!(got[0].header("x-signature"), expected);
}
