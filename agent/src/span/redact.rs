//! What of a request's URL may leave the host: credentials never, and query values of keys that
//! look like secrets only as `REDACTED` (OpenTelemetry HTTP semantic conventions, and stricter).
//! Pure functions on the request target; the span builder calls them.
//!
//! Hand-written because the input is a raw request target as it crossed the wire (origin form
//! `/p?q`, or absolute form `http://user:pw@host/p?q` sent to a forward proxy), which URL crates
//! normalise (re-encoding, adding a trailing slash) where a trace must show what was sent.
use std::borrow::Cow;

pub const REDACTED: &str = "REDACTED";

/// Query keys whose values are redacted by default, matched case-insensitively as substrings:
/// the signature keys of pre-signed URLs (`AWSAccessKeyId`, `Signature`, `sig`,
/// `X-Goog-Signature`, `X-Amz-Credential`) and words secrets go by.
pub const DEFAULT_SECRET_KEYS: [&str; 9] = [
    "token",
    "key",
    "secret",
    "password",
    "passwd",
    "auth",
    "session",
    "sig",
    "credential",
];

/// What happens to query strings (`--url-query`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryMode {
    /// Values of secret-looking keys become `REDACTED` (default).
    Redact,
    /// Query strings are left out entirely.
    Drop,
}

#[derive(Clone, Debug)]
pub struct UrlPolicy {
    pub query: QueryMode,
    /// Lowercase substrings that mark a query key as secret.
    pub secret_keys: Vec<String>,
}

impl Default for UrlPolicy {
    fn default() -> Self {
        UrlPolicy {
            query: QueryMode::Redact,
            secret_keys: DEFAULT_SECRET_KEYS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// A request target split into what the span attributes need.
#[derive(Debug, PartialEq, Eq)]
pub struct Target<'a> {
    /// `http` or `https` when the target was in absolute form.
    pub scheme: Option<&'a str>,
    /// `host[:port]` of an absolute-form target, without any userinfo.
    pub authority: Option<&'a str>,
    /// Whether an absolute-form target carried `user[:password]@`.
    pub had_userinfo: bool,
    pub path: &'a str,
    pub query: Option<&'a str>,
}

/// Splits an origin-form (`/p?q#f`) or absolute-form (`http://u:p@h:1/p?q`) request target.
pub fn parse_target(target: &str) -> Target<'_> {
    let (scheme, rest) = match target.split_once("://") {
        Some((s, r)) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {
            (Some(s), Some(r))
        }
        _ => (None, None),
    };
    let (authority, had_userinfo, path_query) = match rest {
        Some(r) => {
            let end = r.find(['/', '?', '#']).unwrap_or(r.len());
            let (auth, pq) = r.split_at(end);
            match auth.rsplit_once('@') {
                Some((_, host)) => (Some(host), true, pq),
                None => (Some(auth), false, pq),
            }
        }
        None => (None, false, target),
    };
    let without_fragment = path_query.split('#').next().unwrap_or("");
    let (path, query) = match without_fragment.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (without_fragment, None),
    };
    Target {
        scheme,
        authority,
        had_userinfo,
        path: if path.is_empty() { "/" } else { path },
        query,
    }
}

impl UrlPolicy {
    fn is_secret(&self, key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        self.secret_keys.iter().any(|s| key.contains(s.as_str()))
    }

    /// The query as it may be reported, or None when it is dropped.
    pub fn query<'a>(&self, query: &'a str) -> Option<Cow<'a, str>> {
        if self.query == QueryMode::Drop {
            return None;
        }
        let secret = |pair: &str| {
            pair.split_once('=')
                .is_some_and(|(k, _)| self.is_secret(&percent_decode(k)))
        };
        if !query.split('&').any(secret) {
            return Some(Cow::Borrowed(query));
        }
        let parts: Vec<Cow<'_, str>> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if secret(pair) => Cow::Owned(format!("{k}={REDACTED}")),
                _ => Cow::Borrowed(pair),
            })
            .collect();
        Some(Cow::Owned(parts.join("&")))
    }

    /// `url.full` of a client request: credentials as `REDACTED:REDACTED@`, secret query values
    /// redacted (or the query dropped), no fragment. `authority` names the server when the target
    /// is in origin form.
    /// `scheme` is the connection's (`http`, or `https` over TLS), used when the target is
    /// not in absolute form.
    pub fn full_url(&self, target: &str, authority: &str, scheme: &str) -> String {
        let t = parse_target(target);
        let scheme = t.scheme.unwrap_or(scheme);
        let host = t.authority.unwrap_or(authority);
        let creds = if t.had_userinfo {
            "REDACTED:REDACTED@"
        } else {
            ""
        };
        let mut out = format!("{scheme}://{creds}{host}{}", t.path);
        if let Some(q) = t.query.and_then(|q| self.query(q)) {
            out.push('?');
            out.push_str(&q);
        }
        out
    }
}

/// `%XX` escapes decoded, for matching key names only (invalid escapes kept as they are).
fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_leave() {
        let p = UrlPolicy::default();
        assert_eq!(
            p.full_url(
                "http://alice:s3cret@example.com:8080/a?x=1",
                "ignored",
                "http"
            ),
            "http://REDACTED:REDACTED@example.com:8080/a?x=1"
        );
        assert_eq!(
            p.full_url("http://alice@example.com/", "ignored", "http"),
            "http://REDACTED:REDACTED@example.com/"
        );
        // An '@' in the path is not userinfo.
        assert_eq!(
            p.full_url("http://h/users/@bob", "ignored", "http"),
            "http://h/users/@bob"
        );
    }

    #[test]
    fn secret_query_values_are_redacted() {
        let p = UrlPolicy::default();
        assert_eq!(
            p.full_url("/?token=secret123", "127.0.0.1:8000", "http"),
            "http://127.0.0.1:8000/?token=REDACTED"
        );
        assert_eq!(
            p.full_url("/o?AWSAccessKeyId=AK&Signature=abc&Expires=1&sig=z&X-Goog-Signature=q&page=2", "s3", "http"),
            "http://s3/o?AWSAccessKeyId=REDACTED&Signature=REDACTED&Expires=1&sig=REDACTED&X-Goog-Signature=REDACTED&page=2"
        );
        assert_eq!(
            p.full_url("/p?Api_Key=1&q=k&session%5Fid=9#frag", "h", "http"),
            "http://h/p?Api_Key=REDACTED&q=k&session%5Fid=REDACTED"
        );
        // Nothing secret: the query is kept as sent, flags without values too.
        assert_eq!(
            p.full_url("/p?a=1&b&c=", "h", "http"),
            "http://h/p?a=1&b&c="
        );
    }

    #[test]
    fn query_can_be_dropped_and_keys_configured() {
        let drop = UrlPolicy {
            query: QueryMode::Drop,
            ..UrlPolicy::default()
        };
        assert_eq!(drop.full_url("/p?a=1", "h", "http"), "http://h/p");
        let custom = UrlPolicy {
            secret_keys: vec!["ssn".into()],
            ..UrlPolicy::default()
        };
        assert_eq!(
            custom.full_url("/p?ssn=1&token=2", "h", "http"),
            "http://h/p?ssn=REDACTED&token=2"
        );
    }

    #[test]
    fn absolute_targets_give_only_the_path() {
        let t = parse_target("http://user:pw@proxy.example:3128/x/y?z=1#f");
        assert_eq!(t.path, "/x/y");
        assert_eq!(t.query, Some("z=1"));
        assert_eq!(t.authority, Some("proxy.example:3128"));
        assert!(t.had_userinfo);
        assert_eq!(parse_target("http://host").path, "/");
        assert_eq!(parse_target("/a?b#c").path, "/a");
        assert_eq!(parse_target("*").path, "*");
        assert_eq!(parse_target("/a%3Fb").query, None);
    }

    #[test]
    fn percent_decoding_is_total() {
        for s in ["%", "%4", "%zz", "a%41", "%C3%A9", "%%41"] {
            let _ = percent_decode(s);
        }
        assert_eq!(percent_decode("a%41"), "aA");
    }
}
