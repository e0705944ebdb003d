//! The `Cache-Status` field (RFC 9211) of an answer, built in one place.
//!
//! Every answer says what the cache did with the same parameters, in the
//! same order: `hit`, `fwd`, `fwd-status`, `stored`, `collapsed`, `ttl`,
//! `detail`. Only this type writes them.

use http::HeaderValue;

/// This cache's name in `Cache-Status`.
const NAME: &str = "swr-proxy";

/// The parameters of one `Cache-Status` value; unset ones are left out.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusField<'a> {
    /// Answered from the cache without the backend (fresh or stale).
    pub hit: bool,
    /// Why the backend was asked (`uri-miss`, `stale`, `bypass`, ...).
    pub fwd: Option<&'a str>,
    /// The status the backend answered with.
    pub fwd_status: Option<u16>,
    /// The answer was stored.
    pub stored: bool,
    /// The client waited on another's fetch.
    pub collapsed: bool,
    /// Seconds of freshness left; negative once stale.
    pub ttl: Option<i64>,
    /// What happened, in one token; with `detail_suffix` appended
    /// (`stale-if-error-` + `connect`).
    pub detail: Option<&'a str>,
    pub detail_suffix: Option<&'a str>,
}

impl StatusField<'_> {
    /// The field's text.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut text = String::with_capacity(64);
        text.push_str(NAME);
        if self.hit {
            text.push_str("; hit");
        }
        if let Some(fwd) = self.fwd {
            let _ = write!(text, "; fwd={fwd}");
        }
        if let Some(status) = self.fwd_status {
            let _ = write!(text, "; fwd-status={status}");
        }
        if self.stored {
            text.push_str("; stored");
        }
        if self.collapsed {
            text.push_str("; collapsed");
        }
        if let Some(ttl) = self.ttl {
            let _ = write!(text, "; ttl={ttl}");
        }
        if let Some(detail) = self.detail {
            let _ = write!(
                text,
                "; detail={detail}{}",
                self.detail_suffix.unwrap_or("")
            );
        }
        text
    }

    /// The field as a header value. The text is built from our own tokens
    /// and numbers, so it is always a valid value.
    pub fn value(&self) -> HeaderValue {
        HeaderValue::try_from(self.text()).unwrap_or_else(|_| HeaderValue::from_static(NAME))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_in_one_order() {
        let field = StatusField {
            fwd: Some("uri-miss"),
            fwd_status: Some(200),
            stored: true,
            collapsed: true,
            ttl: Some(10),
            ..StatusField::default()
        };
        assert_eq!(
            field.text(),
            "swr-proxy; fwd=uri-miss; fwd-status=200; stored; collapsed; ttl=10"
        );
        let stale = StatusField {
            hit: true,
            ttl: Some(-3),
            detail: Some("stale-if-error-"),
            detail_suffix: Some("connect"),
            ..StatusField::default()
        };
        assert_eq!(
            stale.text(),
            "swr-proxy; hit; ttl=-3; detail=stale-if-error-connect"
        );
    }
}
