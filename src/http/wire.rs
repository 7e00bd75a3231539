//! The connection's bytes on their way to the client, for two things hyper does not do itself:
//!
//! - **A client that does not read is let go.** hyper's only timer runs while it waits for a request's
//!   headers; while an answer cannot be written (a client that pipelines requests and never reads their
//!   answers) nothing would end the connection, and a handful of such clients would hold every slot of
//!   `http.max_connections`. Here a write (or flush, or shutdown) that makes no progress for
//!   [`WRITE_STALL`] fails, and so does one that has been behind for [`WRITE_BEHIND`] in all, however little
//!   it progresses now and then (a client that reads a byte every few seconds): hyper then closes the
//!   connection.
//! - **hyper's own error answers are JSON too.** A request hyper cannot parse (a garbled request line or
//!   header, conflicting `Content-Length`s, a version other than 1.x, headers over the limit) is answered by
//!   hyper before any route runs: a status (400, 414, 431) with `content-length: 0` and no content type, after
//!   which hyper closes the connection. No hook exists for it (hyper's `on_error` builds a bare head), so it
//!   is recognised here: an error status with an empty body and no content type is never the bridge's own
//!   (every error the router gives passes through [`super::limits::json_errors`]). It is hyper's last
//!   write on the connection, so it ends what is buffered; it is replaced by the same status with an
//!   `{"error": "..."}` body and `connection: close`.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long a write may make no progress before the connection is closed.
pub(crate) const WRITE_STALL: Duration = Duration::from_secs(10);

/// How long the answers may stay behind in all (from the first write the client did not take at once until
/// one is taken whole) before the connection is closed: an answer is at most a few tens of KiB.
pub(crate) const WRITE_BEHIND: Duration = Duration::from_secs(30);

/// The longest head hyper writes for its own error answers (a status line, `content-length` and `date`).
const MAX_BARE_HEAD: usize = 256;

/// A connection's IO with the write deadlines and the JSON for hyper's own error answers.
pub(crate) struct Wire<S> {
    inner: S,
    stall: Duration,
    behind: Duration,
    timer: Pin<Box<Sleep>>,
    /// Since when the pending write has made no progress.
    waiting_since: Option<Instant>,
    /// Since when the client has not taken a write whole.
    behind_since: Option<Instant>,
    /// The JSON answer that replaced hyper's, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<S> Wire<S> {
    pub(crate) fn new(inner: S) -> Wire<S> {
        Wire::with_deadlines(inner, WRITE_STALL, WRITE_BEHIND)
    }

    fn with_deadlines(inner: S, stall: Duration, behind: Duration) -> Wire<S> {
        Wire {
            inner,
            stall,
            behind,
            timer: Box::pin(tokio::time::sleep(WRITE_STALL)),
            waiting_since: None,
            behind_since: None,
            replacement: None,
        }
    }

    /// Bookkeeping of a write's outcome: `Some(whole)` when it took bytes (`whole`: all it was offered),
    /// None when it is pending. A pending write past either deadline becomes an error.
    fn account(&mut self, cx: &mut Context<'_>, took: Option<bool>) -> Poll<io::Result<()>> {
        let now = Instant::now();
        match took {
            Some(whole) => {
                self.waiting_since = None;
                if whole {
                    self.behind_since = None;
                } else {
                    self.behind_since.get_or_insert(now);
                }
                Poll::Ready(Ok(()))
            }
            None => {
                let waiting = *self.waiting_since.get_or_insert(now);
                let behind = *self.behind_since.get_or_insert(now);
                let deadline = (waiting + self.stall).min(behind + self.behind);
                if self.timer.deadline() != deadline {
                    self.timer.as_mut().reset(deadline);
                }
                ready!(self.timer.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not read the answer in time",
                )))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> Wire<S> {
    /// Writes what is left of the replacement answer; Ready once it is all out.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.replacement {
            if *done == bytes.len() {
                self.replacement = None;
                break;
            }
            let r = Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]);
            match r {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    *done += n;
                    let whole = *done == bytes.len();
                    ready!(self.account(cx, Some(whole)))?;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    ready!(self.account(cx, None))?;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// A write of `offered` bytes through `write`, with the deadlines.
    fn write_with(
        &mut self,
        cx: &mut Context<'_>,
        offered: usize,
        write: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        match write(Pin::new(&mut self.inner), cx) {
            Poll::Ready(Ok(n)) => {
                ready!(self.account(cx, Some(n == offered)))?;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                ready!(self.account(cx, None))?;
                Poll::Pending
            }
        }
    }

    /// Flush or shutdown of the inner IO, with the stall deadline.
    fn finish_with(
        &mut self,
        cx: &mut Context<'_>,
        finish: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<()>>,
    ) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        match finish(Pin::new(&mut self.inner), cx) {
            Poll::Ready(r) => {
                // hyper flushes once its buffer is written: the client has taken everything so far.
                self.waiting_since = None;
                self.behind_since = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                ready!(self.account(cx, None))?;
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Wire<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Wire<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match bare_error_head(buf) {
            // Taken whole at once; written by the flush (or shutdown) hyper does next, or by a later write.
            Some(0) => {
                ready!(this.drain(cx))?;
                this.replacement = Some((json_answer(buf), 0));
                Poll::Ready(Ok(buf.len()))
            }
            // What comes before it first, so that the head is seen whole on its own.
            Some(at) => this.write_with(cx, at, |s, cx| s.poll_write(cx, &buf[..at])),
            None => this.write_with(cx, buf.len(), |s, cx| s.poll_write(cx, buf)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // hyper puts a head in a buffer of its own and writes its error head with nothing queued after it:
        // when the last non-empty slice ends with one, the slices before it go first, one write at a time.
        let last = bufs.iter().rposition(|b| !b.is_empty());
        let first = bufs.iter().position(|b| !b.is_empty());
        if let (Some(last), Some(first)) = (last, first) {
            if bare_error_head(&bufs[last]).is_some() {
                return if first == last {
                    self.poll_write(cx, &bufs[last])
                } else {
                    self.poll_write(cx, &bufs[first])
                };
            }
        }
        let offered = bufs.iter().map(|b| b.len()).sum();
        self.write_with(cx, offered, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish_with(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish_with(cx, |s, cx| s.poll_shutdown(cx))
    }
}

/// Where the answer head that `buf` ends with starts, if it is one of hyper's own error answers: a complete
/// head with a status of 400 or more, `content-length: 0`, and neither a content type nor a transfer
/// encoding.
fn bare_error_head(buf: &[u8]) -> Option<usize> {
    if !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let from = buf.len().saturating_sub(MAX_BARE_HEAD);
    let tail = &buf[from..];
    // The head the buffer ends with starts right after the last blank line before its end, or at a status line.
    let start = (0..tail.len().saturating_sub(4))
        .rev()
        .find(|&i| tail[i..].starts_with(b"HTTP/1."))?;
    let head = std::str::from_utf8(&tail[start..]).ok()?;
    let head = head.strip_suffix("\r\n\r\n")?;
    if head.contains("\r\n\r\n") {
        return None;
    }
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    if status < 400 {
        return None;
    }
    let mut empty = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => empty = value.trim() == "0",
            "content-type" | "transfer-encoding" => return None,
            _ => {}
        }
    }
    empty.then_some(from + start)
}

/// The JSON answer in place of hyper's bare `head`: its status line, `{"error": reason}`, and the connection
/// closed (hyper closes it anyway).
fn json_answer(head: &[u8]) -> Vec<u8> {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("HTTP/1.1 400 Bad Request");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| axum::http::StatusCode::from_u16(s).ok())
        .unwrap_or(axum::http::StatusCode::BAD_REQUEST);
    let message = match status.as_u16() {
        400 => "malformed request".to_string(),
        431 => "request headers too large".to_string(),
        414 => "request target too long".to_string(),
        _ => status
            .canonical_reason()
            .map_or_else(|| format!("status {}", status.as_u16()), str::to_ascii_lowercase),
    };
    let body = serde_json::json!({ "error": message }).to_string();
    let date = lines
        .find(|l| l.to_ascii_lowercase().starts_with("date:"))
        .map(|l| format!("{l}\r\n"))
        .unwrap_or_default();
    format!(
        "{status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{date}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
