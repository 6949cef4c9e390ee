//! Oversized messages answer RESOURCE_EXHAUSTED, as the gRPC spec and other gRPC servers do,
//! with a message naming the limit. tonic reports them as OUT_OF_RANGE; this maps both paths:
//! the status a streaming handler sees, and the trailers-only response of a unary call.

use http::{HeaderValue, Response};
use tonic::{Code, Status};

/// tonic's words for a message over `max_decoding_message_size`.
const TONIC_TOO_LARGE: &str = "decoded message length too large";

fn is_too_large(code: Code, message: &str) -> bool {
    code == Code::OutOfRange && message.contains(TONIC_TOO_LARGE)
}

fn explain(message: &str) -> String {
    format!("message larger than grpc.max_message_bytes: {message}; send smaller batches")
}

/// Rewrites a decode status from a request stream.
pub fn map_status(status: Status) -> Status {
    if is_too_large(status.code(), status.message()) {
        Status::resource_exhausted(explain(status.message()))
    } else {
        status
    }
}

/// Rewrites a trailers-only response (a unary call whose request could not be decoded).
pub fn map_response<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32);
    let Some(code) = code else {
        return response;
    };
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.replace("%20", " "))
        .unwrap_or_default();
    if is_too_large(code, &message) {
        headers.insert(
            "grpc-status",
            HeaderValue::from(Code::ResourceExhausted as i32),
        );
        let explained = explain(&message).replace(' ', "%20");
        if let Ok(value) = HeaderValue::from_str(&explained) {
            headers.insert("grpc-message", value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_status_becomes_resource_exhausted() {
        let s = map_status(Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        ));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(
            s.message().contains("the limit is: 4 bytes"),
            "{}",
            s.message()
        );
        let other = map_status(Status::out_of_range("something else"));
        assert_eq!(other.code(), Code::OutOfRange);
    }

    #[test]
    fn trailers_only_response_becomes_resource_exhausted() {
        let response = Response::builder()
            .header("grpc-status", "11")
            .header(
                "grpc-message",
                "Error,%20decoded%20message%20length%20too%20large:%20found%209%20bytes,%20the%20limit%20is:%204%20bytes",
            )
            .body(())
            .expect("response");
        let mapped = map_response(response);
        assert_eq!(mapped.headers()["grpc-status"], "8");
        let message = mapped.headers()["grpc-message"].to_str().expect("ascii");
        assert!(message.contains("grpc.max_message_bytes"), "{message}");
    }
}
