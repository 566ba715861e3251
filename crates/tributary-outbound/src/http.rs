//! One signed POST to one endpoint, and what came back.
//!
//! The signature is the Standard Webhooks one, made by that project's library: `webhook-id`
//! (the delivery id), `webhook-timestamp` (Unix seconds) and `webhook-signature`
//! (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per secret, space-separated, during
//! a key rotation).
//!
//! The timestamp is the sending machine's wall clock, not the runtime's: it is not business
//! time but a freshness proof that the receiver checks against its own clock (five minutes of
//! tolerance), and the runtime's clock may be days ahead in a test or the demo.

use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use standardwebhooks::{HEADER_WEBHOOK_ID, HEADER_WEBHOOK_SIGNATURE, HEADER_WEBHOOK_TIMESTAMP, Webhook};

use crate::settings::{EndpointSettings, Secret, redacted_url};

/// The media type of a CloudEvent in structured mode (CloudEvents HTTP binding).
pub const CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";
/// How much of an answer's body is kept for the operator.
pub const BODY_EXCERPT_BYTES: usize = 512;

/// Signs with every configured secret.
pub struct Signer {
    keys: Vec<Webhook>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({} keys)", self.keys.len())
    }
}

impl Signer {
    /// A signer over `secrets` (`whsec_...`, already validated by the settings).
    pub fn new(secrets: &[Secret]) -> Result<Self, String> {
        let keys = secrets
            .iter()
            .enumerate()
            .map(|(index, secret)| {
                Webhook::new(secret.expose())
                    .map_err(|_| format!("secret {} is not a Standard Webhooks secret", index + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err("no secret".into());
        }
        Ok(Self { keys })
    }

    /// The three Standard Webhooks headers of `body` sent as `id` at `timestamp` (Unix seconds).
    pub fn headers(&self, id: &str, timestamp: i64, body: &str) -> [(&'static str, String); 3] {
        let signatures: Vec<String> = self
            .keys
            .iter()
            .map(|key| key.sign(id, timestamp, body.as_bytes()).expect("a UTF-8 body always signs"))
            .collect();
        [
            (HEADER_WEBHOOK_ID, id.to_owned()),
            (HEADER_WEBHOOK_TIMESTAMP, timestamp.to_string()),
            (HEADER_WEBHOOK_SIGNATURE, signatures.join(" ")),
        ]
    }
}

/// An endpoint's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// What `Retry-After` asked for (seconds, or an HTTP date from now), if it was sent.
    pub retry_after: Option<Duration>,
    /// The start of the body, as text.
    pub body: String,
}

/// No answer at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The endpoint did not answer in time.
    #[error("timeout after {0:?}")]
    Timeout(Duration),
    /// No connection (refused, reset, DNS, TLS).
    #[error("connection failed: {0}")]
    Connect(String),
    /// Anything else on the way (a body cut short).
    #[error("request failed: {0}")]
    Other(String),
}

impl SendError {
    /// A bounded class, for metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Connect(_) => "connect",
            Self::Other(_) => "transport",
        }
    }
}

/// Sends one signed delivery; the relay's only way out. Implemented over HTTP by
/// [`HttpEndpoint`]; the relay's tests script it.
pub trait Transport: Send + Sync + 'static {
    /// POSTs `body` as delivery `id`, signed; the endpoint's answer or why there was none.
    fn send<'a>(&'a self, id: &'a str, body: &'a str) -> BoxFuture<'a, Result<Answer, SendError>>;
}

/// An endpoint over HTTPS (system roots) or local HTTP.
#[derive(Debug)]
pub struct HttpEndpoint {
    client: reqwest::Client,
    url: reqwest::Url,
    signer: Signer,
    timeout: Duration,
}

impl HttpEndpoint {
    /// A client for `settings`' URL, signing with its secrets.
    pub fn new(settings: &EndpointSettings) -> anyhow::Result<Self> {
        let secrets = settings.load_secrets().map_err(anyhow::Error::msg)?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("tributary-outbound/", env!("CARGO_PKG_VERSION")))
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            // A redirected POST may become a GET; the configured URL must be the final one.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let url = reqwest::Url::parse(&settings.url)
            .map_err(|e| anyhow::anyhow!("endpoint {}: url {}: {e}", settings.name, redacted_url(&settings.url)))?;
        Ok(Self { client, url, signer: Signer::new(&secrets).map_err(anyhow::Error::msg)?, timeout: settings.timeout })
    }
}

impl Transport for HttpEndpoint {
    fn send<'a>(&'a self, id: &'a str, body: &'a str) -> BoxFuture<'a, Result<Answer, SendError>> {
        Box::pin(async move {
            let timestamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            let mut request = self
                .client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
                .body(body.to_owned());
            for (name, value) in self.signer.headers(id, timestamp, body) {
                request = request.header(name, value);
            }
            let response = request.send().await.map_err(|e| self.classify(e))?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| parse_retry_after(value, SystemTime::now()));
            let bytes = response.bytes().await.unwrap_or_default();
            Ok(Answer { status, retry_after, body: excerpt(&bytes) })
        })
    }
}

impl HttpEndpoint {
    fn classify(&self, error: reqwest::Error) -> SendError {
        // The error's text names the URL, query string included: say what failed without it.
        let error = error.without_url();
        if error.is_timeout() {
            SendError::Timeout(self.timeout)
        } else if error.is_connect() {
            let mut reason = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                reason = format!("{reason}: {cause}");
                source = cause.source();
            }
            SendError::Connect(reason)
        } else {
            SendError::Other(error.to_string())
        }
    }
}

/// At most [`BODY_EXCERPT_BYTES`] of `bytes`, as text, cut at a character boundary.
pub fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(BODY_EXCERPT_BYTES)]).into_owned();
    text.trim_end_matches('\u{fffd}').trim().to_owned()
}

/// `Retry-After` as a wait: delay-seconds, or an HTTP date (RFC 9110) after `now`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(at.timestamp_millis()).ok()?);
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_secret_signs_and_the_projects_own_verifier_accepts_either() {
        let old = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let new = "whsec_bmV3LXNlY3JldC1vZi0yNC1ieXRlcy1hdC1sZWFzdA==";
        let settings =
            EndpointSettings { name: "x".into(), secrets: vec![new.into(), old.into()], ..Default::default() };
        let signer = Signer::new(&settings.load_secrets().unwrap()).unwrap();
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        let body = r#"{"specversion":"1.0","data":{"amount":"12.50"}}"#;
        let headers = signer.headers("msg_1", now, body);
        assert_eq!(headers[2].1.split(' ').count(), 2, "one signature per secret");
        let mut map = http::HeaderMap::new();
        for (name, value) in &headers {
            map.insert(*name, value.parse().unwrap());
        }
        for secret in [old, new] {
            Webhook::new(secret).unwrap().verify(body.as_bytes(), &map).unwrap();
        }
        let stranger = Webhook::new("whsec_c3RyYW5nZXItc2VjcmV0LW9mLTI0LWJ5dGVz").unwrap();
        assert!(stranger.verify(body.as_bytes(), &map).is_err());
        assert!(Webhook::new(old).unwrap().verify(b"{}", &map).is_err(), "a changed body fails");
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_400); // 2015-10-21T07:26:40Z
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now), Some(Duration::from_secs(80)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO), "in the past");
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn an_excerpt_is_bounded_and_stays_text() {
        let long = "é".repeat(BODY_EXCERPT_BYTES);
        let cut = excerpt(long.as_bytes());
        assert!(cut.len() <= BODY_EXCERPT_BYTES && cut.chars().all(|c| c == 'é'), "{cut}");
    }
}
