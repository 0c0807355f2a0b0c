//! DCV's token verifier: `POST /agent/validate-authentication-token`, the
//! URL a DCV server's `auth-token-verifier` (dcv.conf, `[security]`) points
//! at, served on the broker's own port beside gRPC (HTTP/1.1 or HTTP/2,
//! over TLS when the broker has TLS).
//!
//! The exchange is DCV's (Administrator Guide, "Use External
//! Authentication", "Authentication service requirements"): the DCV server
//! POSTs a form (`application/x-www-form-urlencoded`) with `sessionId`,
//! `authenticationToken` and `clientAddress`, and reads an XML answer,
//! `<auth result="yes"><username>USER</username></auth>` or
//! `<auth result="no"><message>WHY</message></auth>`, with HTTP 200. The
//! decision is the domain's ([`Fleet::verify_connection_token`], the same
//! check as gRPC `Agent/ValidateConnectionToken`): the token is genuine,
//! unexpired, for `sessionId`, and that session is READY; the user is the
//! token's. `clientAddress` is informational: it is logged, never decided on
//! (the token is the credential; the address a DCV server sees may be a
//! proxy's).
//!
//! DCV servers hold no bearer token, so the route is open; the HTTP gate
//! routes it here before authentication. What a request may cost is
//! bounded here: the body ([`MAX_FORM_BYTES`], refused with 413 beyond),
//! the time to read it ([`READ_TIMEOUT`]), and how many requests are read
//! and checked at once, in all ([`MAX_VERIFYING`]) and per address
//! ([`MAX_VERIFYING_PER_PEER`]). A request that is not DCV's form gets an
//! HTTP error (405, 415, 413, 408, 503), still with an `<auth result="no">`
//! body; anything in the form that is wrong, down to garbage tokens, gets
//! `result="no"` and HTTP 200. Nothing in a reply or the log repeats the
//! token.

use std::{
    borrow::Cow,
    collections::HashMap,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tower::Service;

use crate::{fleet::Fleet, limits::ClientKey};

/// The verifier's path, as DCV Session Manager's broker serves it.
pub const VERIFIER_PATH: &str = "/agent/validate-authentication-token";

/// Largest form read. DCV's form is a session id (at most 256 bytes here),
/// a token (a few hundred bytes) and an address: well under 1 KiB, even
/// percent-encoded. Over it: HTTP 413, without reading the rest.
pub const MAX_FORM_BYTES: usize = 8 * 1024;

/// Longest a request may take to deliver its form. A DCV server sends its
/// few hundred bytes at once; a client trickling them is holding a slot.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests being read or checked at once, across all connections; one
/// more is answered 503 with `Retry-After` at once. A check takes
/// microseconds (an HMAC and one map lookup), so this is only ever reached
/// by clients that hold their requests open; it bounds the memory they
/// hold to `MAX_VERIFYING * MAX_FORM_BYTES` (2 MiB).
pub const MAX_VERIFYING: usize = 256;

/// Of [`MAX_VERIFYING`], how many one address (an IPv6 /64) may hold, so
/// that one peer trickling forms cannot lock every DCV server out. A DCV
/// server asks once per connecting client: 32 at once from one host is a
/// burst of logins.
pub const MAX_VERIFYING_PER_PEER: usize = 32;

/// The longest field values taken. `sessionId`'s bound is the domain's
/// (longer ids name no session); the token's fits any token this broker
/// issues (a 256-byte session id, a 256-character user name and an
/// expiry, base64, plus a MAC: under 2 KiB); an address with a port and an
/// IPv6 zone fits in 128.
const MAX_SESSION_ID_BYTES: usize = crate::fleet::sessions::MAX_SESSION_ID_BYTES;
const MAX_TOKEN_BYTES: usize = 4 * 1024;
const MAX_CLIENT_ADDRESS_BYTES: usize = 128;

/// The verifier. Cheap to clone; clones share the budget.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    fleet: Fleet,
    budget: Arc<Budget>,
}

#[derive(Debug)]
struct Budget {
    verifying: Arc<Semaphore>,
    max_per_peer: usize,
    /// Requests in progress per address. Entries exist only while a
    /// request holds one of [`MAX_VERIFYING`] permits, so the map never
    /// holds more than that many.
    per_peer: Mutex<HashMap<ClientKey, usize>>,
    refused: AtomicU64,
}

/// A request's share of the budget, given back on drop.
struct Slot {
    budget: Arc<Budget>,
    peer: ClientKey,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_peer = self.budget.per_peer.lock();
        if let Some(count) = per_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

impl TokenVerifier {
    /// Verifies tokens against `fleet`'s sessions and its token key.
    pub fn new(fleet: Fleet) -> TokenVerifier {
        TokenVerifier {
            fleet,
            budget: Budget::new(MAX_VERIFYING, MAX_VERIFYING_PER_PEER),
        }
    }
}

impl Budget {
    fn new(total: usize, per_peer: usize) -> Arc<Budget> {
        Arc::new(Budget {
            verifying: Arc::new(Semaphore::new(total)),
            max_per_peer: per_peer,
            per_peer: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
        })
    }

    /// A slot for a request from `peer`, or the reason there is none.
    fn slot(self: &Arc<Budget>, peer: ClientKey) -> Result<Slot, &'static str> {
        let permit = Arc::clone(&self.verifying)
            .try_acquire_owned()
            .map_err(|_| "too many token verifications in progress; retry shortly")?;
        let mut per_peer = self.per_peer.lock();
        let count = per_peer.entry(peer.clone()).or_insert(0);
        if *count >= self.max_per_peer {
            return Err("too many token verifications in progress from this address");
        }
        *count += 1;
        drop(per_peer);
        Ok(Slot {
            budget: Arc::clone(self),
            peer,
            _permit: permit,
        })
    }
}

impl Service<http::Request<Body>> for TokenVerifier {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let verifier = self.clone();
        Box::pin(async move { Ok(verify(&verifier, request).await) })
    }
}

/// What the form said, once it is DCV's form.
struct Form {
    session_id: String,
    token: String,
    client_address: String,
}

async fn verify(verifier: &TokenVerifier, request: http::Request<Body>) -> http::Response<Body> {
    if request.method() != Method::POST {
        let mut response = no(
            StatusCode::METHOD_NOT_ALLOWED,
            "the token verifier takes POST",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    if !is_form(request.headers()) {
        return no(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the form as application/x-www-form-urlencoded",
        );
    }
    let declared_too_long = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|length| length > MAX_FORM_BYTES as u64);
    if declared_too_long {
        return too_large();
    }
    let peer_addr = crate::transport::peer_addr(request.extensions());
    let _slot = match verifier.budget.slot(ClientKey::of(request.extensions())) {
        Ok(slot) => slot,
        Err(why) => {
            // Worth seeing, but not once per request of a flood.
            let refused = verifier.budget.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if crate::limits::worth_a_warning(refused) {
                tracing::warn!(peer = ?peer_addr, refused, "token verification refused: {why}");
            } else {
                tracing::debug!(peer = ?peer_addr, "token verification refused: {why}");
            }
            let mut response = no(StatusCode::SERVICE_UNAVAILABLE, why);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
    };
    let body = Limited::new(request.into_body(), MAX_FORM_BYTES).collect();
    let body = match tokio::time::timeout(READ_TIMEOUT, body).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
        Ok(Err(_)) => return no(StatusCode::BAD_REQUEST, "the form could not be read"),
        Err(_) => {
            return no(
                StatusCode::REQUEST_TIMEOUT,
                "the form did not arrive in time",
            );
        }
    };
    let form = match parse_form(&body) {
        Ok(form) => form,
        Err(why) => {
            tracing::debug!(peer = ?peer_addr, "token refused: {why}");
            return answer(Err(why));
        }
    };
    let verdict = verifier
        .fleet
        .verify_connection_token(&form.session_id, &form.token)
        .map_err(Cow::Owned);
    match &verdict {
        Ok(user) => tracing::debug!(
            session_id = ?form.session_id,
            client_address = ?form.client_address,
            peer = ?peer_addr,
            user = ?user,
            "token accepted"
        ),
        Err(why) => tracing::debug!(
            session_id = ?form.session_id,
            client_address = ?form.client_address,
            peer = ?peer_addr,
            "token refused: {why}"
        ),
    }
    answer(verdict)
}

/// `application/x-www-form-urlencoded`, parameters (a charset) allowed.
fn is_form(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| {
            essence
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// DCV's three fields, each once, within bounds, UTF-8. Other fields are
/// ignored, as a later DCV may send more.
fn parse_form(body: &[u8]) -> Result<Form, Cow<'static, str>> {
    // form_urlencoded decodes lossily; a form that is not UTF-8 before or
    // after percent-decoding is refused rather than guessed at.
    if std::str::from_utf8(body).is_err() {
        return Err("the form is not UTF-8".into());
    }
    let mut session_id = None;
    let mut token = None;
    let mut client_address = None;
    for pair in body.split(|&b| b == b'&').filter(|pair| !pair.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        let (slot, max, field) = match &*decode(name)? {
            "sessionId" => (&mut session_id, MAX_SESSION_ID_BYTES, "sessionId"),
            "authenticationToken" => (&mut token, MAX_TOKEN_BYTES, "authenticationToken"),
            "clientAddress" => (
                &mut client_address,
                MAX_CLIENT_ADDRESS_BYTES,
                "clientAddress",
            ),
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!("{field} is given more than once").into());
        }
        let value = decode(value)?;
        if value.len() > max {
            return Err(format!("{field} is longer than {max} bytes").into());
        }
        *slot = Some(value);
    }
    let required = |value: Option<String>, field: &str| {
        value
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Cow::Owned(format!("{field} is missing")))
    };
    Ok(Form {
        session_id: required(session_id, "sessionId")?,
        token: required(token, "authenticationToken")?,
        // Informational: DCV sends it, but nothing depends on it.
        client_address: client_address.unwrap_or_default(),
    })
}

/// One form-encoded name or value: `+` is a space, `%XX` a byte (a `%`
/// not followed by two hex digits is itself), and the bytes must be UTF-8.
/// (form_urlencoded would replace bad UTF-8 rather than refuse it.)
fn decode(raw: &[u8]) -> Result<String, Cow<'static, str>> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while let Some((&first, tail)) = rest.split_first() {
        rest = tail;
        match first {
            b'+' => bytes.push(b' '),
            b'%' => match tail {
                [high, low, after @ ..] if high.is_ascii_hexdigit() && low.is_ascii_hexdigit() => {
                    bytes.push(hex(*high) << 4 | hex(*low));
                    rest = after;
                }
                _ => bytes.push(b'%'),
            },
            byte => bytes.push(byte),
        }
    }
    String::from_utf8(bytes).map_err(|_| "the form is not UTF-8".into())
}

/// The value of an ASCII hex digit (checked by the caller).
fn hex(digit: u8) -> u8 {
    char::from(digit).to_digit(16).unwrap_or(0) as u8
}

/// The XML answer with HTTP 200: yes with the user, or no with why.
fn answer(verdict: Result<String, Cow<'static, str>>) -> http::Response<Body> {
    match verdict {
        Ok(user) => match escape_xml(&user) {
            Some(user) => xml(
                StatusCode::OK,
                format!("<auth result=\"yes\"><username>{user}</username></auth>"),
            ),
            // Unreachable for names the broker accepts (no control
            // characters), but a name XML cannot carry is no name.
            None => no(StatusCode::OK, "the user name cannot be expressed in XML"),
        },
        Err(why) => no(StatusCode::OK, &why),
    }
}

fn too_large() -> http::Response<Body> {
    no(
        StatusCode::PAYLOAD_TOO_LARGE,
        "the form is larger than 8 KiB",
    )
}

/// DCV's no, with `status`: 200 for a verdict, an HTTP error for a request
/// that is not DCV's (which still reads as a no).
fn no(status: StatusCode, why: &str) -> http::Response<Body> {
    let why = escape_xml(why).unwrap_or_else(|| "refused".to_owned());
    xml(
        status,
        format!("<auth result=\"no\"><message>{why}</message></auth>"),
    )
}

fn xml(status: StatusCode, body: String) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `text` as XML character data or attribute value: the five special
/// characters escaped. `None` when `text` holds a character XML 1.0 cannot
/// carry even escaped (most control characters, U+FFFE, U+FFFF).
pub fn escape_xml(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> Result<Form, String> {
        parse_form(body.as_bytes()).map_err(|e| e.into_owned())
    }

    #[test]
    fn the_form_takes_dcvs_three_fields_decoded() {
        let f = form("sessionId=s%201&authenticationToken=a.b%2Bc&clientAddress=10.0.0.1%3A5&x=y")
            .unwrap();
        assert_eq!(f.session_id, "s 1");
        assert_eq!(f.token, "a.b+c");
        assert_eq!(f.client_address, "10.0.0.1:5");
        // `+` is a space; a stray `%` is itself; the address is optional.
        let f = form("authenticationToken=t&sessionId=a+b%zz%4").unwrap();
        assert_eq!(f.session_id, "a b%zz%4");
        assert_eq!(f.client_address, "");
    }

    #[test]
    fn a_wrong_form_says_why_without_the_token() {
        let secret = "SECRET-TOKEN";
        for (body, why) in [
            ("authenticationToken=SECRET-TOKEN", "sessionId is missing"),
            ("sessionId=s", "authenticationToken is missing"),
            (
                "sessionId=s&authenticationToken=",
                "authenticationToken is missing",
            ),
            (
                "sessionId=s&sessionId=t&authenticationToken=SECRET-TOKEN",
                "sessionId is given more than once",
            ),
            (
                "sessionId=s&authenticationToken=SECRET-TOKEN&authenticationToken=x",
                "authenticationToken is given more than once",
            ),
            (
                "sessionId=s&authenticationToken=%FF%FE",
                "the form is not UTF-8",
            ),
        ] {
            let err = form(body).err().unwrap_or_else(|| panic!("{body} passed"));
            assert_eq!(err, why, "{body}");
            assert!(!err.contains(secret));
        }
        let long = format!("sessionId=s&authenticationToken={}", "A".repeat(5000));
        assert_eq!(
            form(&long).err().unwrap(),
            "authenticationToken is longer than 4096 bytes"
        );
        let long = format!("sessionId={}&authenticationToken=t", "s".repeat(257));
        assert_eq!(
            form(&long).err().unwrap(),
            "sessionId is longer than 256 bytes"
        );
        assert_eq!(
            parse_form(b"sessionId=\xff&authenticationToken=t")
                .err()
                .unwrap(),
            "the form is not UTF-8"
        );
    }

    #[test]
    fn xml_special_characters_are_escaped_and_the_unsayable_refused() {
        assert_eq!(
            escape_xml(r#"a<b>&"c'd é"#).unwrap(),
            "a&lt;b&gt;&amp;&quot;c&apos;d é"
        );
        assert_eq!(escape_xml("tab\there").unwrap(), "tab\there");
        assert_eq!(escape_xml("bell\u{7}"), None);
        assert_eq!(escape_xml("\u{FFFF}"), None);
    }

    #[tokio::test]
    async fn answers_are_dcvs_xml() {
        let body = |response: http::Response<Body>| async move {
            assert_eq!(response.headers()[header::CONTENT_TYPE], "text/xml");
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(bytes.to_vec()).unwrap()
        };
        assert_eq!(
            body(answer(Ok("x<&\"'y".into()))).await,
            r#"<auth result="yes"><username>x&lt;&amp;&quot;&apos;y</username></auth>"#
        );
        assert_eq!(
            body(answer(Err("the token has <expired>".into()))).await,
            r#"<auth result="no"><message>the token has &lt;expired&gt;</message></auth>"#
        );
        assert_eq!(
            body(answer(Ok("bell\u{7}".into()))).await,
            r#"<auth result="no"><message>the user name cannot be expressed in XML</message></auth>"#
        );
    }

    #[test]
    fn one_peer_cannot_take_every_slot_and_slots_come_back() {
        let budget = Budget::new(3, 2);
        let peer = |last: u8| ClientKey::from_ip(Some([10, 0, 0, last].into()));
        let a1 = budget.slot(peer(1)).unwrap();
        let a2 = budget.slot(peer(1)).unwrap();
        assert!(budget.slot(peer(1)).is_err());
        let b1 = budget.slot(peer(2)).unwrap();
        assert!(budget.slot(peer(3)).is_err(), "all 3 slots are taken");
        drop(a1);
        let a3 = budget.slot(peer(1)).unwrap();
        drop((a2, a3, b1));
        assert!(budget.per_peer.lock().is_empty());
        assert_eq!(budget.verifying.available_permits(), 3);
    }

    #[test]
    fn only_forms_are_forms() {
        let with = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
            is_form(&headers)
        };
        assert!(with("application/x-www-form-urlencoded"));
        assert!(with("Application/X-WWW-Form-Urlencoded; charset=UTF-8"));
        assert!(!with("application/json"));
        assert!(!with("application/x-www-form-urlencodedx"));
        assert!(!is_form(&http::HeaderMap::new()));
    }
}
