//! Header field values read by their grammar (RFC 9110 §5.6), never by splitting strings: a
//! comma or semicolon inside a quoted string separates nothing, a quoted string's escapes are
//! undone, and an element that does not match the grammar is ignored whole.
//!
//! The headers orderflow reads, and where each is parsed:
//! - `Prefer` (RFC 7240): [`preferences`] here; `wait` in `crate::wait`.
//! - `Authorization: Bearer` (RFC 9110 §11.6.2, RFC 6750 §2.1): [`bearer_token`] here.
//! - `Cookie` (RFC 6265 §4.2): [`cookie`] here.
//! - `Content-Type` (RFC 9110 §8.3): [`media_type_is`] here (the `mime` crate's parser).
//! - `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header: an sf-string):
//!   `crate::extract::IdempotencyKey`.
//! - `Last-Event-ID` (HTML's server-sent events: the id this stream sent, digits only):
//!   `crate::routes::events`.
//! - `traceparent` (W3C Trace Context): `orderflow_shared::telemetry::TraceParent::parse`.
//! - `Sec-Fetch-Site`, `Origin` and `Host` (compared whole, RFC 6454): `crate::extract`.

use std::collections::HashSet;

use axum::http::{HeaderMap, HeaderValue, header};

/// A field that may occur once came as several field lines (RFC 9110 §5.3: a sender must not
/// send those, and their meaning is ambiguous).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeated;

/// The one value of a singleton field `name`: `Ok(None)` when absent, [`Repeated`] when it
/// came more than once.
pub fn single(
    headers: &HeaderMap,
    name: impl axum::http::header::AsHeaderName,
) -> Result<Option<&HeaderValue>, Repeated> {
    let mut values = headers.get_all(name).into_iter();
    match (values.next(), values.next()) {
        (first, None) => Ok(first),
        (Some(_), Some(_)) | (None, Some(_)) => Err(Repeated),
    }
}

/// An sf-string (RFC 8941 §3.3.3): `DQUOTE *( unescaped / "\" ( DQUOTE / "\" ) ) DQUOTE`,
/// unescaped printable ASCII but `"` and `\`; the string with its escapes undone.
pub fn sf_string(value: &[u8]) -> Option<String> {
    let inner = value.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    let mut out = String::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&e @ (b'"' | b'\\')) => out.push(char::from(e)),
                _ => return None,
            },
            b'"' => return None,
            0x20..=0x7E => out.push(char::from(b)),
            _ => return None,
        }
    }
    Some(out)
}

/// One element of a `Prefer` header (RFC 7240 §2):
/// `token [ BWS "=" BWS word ] *( OWS ";" [ OWS parameter ] )`, `word = token / quoted-string`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preference {
    /// The preference's name, lower-cased (names compare case-insensitively).
    pub name: String,
    /// Its value: a token, or a quoted string with its escapes undone (the two are equivalent,
    /// RFC 9110 §5.6.6).
    pub value: Option<String>,
    /// Its parameters, names lower-cased, in order.
    pub parameters: Vec<(String, Option<String>)>,
}

/// Every well-formed preference of every `Prefer` header, in order; malformed elements are left
/// out (a preference the server does not understand is ignored, RFC 7240 §2). Where a name
/// occurs more than once only its first occurrence counts (§2): the later ones are left out too.
pub fn preferences(headers: &HeaderMap) -> Vec<Preference> {
    // A set: a header may name a hundred thousand preferences (hyper reads ~400 KB of them),
    // and looking each up in a list would take quadratic time.
    let mut seen = HashSet::new();
    let mut out: Vec<Preference> = Vec::new();
    for value in headers.get_all("prefer") {
        for element in list_elements(value.as_bytes()) {
            // The first occurrence of a name decides, well-formed or not.
            let name = Cursor::new(element).token().map(|t| t.to_ascii_lowercase());
            let Some(name) = name else { continue };
            if !seen.insert(name) {
                continue;
            }
            if let Some(preference) = preference(element) {
                out.push(preference);
            }
        }
    }
    out
}

/// The elements of a `#list` field value (RFC 9110 §5.6.1): split at commas outside quoted
/// strings, optional whitespace trimmed, empty elements dropped.
pub fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = value;
    std::iter::from_fn(move || {
        loop {
            if rest.is_empty() {
                return None;
            }
            let (mut quoted, mut escaped, mut end) = (false, false, rest.len());
            for (i, &b) in rest.iter().enumerate() {
                match b {
                    _ if escaped => escaped = false,
                    b'\\' if quoted => escaped = true,
                    b'"' => quoted = !quoted,
                    b',' if !quoted => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            let element = trim_ows(&rest[..end]);
            rest = rest.get(end + 1..).unwrap_or_default();
            if !element.is_empty() {
                return Some(element);
            }
        }
    })
}

fn preference(element: &[u8]) -> Option<Preference> {
    let mut c = Cursor::new(element);
    let (name, value) = c.pair()?;
    let mut parameters = Vec::new();
    loop {
        c.ows();
        if c.done() {
            break;
        }
        c.byte(b';')?;
        c.ows();
        // `;` may be followed by nothing (an empty parameter).
        if c.done() || c.peek() == Some(b';') {
            continue;
        }
        parameters.push(c.pair()?);
    }
    Some(Preference {
        name,
        value,
        parameters,
    })
}

/// The token of `Authorization: Bearer <token>` when the header is exactly that, once: the
/// scheme matched case-insensitively (RFC 9110 §11.1), one or more spaces, then a `b64token`
/// (RFC 6750 §2.1: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = single(headers, header::AUTHORIZATION).ok()??.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    let body = token.trim_end_matches('=');
    let b64 = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
    (scheme.eq_ignore_ascii_case("bearer") && !body.is_empty() && body.bytes().all(b64)).then_some(token)
}

/// Whether `Authorization` names the Bearer scheme (RFC 6750 §2.1; schemes are
/// case-insensitive, RFC 9110 §11.1), whatever follows it.
pub fn is_bearer(headers: &HeaderMap) -> bool {
    headers.get_all(header::AUTHORIZATION).iter().any(|v| {
        let scheme = v.as_bytes().split(|b| *b == b' ').next().unwrap_or_default();
        scheme.eq_ignore_ascii_case(b"bearer")
    })
}

/// The value of cookie `name` (RFC 6265 §4.2: `cookie-pair *( ";" SP cookie-pair )`,
/// `cookie-value = *cookie-octet / ( DQUOTE *cookie-octet DQUOTE )`), the first one sent;
/// `None` when absent or empty. Every `Cookie` header counts (HTTP/2 may split them).
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim_matches(|c| c == ' ' || c == '\t').split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| {
            // One pair of surrounding quotes is part of the syntax, not of the value.
            v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)
        })
        .filter(|v| !v.is_empty() && v.bytes().all(cookie_octet))
}

/// `cookie-octet` (RFC 6265 §4.1.1): visible ASCII but `"`, `,`, `;` and `\`.
fn cookie_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

/// Whether the request's one `Content-Type` is `essence` (`type/subtype`, compared
/// case-insensitively as RFC 9110 §8.3.1 says), whatever its parameters.
pub fn media_type_is(headers: &HeaderMap, essence: &str) -> bool {
    single(headers, header::CONTENT_TYPE)
        .ok()
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
        .is_some_and(|m| m.essence_str().eq_ignore_ascii_case(essence))
}

/// A parser over one list element's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn byte(&mut self, b: u8) -> Option<()> {
        (self.peek() == Some(b)).then(|| self.at += 1)
    }

    /// OWS / BWS: `*( SP / HTAB )`.
    fn ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    /// `token = 1*tchar`.
    fn token(&mut self) -> Option<String> {
        let start = self.at;
        while self.peek().is_some_and(tchar) {
            self.at += 1;
        }
        (self.at > start).then(|| String::from_utf8_lossy(&self.bytes[start..self.at]).into_owned())
    }

    /// `quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE`, escapes undone.
    fn quoted_string(&mut self) -> Option<String> {
        self.byte(b'"')?;
        let mut out = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(String::from_utf8_lossy(&out).into_owned());
                }
                b'\\' => {
                    self.at += 1;
                    let b = self
                        .peek()
                        .filter(|&b| b == b'\t' || b == b' ' || b >= 0x21 && b != 0x7F)?;
                    out.push(b);
                }
                b if b == b'\t' || b == b' ' || (b >= 0x21 && b != 0x7F) => out.push(b),
                _ => return None,
            }
            self.at += 1;
        }
    }

    /// `token [ BWS "=" BWS word ]`, the name lower-cased.
    fn pair(&mut self) -> Option<(String, Option<String>)> {
        let name = self.token()?.to_ascii_lowercase();
        let before = self.at;
        self.ows();
        if self.byte(b'=').is_none() {
            self.at = before;
            return Some((name, None));
        }
        self.ows();
        let value = if self.peek() == Some(b'"') {
            self.quoted_string()?
        } else {
            self.token()?
        };
        Some((name, Some(value)))
    }
}

/// `tchar` (RFC 9110 §5.6.2).
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(name: &'static str, values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name, HeaderValue::from_bytes(v).expect("a valid header value"));
        }
        h
    }

    fn prefs(values: &[&[u8]]) -> Vec<(String, Option<String>)> {
        preferences(&headers("prefer", values))
            .into_iter()
            .map(|p| (p.name, p.value))
            .collect()
    }

    fn p(name: &str, value: Option<&str>) -> (String, Option<String>) {
        (name.to_owned(), value.map(str::to_owned))
    }

    #[test]
    fn lists_split_only_outside_quoted_strings() {
        let all = |v: &'static [u8]| list_elements(v).collect::<Vec<_>>();
        assert_eq!(all(b"a, b ,,c"), [&b"a"[..], b"b", b"c"]);
        assert_eq!(all(br#"foo="a,wait=7", x"#), [&br#"foo="a,wait=7""#[..], b"x"]);
        assert_eq!(all(br#"foo="a\",b", y"#), [&br#"foo="a\",b""#[..], b"y"]);
        assert_eq!(all(b" , ,"), Vec::<&[u8]>::new());
    }

    #[test]
    fn preferences_follow_rfc_7240() {
        // A comma or `wait=` inside a quoted string is part of that string.
        assert_eq!(prefs(&[br#"foo="a,wait=7""#]), [p("foo", Some("a,wait=7"))]);
        assert_eq!(
            prefs(&[br#"respond-async, Wait = "7" ; x="y;z", handling=lenient"#]),
            [
                p("respond-async", None),
                p("wait", Some("7")),
                p("handling", Some("lenient"))
            ]
        );
        assert_eq!(prefs(&[br#"a="q\"uote\\d""#]), [p("a", Some(r#"q"uote\d"#))]);
        // The first occurrence of a name decides, across header lines too.
        assert_eq!(prefs(&[b"wait=1", b"wait=2"]), [p("wait", Some("1"))]);
        assert_eq!(prefs(&[b"wait=soon, wait=2"]), [p("wait", Some("soon"))]);
        // Malformed elements are ignored (and still count as the name's first occurrence).
        assert_eq!(prefs(&[br#"wait="7, wait=2"#]), Vec::new());
        assert_eq!(prefs(&[b"wait==3, x"]), [p("x", None)]);
        assert_eq!(prefs(&[b"wait=3 junk"]), Vec::new());
        assert_eq!(prefs(&[b"=3, ;x"]), Vec::new());
        assert_eq!(prefs(&[b"x;;a=1;"]), [p("x", None)]);
        // obs-text in a quoted string is kept, not a reason to drop the header.
        assert_eq!(prefs(&[b"a=\"\xe9\", b"]), [p("a", Some("\u{FFFD}")), p("b", None)]);
    }

    /// As many preferences as hyper lets through (~400 KB of short names), each distinct, the
    /// first named again at the end: every one is read once and the first occurrence decides,
    /// in linear time (a list of the names seen made this quadratic: billions of comparisons).
    #[test]
    fn a_hundred_thousand_preferences_are_each_read_once() {
        let names: Vec<String> = (0..100_000).map(|i| format!("p{i}")).collect();
        let value = format!("{}=1,p0=2", names.join(","));
        let read = preferences(&headers("prefer", &[value.as_bytes()]));
        assert_eq!(read.len(), 100_000);
        assert_eq!((read[0].name.as_str(), read[0].value.as_deref()), ("p0", None));
        assert_eq!(read[99_999].value.as_deref(), Some("1"));
    }

    #[test]
    fn singletons_and_sf_strings() {
        assert_eq!(
            single(&headers("a", &[b"1"]), "a").map(|v| v.map(|v| v.as_bytes().to_vec())),
            Ok(Some(b"1".to_vec()))
        );
        assert_eq!(single(&headers("a", &[]), "a"), Ok(None));
        assert_eq!(single(&headers("a", &[b"1", b"1"]), "a"), Err(Repeated));
        assert_eq!(sf_string(br#""abc""#).as_deref(), Some("abc"));
        assert_eq!(sf_string(br#""a\"b\\c d""#).as_deref(), Some(r#"a"b\c d"#));
        assert_eq!(sf_string(br#""""#).as_deref(), Some(""));
        for bad in [
            &br#"abc"#[..],
            br#""a"b""#,
            br#""a\b""#,
            br#""a\""#,
            b"\"\x7f\"",
            b"\"\xc3\xa9\"",
        ] {
            assert_eq!(sf_string(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        // Two Authorization lines: no token at all.
        let two = headers("authorization", &[b"Bearer a", b"Bearer b"]);
        assert_eq!(bearer_token(&two), None);
    }

    #[test]
    fn bearer_tokens_are_b64tokens() {
        let token = |v: &'static str| bearer_token(&headers("authorization", &[v.as_bytes()])).map(str::to_owned);
        assert_eq!(token("Bearer abc.DEF-_~+/=="), Some("abc.DEF-_~+/==".into()));
        assert_eq!(token("bearer   abc"), Some("abc".into()));
        assert_eq!(token("Bearer a b"), None);
        assert_eq!(token("Bearer =="), None);
        assert_eq!(token("Bearer a=b"), None);
        assert_eq!(token("Basic abc"), None);
        assert_eq!(token("Bearer"), None);
    }

    #[test]
    fn cookies_are_read_by_rfc_6265() {
        let get = |vs: &[&'static str]| {
            let h = headers("cookie", &vs.iter().map(|v| v.as_bytes()).collect::<Vec<_>>());
            cookie(&h, "s").map(str::to_owned)
        };
        assert_eq!(get(&["a=1; s=tok"]), Some("tok".into()));
        assert_eq!(get(&["a=1", "s=\"tok\""]), Some("tok".into()));
        assert_eq!(get(&["s=\"\"tok\"\""]), None);
        assert_eq!(get(&["s=a\\b"]), None);
        assert_eq!(get(&["s="]), None);
        assert_eq!(get(&["s=first; s=second"]), Some("first".into()));
    }

    #[test]
    fn media_types_compare_by_essence() {
        let is_json = |v: &'static str| media_type_is(&headers("content-type", &[v.as_bytes()]), "application/json");
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(!is_json("application/jsonx"));
        assert!(!is_json("application/x-www-form-urlencoded"));
    }
}
