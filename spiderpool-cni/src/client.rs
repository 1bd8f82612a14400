//! A minimal HTTP/1.1 client over the agent's unix socket: one request, `Connection: close`,
//! `Content-Length` or chunked answers. Blocking `std` I/O keeps the plugin free of an async
//! runtime (it starts, asks once and exits).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use spiderpool_core::api::{ApiError, ErrorKind};

/// Largest answer read from the agent.
const MAX_ANSWER: u64 = 64 << 20;

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket file: no agent runs on this node (or the path is wrong).
    #[error("agent socket {path} does not exist: is spiderpool-agent running on this node, and does ipam_unix_socket_path point at its --socket?")]
    NoSocket {
        /// The path.
        path: String,
    },
    /// The socket exists but nobody answers (agent stopped or restarting), or the exchange broke.
    #[error("cannot reach spiderpool-agent at {path}: {source}")]
    Unreachable {
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The agent answered with an error.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The agent's answer could not be read.
    #[error("unreadable answer from spiderpool-agent at {path}: {message}")]
    BadAnswer {
        /// The path.
        path: String,
        /// What was wrong.
        message: String,
    },
}

impl ClientError {
    /// As an API error (what the plugin maps to a CNI code).
    pub fn into_api(self) -> ApiError {
        match self {
            ClientError::Api(e) => e,
            e @ (ClientError::NoSocket { .. } | ClientError::Unreachable { .. }) => {
                ApiError::new(ErrorKind::Unavailable, e.to_string())
            }
            e @ ClientError::BadAnswer { .. } => ApiError::new(ErrorKind::Internal, e.to_string()),
        }
    }
}

/// `method path` with a JSON body (or none) to the agent at `socket`; decodes the JSON answer.
pub fn call<B: Serialize, T: DeserializeOwned>(
    socket: &str,
    method: &str,
    path: &str,
    body: Option<&B>,
    timeout: Duration,
) -> Result<T, ClientError> {
    let (status, bytes) = exchange(socket, method, path, body, timeout)?;
    let bad = |message: String| ClientError::BadAnswer {
        path: socket.to_string(),
        message,
    };
    if (200..300).contains(&status) {
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("status {status}: {e}")))
    } else {
        match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) => Err(ClientError::Api(e)),
            Err(_) => Err(bad(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            ))),
        }
    }
}

/// Sends one request; returns the status and the body.
pub fn exchange<B: Serialize>(
    socket: &str,
    method: &str,
    path: &str,
    body: Option<&B>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), ClientError> {
    if !Path::new(socket).exists() {
        return Err(ClientError::NoSocket {
            path: socket.to_string(),
        });
    }
    let io = |source: std::io::Error| ClientError::Unreachable {
        path: socket.to_string(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let payload = match body {
        Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::BadAnswer {
            path: socket.to_string(),
            message: format!("cannot encode the request: {e}"),
        })?,
        None => Vec::new(),
    };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: spiderpool-agent\r\nConnection: close\r\nContent-Length: {}\r\n",
        payload.len()
    );
    if body.is_some() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).map_err(io)?;
    stream.write_all(&payload).map_err(io)?;
    stream.flush().map_err(io)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .map_err(io)?;
    if !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        // The agent went away mid-request (killed, restarting): the outcome is unknown, and a
        // retry is safe (ADD is idempotent per container and interface).
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "the agent closed the connection after {} bytes, before answering",
                answer.len()
            ),
        )));
    }
    parse_response(&answer).map_err(|message| ClientError::BadAnswer {
        path: socket.to_string(),
        message,
    })
}

/// Splits an HTTP/1.1 response into status and (de-chunked) body.
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line '{status_line}'"))?;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = v.parse().ok();
        }
    }
    if chunked {
        return dechunk(body).map(|b| (status, b));
    }
    let body = match length {
        Some(n) if n <= body.len() => body[..n].to_vec(),
        Some(n) => return Err(format!("body cut short: {} of {n} bytes", body.len())),
        None => body.to_vec(),
    };
    Ok((status, body))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line missing")?;
        let size_text = String::from_utf8_lossy(&body[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size '{size_text}'"))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            return Err("chunk cut short".into());
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_answers() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r), Ok((200, b"{}".to_vec())));
        let r = b"HTTP/1.1 409 Conflict\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(r), Ok((409, b"abcde".to_vec())));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}").is_err());
    }

    #[test]
    fn a_missing_socket_is_named() {
        let e = exchange::<()>(
            "/nonexistent/spiderpool.sock",
            "GET",
            "/v1/status",
            None,
            Duration::from_secs(1),
        )
        .expect_err("no socket");
        assert!(
            e.to_string()
                .contains("/nonexistent/spiderpool.sock does not exist"),
            "{e}"
        );
        assert_eq!(e.into_api().kind, ErrorKind::Unavailable);
    }
}
