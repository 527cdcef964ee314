//! Server-sent events framing as OpenAI streams use it: each chunk is one `data: <json>`
//! event, and the stream ends with `data: [DONE]`.
use axum::body::Bytes;
use serde::Serialize;

use super::error::ApiError;

/// One `data:` event holding `value` as JSON.
pub fn event<T: Serialize>(value: &T) -> Bytes {
    match serde_json::to_string(value) {
        Ok(json) => data(&json),
        Err(e) => error_event(&ApiError::internal(format!(
            "could not serialize a stream chunk: {e}"
        ))),
    }
}

/// A `data:` event with a preformatted JSON payload. JSON never holds a raw newline, so the
/// payload fits on one line as SSE requires.
pub fn data(json: &str) -> Bytes {
    let mut s = String::with_capacity(json.len() + 8);
    s.push_str("data: ");
    s.push_str(json);
    s.push_str("\n\n");
    Bytes::from(s)
}

/// An error in the middle of a stream (the status line has already gone out).
pub fn error_event(err: &ApiError) -> Bytes {
    data(&err.to_json())
}

pub fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// The response headers of a stream.
pub fn response(body: axum::body::Body) -> axum::response::Response {
    let mut resp = axum::response::Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-cache"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_single_data_lines() {
        let b = event(&serde_json::json!({"text": "a\nb"}));
        assert_eq!(&b[..], b"data: {\"text\":\"a\\nb\"}\n\n");
        assert_eq!(&done()[..], b"data: [DONE]\n\n");
        let e = error_event(&ApiError::internal("boom"));
        let s = std::str::from_utf8(&e).unwrap();
        assert!(
            s.starts_with("data: {\"error\":")
                && s.ends_with("\n\n")
                && s.matches('\n').count() == 2
        );
    }
}
