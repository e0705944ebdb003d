//! The body of every answer: a stored (or error) body in one piece, or a
//! stream passed through from the backend.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;

/// A response body. An enum rather than a boxed body, so a cache hit (the
/// `Full` case) costs no allocation.
pub enum ProxyBody {
    /// Stored (or error) bytes, handed out at most `FRAME` bytes at a time.
    Full(Bytes),
    Stream(BoxBody<Bytes, crate::upstream::BoxError>),
}

/// The most bytes of a stored body handed to hyper at once. Over HTTP/2,
/// hyper queues a whole frame it is given whatever the client's flow-control
/// window; in frames of this size it takes the next only when the client
/// reads, so a client that stops reading is seen (and dropped after
/// `--client-write-timeout`) instead of the whole body sitting in its
/// queue. Slices share the stored bytes: no copy.
const FRAME: usize = 256 * 1024;

impl ProxyBody {
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody::Full(bytes)
    }

    pub fn empty() -> ProxyBody {
        ProxyBody::Full(Bytes::new())
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = crate::upstream::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(bytes) => {
                if bytes.is_empty() {
                    return Poll::Ready(None);
                }
                let frame = bytes.split_to(bytes.len().min(FRAME));
                Poll::Ready(Some(Ok(Frame::data(frame))))
            }
            ProxyBody::Stream(stream) => Pin::new(stream).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(bytes) => bytes.is_empty(),
            ProxyBody::Stream(stream) => stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(bytes) => SizeHint::with_exact(bytes.len() as u64),
            ProxyBody::Stream(stream) => stream.size_hint(),
        }
    }
}
