//! Query strings, decoded one way everywhere: `application/x-www-form-urlencoded` as the
//! `form_urlencoded` crate reads it (`&`-separated pairs, `+` is a space, `%XX` escapes).
//!
//! Two strictness levels, because the callers differ: the HTTP APIs reject a query they
//! cannot decode ([`pairs`], a 400 for the client), while the WebSocket upgrade only looks
//! for one value and reads the rest leniently ([`first`]), as browsers' URLs may carry
//! anything.

/// Why a query string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A `%` not followed by two hex digits.
    #[error("malformed %-escape in {0:?}")]
    Escape(String),
    /// The escapes decode to bytes that are not UTF-8.
    #[error("{0:?} does not decode to UTF-8")]
    Utf8(String),
}

/// Every `(key, value)` pair in order, repeated keys kept; an error if any escape is
/// malformed or decodes to something other than UTF-8.
pub fn pairs(query: &str) -> Result<Vec<(String, String)>, QueryError> {
    if !escapes_well_formed(query) {
        return Err(QueryError::Escape(query.to_owned()));
    }
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| {
            // form_urlencoded replaces bad UTF-8 with U+FFFD; one the client did not send
            // means the input was not text.
            if (k.contains('\u{FFFD}') || v.contains('\u{FFFD}')) && !query.contains('\u{FFFD}') {
                Err(QueryError::Utf8(query.to_owned()))
            } else {
                Ok((k.into_owned(), v.into_owned()))
            }
        })
        .collect()
}

/// The first non-empty value of `name`, decoded leniently (a malformed escape stays as
/// written).
pub fn first(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, v)| k == name && !v.is_empty())
        .map(|(_, v)| v.into_owned())
}

fn escapes_well_formed(s: &str) -> bool {
    s.split('%').skip(1).all(|rest| {
        rest.get(..2)
            .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(q: &str) -> Result<String, QueryError> {
        Ok(pairs(&format!("k={q}"))?.remove(0).1)
    }

    #[test]
    fn strict_pairs_decode_or_refuse() {
        assert_eq!(one("region%3Deu").as_deref(), Ok("region=eu"));
        assert_eq!(one("a+b").as_deref(), Ok("a b"));
        assert!(matches!(one("%zz"), Err(QueryError::Escape(_))));
        assert!(matches!(one("%4"), Err(QueryError::Escape(_))));
        assert!(matches!(one("%ff"), Err(QueryError::Utf8(_))));
        assert_eq!(
            pairs("a=1&&b&a=%C3%A9").unwrap(),
            vec![
                ("a".to_owned(), "1".to_owned()),
                ("b".to_owned(), String::new()),
                ("a".to_owned(), "é".to_owned()),
            ]
        );
        assert_eq!(pairs("").unwrap(), vec![]);
    }

    #[test]
    fn first_is_lenient() {
        assert_eq!(first("codec=json&token=x%2Ey", "token"), Some("x.y".into()));
        assert_eq!(first("a=1&b=%zz", "b"), Some("%zz".into()));
        assert_eq!(first("token=&token=q", "token"), Some("q".into()));
        assert_eq!(first("token=", "token"), None);
        assert_eq!(first("", "token"), None);
    }
}
