//! One error type for what can go wrong with a request, tagged by source, and
//! mapped to a status code in one place.

use std::fmt;

use http::StatusCode;

/// How the backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamErrorKind {
    /// Could not connect (refused, unreachable, DNS, TLS).
    Connect,
    /// No answer within `--upstream-timeout`.
    Timeout,
    /// Connected, but the exchange broke (reset, malformed response, body cut short).
    Protocol,
    /// The backend answered with 500, 502, 503 or 504.
    Status,
    /// Never sent: every slot to the backend (`--upstream-concurrency`) was
    /// taken for `--upstream-timeout`. Not the backend's failure: no backoff.
    Busy,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 5] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Protocol,
        UpstreamErrorKind::Status,
        UpstreamErrorKind::Busy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Protocol => "protocol",
            UpstreamErrorKind::Status => "status",
            UpstreamErrorKind::Busy => "busy",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A backend failure, cheap to clone so that coalesced waiters share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamError {
    pub kind: UpstreamErrorKind,
    pub detail: String,
}

impl UpstreamError {
    pub fn new(kind: UpstreamErrorKind, detail: impl Into<String>) -> Self {
        UpstreamError {
            kind,
            detail: detail.into(),
        }
    }
}

impl UpstreamError {
    /// What failed, in words, without the details (which name the
    /// backend's address): what a client is told.
    pub fn summary(&self) -> &'static str {
        match self.kind {
            UpstreamErrorKind::Connect => "could not connect to the backend",
            UpstreamErrorKind::Timeout => "the backend did not answer in time",
            UpstreamErrorKind::Protocol => "the backend's answer was broken",
            UpstreamErrorKind::Status => "the backend failed",
            UpstreamErrorKind::Busy => "every connection to the backend is busy",
        }
    }
}

impl std::error::Error for UpstreamError {}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.summary(), self.detail)
    }
}

/// Everything that turns into an error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The backend failed: stale content may stand in.
    Upstream(UpstreamError),
    /// The client's own request is wrong: never answered with stale content.
    BadRequest(&'static str),
    /// No `Host` in HTTP/1.1, two, or one that is not `host[:port]`.
    BadHost(&'static str),
    /// A target that is not a path, or has dot segments or a backslash.
    BadTarget,
    /// A bug or a broken invariant on our side.
    Internal(String),
    /// `only-if-cached` and nothing usable is stored (RFC 9111 §5.2.1.7).
    NotCached,
    /// The request target is longer than `--max-request-line`.
    UriTooLong,
    /// A header line or the header block is larger than
    /// `--max-request-line` / `--max-request-headers`.
    HeadersTooLarge,
}

impl ProxyError {
    /// The status code sent for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Upstream(e) if e.kind == UpstreamErrorKind::Timeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Upstream(e) if e.kind == UpstreamErrorKind::Busy => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::BadRequest(_) | ProxyError::BadHost(_) | ProxyError::BadTarget => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::NotCached => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    /// The `Cache-Status` detail and metric label of an error that refuses
    /// a request before the cache looks at it.
    pub fn detail(&self) -> &'static str {
        match self {
            ProxyError::BadHost(_) => "bad-host",
            ProxyError::BadTarget => "bad-target",
            ProxyError::UriTooLong => "uri-too-long",
            ProxyError::HeadersTooLarge => "headers-too-large",
            ProxyError::BadRequest(_) => "bad-request",
            ProxyError::Upstream(e) => e.kind.as_str(),
            ProxyError::Internal(_) => "internal",
            ProxyError::NotCached => "only-if-cached",
        }
    }

    /// The details [`ProxyError::detail`] gives a refused request.
    pub const REFUSALS: [&'static str; 5] = [
        "bad-host",
        "bad-target",
        "uri-too-long",
        "headers-too-large",
        "bad-request",
    ];

    /// The one line a client is told: the failure class for a backend
    /// failure (`connect`, `timeout`, `protocol`, `status`), never the
    /// backend's address or the client library's message, which the log has.
    pub fn client_message(&self) -> String {
        match self {
            ProxyError::Upstream(e) => format!("{} ({})", e.summary(), e.kind.as_str()),
            ProxyError::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        }
    }

    /// Whether a stale entry may be served instead (stale-if-error).
    pub fn allows_stale(&self) -> bool {
        matches!(self, ProxyError::Upstream(_))
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::Upstream(e) => e.fmt(f),
            ProxyError::BadRequest(why) | ProxyError::BadHost(why) => {
                write!(f, "bad request: {why}")
            }
            ProxyError::BadTarget => f.write_str(
                "bad request: the target is not a path, or has dot segments or a backslash",
            ),
            ProxyError::Internal(why) => write!(f, "internal error: {why}"),
            ProxyError::NotCached => f.write_str("only-if-cached, and nothing usable is stored"),
            ProxyError::UriTooLong => f.write_str("the request target is too long"),
            ProxyError::HeadersTooLarge => f.write_str("the request's headers are too large"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// An error and its sources on one line (hyper-util's top-level message,
/// "client error (Connect)", rarely names the cause alone).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let up = |kind| ProxyError::Upstream(UpstreamError::new(kind, "x"));
        assert_eq!(
            up(UpstreamErrorKind::Timeout).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            up(UpstreamErrorKind::Connect).status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            up(UpstreamErrorKind::Protocol).status(),
            StatusCode::BAD_GATEWAY
        );
        assert!(up(UpstreamErrorKind::Connect).allows_stale());
        let connect = ProxyError::Upstream(UpstreamError::new(
            UpstreamErrorKind::Connect,
            "error sending request for url (http://10.1.2.3:8081/internal)",
        ));
        assert_eq!(
            connect.client_message(),
            "could not connect to the backend (connect)"
        );
        assert!(!ProxyError::BadRequest("x").allows_stale());
        assert_eq!(
            ProxyError::BadRequest("x").status(),
            StatusCode::BAD_REQUEST
        );
    }
}
