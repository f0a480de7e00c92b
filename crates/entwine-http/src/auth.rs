//! Bearer-token authentication for entwine's HTTP interfaces, and the loopback rule.
//!
//! Tokens are compared as SHA-256 digests with `subtle`'s constant-time equality, every
//! accepted token checked (no early exit), so timing reveals neither a token nor which matched.

use std::net::SocketAddr;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest accepted token.
pub const MIN_TOKEN_LEN: usize = 16;

/// The accepted tokens (several at once, for rotation), held as digests.
#[derive(Clone, Default)]
pub struct Tokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.digests.len())
    }
}

/// A token too short; names its position, never its text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("token {position} is {len} characters long; each token needs at least {MIN_TOKEN_LEN} (generate one with `openssl rand -hex 32`)")]
pub struct TokensError {
    /// 1-based position of the token in the text.
    pub position: usize,
    /// Its length.
    pub len: usize,
}

impl Tokens {
    /// Parses tokens separated by commas, whitespace or newlines; empty entries are ignored.
    pub fn parse(text: &SecretString) -> Result<Self, TokensError> {
        let mut digests = Vec::new();
        let entries = text
            .expose_secret()
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|t| !t.is_empty());
        for (i, token) in entries.enumerate() {
            let len = token.chars().count();
            if len < MIN_TOKEN_LEN {
                return Err(TokensError {
                    position: i + 1,
                    len,
                });
            }
            digests.push(Sha256::digest(token.as_bytes()).into());
        }
        Ok(Self { digests })
    }

    /// Whether no token is configured.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `candidate` is one of the tokens, in constant time over all of them.
    pub fn accepts(&self, candidate: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        for accepted in &self.digests {
            found |= accepted.ct_eq(&digest);
        }
        found.into()
    }
}

/// One HTTP interface, as far as authentication is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    /// The twins API and its SSE stream (`/api/...`).
    Api,
    /// `/metrics`.
    Metrics,
    /// The function routes.
    Functions,
    /// The device API.
    Device,
}

/// Which interfaces require a token, and the tokens.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The accepted tokens.
    pub tokens: Tokens,
    /// Whether the function routes require a token (`auth.functions`, default true).
    pub functions: bool,
    /// Whether `/metrics` requires a token (`auth.metrics`, default true).
    pub metrics: bool,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            tokens: Tokens::default(),
            functions: true,
            metrics: true,
        }
    }
}

impl Auth {
    /// Whether `interface` is protected by policy (before looking at tokens).
    pub fn protects(&self, interface: Interface) -> bool {
        match interface {
            Interface::Functions => self.functions,
            Interface::Metrics => self.metrics,
            Interface::Api | Interface::Device => true,
        }
    }

    /// Whether a request to `interface` needs a token now: protected by policy and tokens
    /// configured.
    pub fn requires_token(&self, interface: Interface) -> bool {
        self.protects(interface) && !self.tokens.is_empty()
    }

    /// `None` when the request may pass; else the 401 answer. With no tokens configured
    /// everything passes (the loopback case; [`check_exposure`] refuses the others).
    pub fn authorize(&self, interface: Interface, headers: &HeaderMap) -> Option<Response> {
        if !self.protects(interface) || self.tokens.is_empty() {
            return None;
        }
        self.authorize_token(interface, bearer(headers))
    }

    /// As [`Auth::authorize`], for a token presented some other way (`None`: none presented).
    pub fn authorize_token(
        &self,
        interface: Interface,
        presented: Option<&str>,
    ) -> Option<Response> {
        if !self.protects(interface) || self.tokens.is_empty() {
            return None;
        }
        let message = match presented {
            None => "missing or malformed `Authorization: Bearer <token>` header",
            Some(token) if self.tokens.accepts(token.trim()) => return None,
            Some(_) => "unknown token",
        };
        let mut response = crate::error_response(StatusCode::UNAUTHORIZED, message);
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Some(response)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// The `access_token` query parameter (percent-decoding is not needed: tokens are printable
/// ASCII without `&`, `=`, `%` or spaces, as `openssl rand -hex 32` makes them).
fn query_token(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))
}

/// `router` with every route requiring a token for `interface` under `auth`.
pub fn protect(
    router: axum::Router,
    auth: std::sync::Arc<Auth>,
    interface: Interface,
) -> axum::Router {
    router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let auth = auth.clone();
            async move {
                match auth.authorize(interface, request.headers()) {
                    Some(refused) => refused,
                    None => next.run(request).await,
                }
            }
        },
    ))
}

/// As [`protect`], also accepting the token as `?access_token=` when no header carries one:
/// for an SSE stream, which a browser's `EventSource` opens without headers. Only for such a
/// route: a token in a URL ends up in logs and histories more easily than one in a header.
pub fn protect_stream(
    router: axum::Router,
    auth: std::sync::Arc<Auth>,
    interface: Interface,
) -> axum::Router {
    router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let auth = auth.clone();
            async move {
                let presented =
                    bearer(request.headers()).or_else(|| query_token(request.uri().query()));
                match auth.authorize_token(interface, presented) {
                    Some(refused) => refused,
                    None => next.run(request).await,
                }
            }
        },
    ))
}

/// A non-loopback listener without tokens for a protected interface.
#[derive(Debug, thiserror::Error)]
#[error("refusing to listen on {place} without authentication: set auth.tokens (ENTWINE_AUTH__TOKENS or the Secret file auth/tokens), or listen on 127.0.0.1{hint}")]
pub struct ExposureError {
    /// The refused address (or what exposes it).
    pub place: String,
    hint: &'static str,
}

/// The loopback rule: every server calls this before binding.
pub fn check_exposure(
    addr: SocketAddr,
    auth: &Auth,
    interfaces: &[Interface],
) -> Result<(), ExposureError> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    check_exposed(&addr.to_string(), auth, interfaces)
}

/// The loopback rule for a listener that is reachable from elsewhere although it binds to
/// loopback (a Fission function behind its environment's supervisor, which listens on the pod's
/// address): `place` names it in the error.
pub fn check_exposed(
    place: &str,
    auth: &Auth,
    interfaces: &[Interface],
) -> Result<(), ExposureError> {
    if !auth.tokens.is_empty() {
        return Ok(());
    }
    for &interface in interfaces {
        if auth.protects(interface) {
            let hint = match interface {
                Interface::Functions => {
                    ", or set auth.functions=false to leave the function routes open on purpose"
                }
                Interface::Metrics => {
                    ", or set auth.metrics=false to leave /metrics open on purpose"
                }
                _ => "",
            };
            return Err(ExposureError {
                place: place.to_owned(),
                hint,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

    #[test]
    fn parses_and_rotates() {
        let t = Tokens::parse(&secret("aaaaaaaaaaaaaaaa,\n bbbbbbbbbbbbbbbb\n")).unwrap();
        assert!(t.accepts("aaaaaaaaaaaaaaaa") && t.accepts("bbbbbbbbbbbbbbbb"));
        assert!(!t.accepts("cccccccccccccccc"));
        let e = Tokens::parse(&secret("aaaaaaaaaaaaaaaa short")).unwrap_err();
        assert_eq!(
            e,
            TokensError {
                position: 2,
                len: 5
            }
        );
        assert!(!e.to_string().contains("short"));
    }

    #[tokio::test]
    async fn protect_answers_401_json_then_200() {
        use tower::ServiceExt;
        let auth = Auth {
            tokens: Tokens::parse(&secret("aaaaaaaaaaaaaaaa bbbbbbbbbbbbbbbb")).unwrap(),
            ..Auth::default()
        };
        let app = protect(
            axum::Router::new().route("/api/twins", axum::routing::get(|| async { "ok" })),
            std::sync::Arc::new(auth),
            Interface::Api,
        );
        let call = |value: Option<&'static str>| {
            let app = app.clone();
            async move {
                let mut b = axum::http::Request::get("/api/twins");
                if let Some(v) = value {
                    b = b.header("authorization", v);
                }
                app.oneshot(b.body(axum::body::Body::empty()).unwrap())
                    .await
                    .unwrap()
            }
        };
        let none = call(None).await;
        assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(none.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let body = axum::body::to_bytes(none.into_body(), 1024).await.unwrap();
        assert_eq!(
            &body[..],
            br#"{"error":"missing or malformed `Authorization: Bearer <token>` header"}"#
        );
        assert_eq!(
            call(Some("Bearer cccccccccccccccc")).await.status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(Some("Bearer aaaaaaaaaaaaaaaa")).await.status(),
            StatusCode::OK
        );
        assert_eq!(
            call(Some("Bearer bbbbbbbbbbbbbbbb")).await.status(),
            StatusCode::OK
        );
    }

    #[test]
    fn exposure_rule() {
        let open: SocketAddr = "0.0.0.0:8888".parse().unwrap();
        let auth = Auth::default();
        let err = check_exposure(open, &auth, &[Interface::Functions]).unwrap_err();
        assert_eq!(err.to_string(), "refusing to listen on 0.0.0.0:8888 without authentication: set auth.tokens (ENTWINE_AUTH__TOKENS or the Secret file auth/tokens), or listen on 127.0.0.1, or set auth.functions=false to leave the function routes open on purpose");
        assert!(check_exposure("127.0.0.1:1".parse().unwrap(), &auth, &[Interface::Api]).is_ok());
        let relaxed = Auth {
            functions: false,
            ..Auth::default()
        };
        assert!(check_exposure(open, &relaxed, &[Interface::Functions]).is_ok());
        assert_eq!(
            check_exposed("the Fission supervisor's port", &auth, &[Interface::Metrics])
                .unwrap_err()
                .to_string(),
            "refusing to listen on the Fission supervisor's port without authentication: set auth.tokens (ENTWINE_AUTH__TOKENS or the Secret file auth/tokens), or listen on 127.0.0.1, or set auth.metrics=false to leave /metrics open on purpose"
        );
        assert_eq!(query_token(Some("a=1&access_token=xyz&b=2")), Some("xyz"));
        assert_eq!(query_token(Some("a=1")), None);
    }
}
