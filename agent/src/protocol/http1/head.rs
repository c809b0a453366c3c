//! Request and response heads, parsed with `httparse` straight from the captured bytes; only the
//! fields a span needs are copied out.

const MAX_HEADERS: usize = 128;

/// How the body after a head is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0-style responses).
    UntilClose,
    /// The connection stops speaking HTTP (CONNECT tunnel, 101 upgrade).
    Tunnel,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub host: Option<String>,
    pub user_agent: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub framing: Framing,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub minor_version: u8,
    pub framing: Framing,
}

/// What the request being answered implies for the response body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Normal,
    Head,
    Connect,
}

pub enum HeadParse<T> {
    /// The head and the number of bytes it took.
    Complete(T, usize),
    Partial,
    Invalid,
}

struct BodyHeaders {
    content_length: Option<u64>,
    chunked: bool,
    close: bool,
}

fn body_headers(headers: &[httparse::Header<'_>]) -> Result<BodyHeaders, ()> {
    let mut h = BodyHeaders {
        content_length: None,
        chunked: false,
        close: false,
    };
    for header in headers {
        if header.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(header.value).map_err(|_| ())?.trim();
            let n: u64 = v.parse().map_err(|_| ())?;
            if h.content_length.is_some_and(|old| old != n) {
                return Err(());
            }
            h.content_length = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked counts only as the final coding (RFC 9112 6.3).
            h.chunked = header
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if header.name.eq_ignore_ascii_case("connection") {
            h.close |= header
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    Ok(h)
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

fn header<'a>(headers: &'a [httparse::Header<'_>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

pub fn parse_request(buf: &[u8]) -> HeadParse<RequestHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return HeadParse::Partial,
        Err(_) => return HeadParse::Invalid,
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return HeadParse::Invalid;
    };
    let Ok(body) = body_headers(req.headers) else {
        return HeadParse::Invalid;
    };
    let framing = if body.chunked {
        Framing::Chunked
    } else {
        match body.content_length {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        }
    };
    let head = RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        minor_version: version,
        host: header(req.headers, "host").map(text),
        user_agent: header(req.headers, "user-agent").map(text),
        traceparent: header(req.headers, "traceparent").map(text),
        tracestate: header(req.headers, "tracestate").map(text),
        framing,
    };
    HeadParse::Complete(head, n)
}

pub fn parse_response(buf: &[u8], answers: RequestKind) -> HeadParse<ResponseHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return HeadParse::Partial,
        Err(_) => return HeadParse::Invalid,
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return HeadParse::Invalid;
    };
    // Three digits is all httparse checks; a status below 100 is no HTTP response (found by
    // fuzzing: "000" became a span with status code 0).
    if status < 100 {
        return HeadParse::Invalid;
    }
    let Ok(body) = body_headers(resp.headers) else {
        return HeadParse::Invalid;
    };
    // RFC 9112 6.3, in order.
    let framing =
        if status == 101 || (answers == RequestKind::Connect && (200..300).contains(&status)) {
            Framing::Tunnel
        } else if answers == RequestKind::Head
            || (100..200).contains(&status)
            || status == 204
            || status == 304
        {
            Framing::None
        } else if body.chunked {
            Framing::Chunked
        } else {
            match body.content_length {
                Some(0) => Framing::None,
                Some(n) => Framing::Length(n),
                None => Framing::UntilClose,
            }
        };
    let _ = body.close;
    HeadParse::Complete(
        ResponseHead {
            status,
            minor_version: version,
            framing,
        },
        n,
    )
}

/// Whether `data` can be (the beginning of) a request line: a known method and a space.
pub fn plausible_request(data: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    METHODS.iter().any(|m| prefix_match(data, m))
}

/// Whether `data` can be (the beginning of) a status line.
pub fn plausible_response(data: &[u8]) -> bool {
    prefix_match(data, b"HTTP/1.")
}

fn prefix_match(data: &[u8], pattern: &[u8]) -> bool {
    let n = data.len().min(pattern.len());
    n > 0 && data[..n] == pattern[..n]
}
