//! sluice's own HTTP/1.1 client for plain-HTTP targets (the simulator, vLLM, Ollama,
//! llama.cpp): a stack of idle keep-alive connections per target, each request written in
//! one piece and its response read in the attempt's own future.
//!
//! hyper's client connection runs each connection as a task of its own and hands requests,
//! responses and bodies to it and back through channels, and builds each request's head
//! anew; on the unpaced benchmark against the simulator that machinery was about a sixth of
//! the client's CPU (perf). sluice sends one kind of request per target (`POST`, a JSON
//! body with a known length, the same headers) and reads whole responses, so its head is
//! laid out once per target and the connection is a socket and a buffer. Responses are
//! parsed by `httparse` (hyper's own parser) and may be framed by `content-length`,
//! `transfer-encoding: chunked` or the end of the connection; `1xx` heads are skipped.
//! HTTPS targets stay on hyper's client, which also speaks HTTP/2.

use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{HttpResponse, TransportError};

/// How long a new connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most headers a response may have.
const MAX_HEADERS: usize = 100;
/// The most bytes a response's head may take.
const MAX_HEAD: usize = 64 << 10;
/// How much is read at a time.
const READ_AT_LEAST: usize = 8 << 10;
/// The largest read buffer an idle connection keeps (one that grew for a large response
/// is let go).
const KEEP_BUFFER: usize = 256 << 10;

/// Idle connections to one plain-HTTP target, the last one used first.
pub(super) struct H1Pool {
    host: String,
    port: u16,
    idle: Mutex<Vec<Conn>>,
    max_idle: usize,
    /// Every request's header lines after the request line (`Host` first), each ending in
    /// CRLF, without `content-length`.
    headers: Vec<u8>,
}

/// One connection and what has been read from it but not yet used.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// How a response's body ends.
enum Framing {
    Length(usize),
    Chunked,
    Close,
}

/// Why reading a response failed, and whether its head had arrived.
enum ReadError {
    /// Nothing of a response arrived before the connection ended.
    Nothing(String),
    /// Part of the head, or a head that does not parse.
    Head(String),
    /// The head arrived with `status`, then the body broke.
    Body { status: u16, message: String },
}

impl H1Pool {
    /// A pool for `host:port` (an IPv6 literal without brackets) sending `headers` (name,
    /// value) with every request.
    pub(super) fn new(host: String, port: u16, headers: &HeaderMap, max_idle: usize) -> H1Pool {
        let mut lines = Vec::new();
        // `Host` first, as clients write it.
        for (name, value) in headers
            .iter()
            .filter(|(n, _)| **n == http::header::HOST)
            .chain(headers.iter().filter(|(n, _)| **n != http::header::HOST))
        {
            lines.extend_from_slice(name.as_str().as_bytes());
            lines.extend_from_slice(b": ");
            lines.extend_from_slice(value.as_bytes());
            lines.extend_from_slice(b"\r\n");
        }
        H1Pool {
            host,
            port,
            idle: Mutex::new(Vec::new()),
            max_idle,
            headers: lines,
        }
    }

    /// Sends `POST path` with `body` and reads the whole response. A request that a reused
    /// connection could not take (it had closed) is sent once more on a new connection.
    pub(super) async fn send(
        &self,
        path: &str,
        body: &[u8],
    ) -> Result<HttpResponse, TransportError> {
        let mut message = Vec::with_capacity(path.len() + self.headers.len() + body.len() + 48);
        message.extend_from_slice(b"POST ");
        message.extend_from_slice(path.as_bytes());
        message.extend_from_slice(b" HTTP/1.1\r\n");
        message.extend_from_slice(&self.headers);
        message.extend_from_slice(b"content-length: ");
        message.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        message.extend_from_slice(b"\r\n\r\n");
        message.extend_from_slice(body);

        let (mut conn, reused) = match self.checkout() {
            Some(conn) => (conn, true),
            None => (self.connect().await?, false),
        };
        if let Err(e) = conn.stream.write_all(&message).await {
            if !reused {
                return Err(TransportError::Dropped(format!("sending the request: {e}")));
            }
            // The idle connection had closed: nothing reached the server.
            conn = self.connect().await?;
            conn.stream
                .write_all(&message)
                .await
                .map_err(|e| TransportError::Dropped(format!("sending the request: {e}")))?;
        }
        drop(message);
        match conn.read_response().await {
            Ok((resp, keep)) => {
                if keep {
                    self.put(conn);
                }
                Ok(resp)
            }
            Err(ReadError::Nothing(m)) | Err(ReadError::Head(m)) => Err(TransportError::Dropped(m)),
            Err(ReadError::Body { status, message }) => {
                Err(TransportError::BodyCut { status, message })
            }
        }
    }

    /// The last idle connection that has not been closed or sent anything since.
    fn checkout(&self) -> Option<Conn> {
        loop {
            let mut conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if conn.idle_and_open() {
                return Some(conn);
            }
        }
    }

    /// A new connection.
    async fn connect(&self) -> Result<Conn, TransportError> {
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| {
            TransportError::Connect(format!("connecting to {}:{}: {e}", self.host, self.port))
        })?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    /// Keeps a connection whose response has been read, unless enough are idle.
    fn put(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }
}

impl Conn {
    /// Whether an idle connection can take a request: the server has neither closed it nor
    /// sent anything on it. Asks the kernel only when the runtime saw it become readable
    /// (a read that ends a response short of the buffer leaves it marked not readable).
    fn idle_and_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Reads more into the buffer; the count read (0 at the end of the connection).
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < READ_AT_LEAST {
            self.buf.reserve(READ_AT_LEAST);
        }
        self.stream.read_buf(&mut self.buf).await
    }

    /// Reads one whole response; with it, whether the connection can be used again.
    async fn read_response(&mut self) -> Result<(HttpResponse, bool), ReadError> {
        let (status, headers, framing, keep) = loop {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut head = httparse::Response::new(&mut slots);
            match head.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = head.code.unwrap_or(0);
                    if (100..200).contains(&status) && status != 101 {
                        // An interim response: the real one follows.
                        self.buf.drain(..len);
                        continue;
                    }
                    let parsed = parse_head(&head, status).map_err(ReadError::Head)?;
                    self.buf.drain(..len);
                    break parsed;
                }
                Ok(httparse::Status::Partial) => {
                    if self.buf.len() > MAX_HEAD {
                        return Err(ReadError::Head(format!(
                            "a response head of over {MAX_HEAD} bytes"
                        )));
                    }
                }
                Err(e) => {
                    return Err(ReadError::Head(format!(
                        "a response that is not HTTP/1.x: {e}"
                    )))
                }
            }
            let before = self.buf.len();
            match self.fill().await {
                Ok(0) if before == 0 => {
                    return Err(ReadError::Nothing(
                        "the connection closed before a response".into(),
                    ))
                }
                Ok(0) => {
                    return Err(ReadError::Head(
                        "the connection closed in the response's head".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) if before == 0 => return Err(ReadError::Nothing(e.to_string())),
                Err(e) => return Err(ReadError::Head(e.to_string())),
            }
        };
        let cut = |message: String| ReadError::Body { status, message };
        let body = match framing {
            Framing::Length(len) => {
                while self.buf.len() < len {
                    let had = self.buf.len();
                    self.fill_or(|| {
                        format!("the connection closed after {had} of {len} body bytes")
                    })
                    .await
                    .map_err(cut)?;
                }
                let body = Bytes::copy_from_slice(&self.buf[..len]);
                self.buf.drain(..len);
                body
            }
            Framing::Chunked => self.read_chunked().await.map_err(cut)?,
            Framing::Close => {
                loop {
                    match self.fill().await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => return Err(cut(e.to_string())),
                    }
                }
                Bytes::from(std::mem::take(&mut self.buf))
            }
        };
        // Bytes after the response were not asked for: the connection is not used again.
        let keep = keep && self.buf.is_empty();
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
        Ok((
            HttpResponse {
                status,
                headers,
                body,
            },
            keep,
        ))
    }

    /// A `transfer-encoding: chunked` body, with its trailers read and dropped.
    async fn read_chunked(&mut self) -> Result<Bytes, String> {
        let mut body = Vec::new();
        loop {
            let line = self.line().await?;
            let size_text = line.split(|&b| b == b';').next().unwrap_or_default();
            let size_text = std::str::from_utf8(size_text)
                .map_err(|_| "a chunk size that is not text".to_string())?
                .trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| format!("a bad chunk size {size_text:?}"))?;
            if size == 0 {
                // Trailers, up to an empty line.
                while !self.line().await?.is_empty() {}
                return Ok(Bytes::from(body));
            }
            while self.buf.len() < size + 2 {
                self.fill_or(|| format!("the connection closed in a chunk of {size} bytes"))
                    .await?;
            }
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err("a chunk without its CRLF".into());
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
    }

    /// The next CRLF-ended line, without its CRLF.
    async fn line(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(at) = memchr::memmem::find(&self.buf, b"\r\n") {
                let line = self.buf[..at].to_vec();
                self.buf.drain(..at + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                return Err("a chunk line too long".into());
            }
            self.fill_or(|| "the connection closed in a chunked body".into())
                .await?;
        }
    }

    /// [`Conn::fill`], where the end of the connection is the error `closed()`.
    async fn fill_or(&mut self, closed: impl FnOnce() -> String) -> Result<(), String> {
        match self.fill().await {
            Ok(0) => Err(closed()),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A response head's status, headers, body framing and whether the connection stays open.
fn parse_head(
    head: &httparse::Response<'_, '_>,
    status: u16,
) -> Result<(u16, HeaderMap, Framing, bool), String> {
    let mut headers = HeaderMap::with_capacity(head.headers.len());
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut close = head.version == Some(0);
    for h in head.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("a bad header name {:?}", h.name))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| format!("a bad value for header {:?}", h.name))?;
        if name == http::header::CONTENT_LENGTH {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| format!("a bad content-length {:?}", value))?;
            if length.is_some_and(|l| l != n) {
                return Err("two different content-lengths".into());
            }
            length = Some(n);
        } else if name == http::header::TRANSFER_ENCODING {
            // Chunked only when it is the last coding.
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == http::header::CONNECTION {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && head.version == Some(0) {
                    close = false;
                }
            }
        }
        headers.append(name, value);
    }
    let framing = if status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    let keep = !close && !matches!(framing, Framing::Close);
    Ok((status, headers, framing, keep))
}
