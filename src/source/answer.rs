//! Strict parsing of the entropy API's answers.
//!
//! A bad answer is rejected whole: none of its bytes reaches the pool. Error messages describe
//! the shape that was wrong and where, never the content, because the content is entropy.

use std::borrow::Cow;

use base64::Engine as _;
use serde::Deserialize;
use zeroize::Zeroize;

use super::Dialect;
use crate::secret::EntropyBytes;

/// Why an answer with status 200 was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnswerError {
    #[error("the answer is not valid JSON ({0})")]
    NotJson(String),
    #[error(
        "the answer's JSON does not have the expected shape {expected} (line {line}, column {column})"
    )]
    WrongShape {
        expected: &'static str,
        line: usize,
        column: usize,
    },
    #[error("the answer has no `{0}` field")]
    MissingField(&'static str),
    #[error("the answer holds {got} blocks where {asked} were asked for")]
    WrongCount { asked: usize, got: usize },
    #[error("the answer's `size` field says {got} where {asked} KiB were asked for")]
    WrongSize { asked: usize, got: u64 },
    #[error("block {index} of the answer is not valid base64")]
    BadBase64 { index: usize },
    #[error(
        "block {index} decoded to {got} bytes where {asked} were asked for \
         (if the server counts block sizes in another unit, check source.dialect and \
         source.block_unit)"
    )]
    WrongBlockLength {
        index: usize,
        asked: usize,
        got: usize,
    },
}

/// `GET /api/v1/quantum-entropy`: `{"random": [...], "size": K}`.
#[derive(Deserialize)]
struct QuantumEntropyAnswer<'a> {
    #[serde(borrow, default)]
    random: Option<Vec<Cow<'a, str>>>,
    #[serde(default)]
    size: Option<u64>,
}

/// `POST /api/v1/entropy`: `{"entropy": [...]}`.
#[derive(Deserialize)]
struct EntropyAnswer<'a> {
    #[serde(borrow, default)]
    entropy: Option<Vec<Cow<'a, str>>>,
}

/// Parses a 200 answer of `dialect` that should hold `blocks` blocks of `block_len` bytes
/// each, and decodes them, in order, into one buffer of `blocks * block_len` bytes.
pub fn parse(
    dialect: Dialect,
    body: &[u8],
    blocks: usize,
    block_len: usize,
) -> Result<EntropyBytes, AnswerError> {
    let mut strings = match dialect {
        Dialect::QuantumEntropy => {
            let answer: QuantumEntropyAnswer = serde_json::from_slice(body)
                .map_err(|e| json_error(e, r#"{"random": ["<base64>", ...], "size": K}"#))?;
            let random = answer.random.ok_or(AnswerError::MissingField("random"))?;
            let size = answer.size.ok_or(AnswerError::MissingField("size"))?;
            if size != blocks as u64 {
                wipe(random);
                return Err(AnswerError::WrongSize {
                    asked: blocks,
                    got: size,
                });
            }
            random
        }
        Dialect::Entropy => {
            let answer: EntropyAnswer = serde_json::from_slice(body)
                .map_err(|e| json_error(e, r#"{"entropy": ["<base64>", ...]}"#))?;
            answer.entropy.ok_or(AnswerError::MissingField("entropy"))?
        }
    };
    let result = decode_all(&strings, blocks, block_len);
    wipe(std::mem::take(&mut strings));
    result
}

fn decode_all(
    strings: &[Cow<'_, str>],
    blocks: usize,
    block_len: usize,
) -> Result<EntropyBytes, AnswerError> {
    if strings.len() != blocks {
        return Err(AnswerError::WrongCount {
            asked: blocks,
            got: strings.len(),
        });
    }
    let engine = &base64::engine::general_purpose::STANDARD;
    let expected_text = base64::encoded_len(block_len, true);
    // Three bytes of slack: the decoder wants room for its estimate past the last block.
    let total = blocks * block_len;
    let mut out = EntropyBytes::zeroed(total + 3);
    for (index, text) in strings.iter().enumerate() {
        if Some(text.len()) != expected_text {
            return Err(measure(text, index, block_len));
        }
        let written = engine
            .decode_slice(text.as_bytes(), &mut out.expose_mut()[index * block_len..])
            .map_err(|_| AnswerError::BadBase64 { index })?;
        if written != block_len {
            return Err(AnswerError::WrongBlockLength {
                index,
                asked: block_len,
                got: written,
            });
        }
    }
    out.truncate(total);
    Ok(out)
}

/// The error for a block whose text has the wrong length: decoded apart, to say how long it is.
fn measure(text: &str, index: usize, block_len: usize) -> AnswerError {
    let mut scratch = EntropyBytes::zeroed(base64::decoded_len_estimate(text.len()));
    match base64::engine::general_purpose::STANDARD
        .decode_slice(text.as_bytes(), scratch.expose_mut())
    {
        Ok(got) => AnswerError::WrongBlockLength {
            index,
            asked: block_len,
            got,
        },
        Err(_) => AnswerError::BadBase64 { index },
    }
}

/// serde_json's own messages for type errors quote the offending value, which here is
/// entropy: keep only its category and position.
fn json_error(e: serde_json::Error, expected: &'static str) -> AnswerError {
    match e.classify() {
        serde_json::error::Category::Data => AnswerError::WrongShape {
            expected,
            line: e.line(),
            column: e.column(),
        },
        serde_json::error::Category::Eof => AnswerError::NotJson(format!(
            "it ends early, at line {} column {}",
            e.line(),
            e.column()
        )),
        _ => AnswerError::NotJson(format!(
            "syntax error at line {} column {}",
            e.line(),
            e.column()
        )),
    }
}

/// Strings that serde had to unescape were copied out of the (wiped) body: wipe them too.
fn wipe(strings: Vec<Cow<'_, str>>) {
    for s in strings {
        if let Cow::Owned(mut owned) = s {
            owned.zeroize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn parses_quantum_entropy_answer() {
        let blocks = [vec![1u8; 1024], vec![2u8; 1024]];
        let body = format!(
            r#"{{"random": ["{}", "{}"], "size": 2}}"#,
            b64(&blocks[0]),
            b64(&blocks[1])
        );
        let got = parse(Dialect::QuantumEntropy, body.as_bytes(), 2, 1024).unwrap();
        assert_eq!(got.len(), 2048);
        assert_eq!(&got.expose()[..1024], &blocks[0][..]);
        assert_eq!(&got.expose()[1024..], &blocks[1][..]);
    }

    #[test]
    fn parses_entropy_answer_with_escaped_slashes() {
        let block: Vec<u8> = (0..=255u8).cycle().take(1024).collect();
        let text = b64(&block).replace('/', "\\/");
        let body = format!(r#"{{"entropy": ["{text}"], "extra": 1}}"#);
        let got = parse(Dialect::Entropy, body.as_bytes(), 1, 1024).unwrap();
        assert_eq!(got.expose(), &block[..]);
    }

    #[test]
    fn rejects_each_kind_of_bad_answer() {
        let good = b64(&[7u8; 1024]);
        let cases: Vec<(Dialect, String, AnswerError)> = vec![
            (
                Dialect::QuantumEntropy,
                "not json".into(),
                AnswerError::NotJson("syntax error at line 1 column 2".into()),
            ),
            (
                Dialect::QuantumEntropy,
                r#"{"size": 1}"#.into(),
                AnswerError::MissingField("random"),
            ),
            (
                Dialect::QuantumEntropy,
                format!(r#"{{"random": ["{good}"]}}"#),
                AnswerError::MissingField("size"),
            ),
            (
                Dialect::QuantumEntropy,
                format!(r#"{{"random": ["{good}"], "size": 2}}"#),
                AnswerError::WrongSize { asked: 1, got: 2 },
            ),
            (
                Dialect::Entropy,
                format!(r#"{{"entropy": ["{good}", "{good}"]}}"#),
                AnswerError::WrongCount { asked: 1, got: 2 },
            ),
            (
                Dialect::Entropy,
                r#"{"entropy": ["@@@@"]}"#.into(),
                AnswerError::BadBase64 { index: 0 },
            ),
            (
                Dialect::Entropy,
                format!(r#"{{"entropy": ["{}"]}}"#, b64(&[7u8; 1000])),
                AnswerError::WrongBlockLength {
                    index: 0,
                    asked: 1024,
                    got: 1000,
                },
            ),
            (
                Dialect::Entropy,
                format!(r#"{{"entropy": ["{}"]}}"#, b64(&[7u8; 2048])),
                AnswerError::WrongBlockLength {
                    index: 0,
                    asked: 1024,
                    got: 2048,
                },
            ),
        ];
        for (dialect, body, want) in cases {
            let got = parse(dialect, body.as_bytes(), 1, 1024).unwrap_err();
            assert_eq!(got, want, "body {body}");
        }
    }

    #[test]
    fn shape_errors_never_quote_the_entropy() {
        let secret = b64(&[0x5a; 1024]);
        let body = format!(r#"{{"random": "{secret}", "size": 1}}"#);
        let err = parse(Dialect::QuantumEntropy, body.as_bytes(), 1, 1024).unwrap_err();
        assert!(matches!(err, AnswerError::WrongShape { .. }), "{err:?}");
        assert!(!err.to_string().contains(&secret[..16]));
    }
}
