//! Raw bytes both ways: a backend that records the exact bytes of every
//! request it receives (answering at once, then reading the body by
//! `Content-Length`, as a backend that a desync fools does) and a client
//! that writes a request head as given and reads one answer.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// One request as the backend read it.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// The head, request line included, up to the empty line.
    pub head: String,
    /// The body, as many bytes as its `Content-Length` said.
    pub body: Vec<u8>,
}

impl RawRequest {
    /// `GET /a HTTP/1.1`
    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    /// The path of the request line.
    pub fn path(&self) -> &str {
        self.request_line().split(' ').nth(1).unwrap_or("")
    }

    /// The values of every field called `name`, in order.
    pub fn headers(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers(name).into_iter().next()
    }
}

#[derive(Default)]
struct State {
    seen: Mutex<Vec<RawRequest>>,
    /// Header lines added to every answer, each ending in CRLF.
    extra: Mutex<String>,
}

/// A keep-alive HTTP/1.1 backend on 127.0.0.1 (port 0) that answers every
/// request `200` with the body `<path> #<n>` (n counts requests) and the
/// header lines set by [`RawBackend::answer_with`]. Stops on drop.
pub struct RawBackend {
    pub addr: SocketAddr,
    state: Arc<State>,
    cancel: CancellationToken,
}

impl RawBackend {
    pub async fn start() -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(State::default());
        *state.extra.lock().unwrap() = "cache-control: max-age=60\r\n".into();
        let cancel = CancellationToken::new();
        let (accept_state, accept_cancel) = (Arc::clone(&state), cancel.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    () = accept_cancel.cancelled() => return,
                };
                let state = Arc::clone(&accept_state);
                let cancel = accept_cancel.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = serve(stream, state) => {}
                        () = cancel.cancelled() => {}
                    }
                });
            }
        });
        RawBackend {
            addr,
            state,
            cancel,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Header lines (`name: value`) every later answer carries instead of
    /// the default `cache-control: max-age=60`.
    pub fn answer_with(&self, lines: &[&str]) {
        let mut extra = String::new();
        for line in lines {
            extra.push_str(line);
            extra.push_str("\r\n");
        }
        *self.state.extra.lock().unwrap() = extra;
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<RawRequest> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The requests received for `path`.
    pub fn seen_for(&self, path: &str) -> Vec<RawRequest> {
        self.seen()
            .into_iter()
            .filter(|r| r.path() == path)
            .collect()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Reads requests off one connection by their `Content-Length`, records
/// them and answers each.
async fn serve(mut stream: TcpStream, state: Arc<State>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let end = loop {
            if let Some(at) = find(&buf, b"\r\n\r\n") {
                break at + 4;
            }
            if !read_more(&mut stream, &mut buf, Duration::from_secs(30)).await {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut request = RawRequest {
            head: head.trim_end().to_string(),
            body: Vec::new(),
        };
        let length: usize = request
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        buf.drain(..end);
        let n = {
            let mut seen = state.seen.lock().unwrap();
            seen.push(request.clone());
            seen.len()
        };
        let body = format!("{} #{n}", request.path());
        let extra = state.extra.lock().unwrap().clone();
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n{extra}\r\n{body}",
            body.len()
        );
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        // The body, by its Content-Length: bytes the proxy never sent are
        // taken from whatever comes next on this connection (the next
        // request), which is what a desync does to a real backend.
        while buf.len() < length {
            if !read_more(&mut stream, &mut buf, Duration::from_secs(5)).await {
                return;
            }
        }
        request.body = buf.drain(..length).collect();
        state.seen.lock().unwrap()[n - 1].body = request.body;
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, limit: Duration) -> bool {
    let mut chunk = [0u8; 4096];
    match tokio::time::timeout(limit, stream.read(&mut chunk)).await {
        Ok(Ok(n)) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One answer read off a raw connection.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawAnswer {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` (bytes as given) on a new connection to `addr` and reads
/// one answer: its head, and a body framed by `Content-Length` or chunked
/// (the chunks' data), or read until the connection closes.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> RawAnswer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    read_answer(&mut stream, request.starts_with(b"HEAD ")).await
}

/// Reads one answer off `stream` (see [`exchange`]); an answer to a HEAD
/// request has no body, whatever its head says.
pub async fn read_answer(stream: &mut TcpStream, head_request: bool) -> RawAnswer {
    let limit = Duration::from_secs(10);
    let mut buf = Vec::new();
    let end = loop {
        if let Some(at) = find(&buf, b"\r\n\r\n") {
            break at + 4;
        }
        assert!(
            read_more(stream, &mut buf, limit).await,
            "the connection ended before an answer's head: {:?}",
            String::from_utf8_lossy(&buf)
        );
    };
    let head = String::from_utf8_lossy(&buf[..end]).trim_end().to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an answer: {head:?}"));
    let mut answer = RawAnswer {
        status,
        head,
        body: Vec::new(),
    };
    let mut rest = buf.split_off(end);
    if head_request {
        return answer;
    }
    if let Some(length) = answer
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        while rest.len() < length && read_more(stream, &mut rest, limit).await {}
        rest.truncate(length);
        answer.body = rest;
    } else if answer
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        while find(&rest, b"0\r\n\r\n").is_none() && read_more(stream, &mut rest, limit).await {}
        answer.body = dechunk(&rest);
    } else if status >= 200 && status != 204 && status != 304 {
        while read_more(stream, &mut rest, Duration::from_secs(2)).await {}
        answer.body = rest;
    }
    answer
}

fn dechunk(mut bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = find(bytes, b"\r\n") {
        let size = std::str::from_utf8(&bytes[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        let Some(data) = bytes.get(start..start + size) else {
            break;
        };
        out.extend_from_slice(data);
        bytes = bytes.get(start + size + 2..).unwrap_or(&[]);
    }
    out
}
