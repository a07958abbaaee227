//! The API-key check, as one middleware layer over the routes that need a key: a request passes to its handler
//! only with a key the server accepts, so that the handlers only handle.

use super::super::wire::WireError;
use super::routes::error;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::RequestPartsExt;
use std::sync::Arc;

/// The API keys a server accepts; with none, everyone is let in (the server then listens on loopback only).
#[derive(Clone)]
pub(super) struct Keys(Arc<Vec<String>>);

impl Keys {
    pub(super) fn new(keys: Vec<String>) -> Self {
        Keys(Arc::new(keys))
    }
}

/// The layer's function (`route_layer(from_fn_with_state(keys, require_key))` on each route that needs a key):
/// refuses a request without a key the server accepts (401, before its handler runs, its body unread), else
/// passes it on.
///
/// A path parameter that is not UTF-8 is refused first, whatever the key, with the answer of the handler's own `Path`
/// extractor (400, `Invalid URL: ..`): a malformed path is answered the same with a key or without.
pub(super) async fn require_key(State(keys): State<Keys>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    if let Err(PathRejection::FailedToDeserializePathParams(e)) = parts.extract::<Path<Vec<(String, String)>>>().await {
        if matches!(e.kind(), ErrorKind::InvalidUtf8InPathParam { .. }) {
            return e.into_response();
        }
    }
    if let Err(refused) = authorize(&keys, &parts.headers) {
        return *refused;
    }
    next.run(Request::from_parts(parts, body)).await
}

/// The key check: none configured lets everyone in (loopback only); otherwise the bearer key must be one of them.
/// Keys are compared in constant time and never logged.
fn authorize(keys: &Keys, headers: &HeaderMap) -> std::result::Result<(), Box<Response>> {
    if keys.0.is_empty() {
        return Ok(());
    }
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(given) = given else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            WireError::Unauthorized { message: "no API key (set NNSIGHT_API_KEY)".into() },
        )));
    };
    if keys.0.iter().any(|k| same(k.as_bytes(), given.as_bytes())) {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            WireError::Unauthorized { message: "the API key is not valid".into() },
        )))
    }
}

/// Equality without an early exit on the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
