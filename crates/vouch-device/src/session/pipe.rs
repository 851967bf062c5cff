//! The byte pipe between a card reader and a POS app: frames of up to
//! [`FRAME_BYTES_MAX`] bytes, each preceded by its length as two big-endian bytes, over
//! anything that reads and writes bytes — a serial line, a Bluetooth socket, a child
//! process's stdin and stdout, or an in-memory pipe in tests.
//!
//! The pipe only moves frames; what they mean, and whether they are authentic, is the
//! session's to decide.

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame either side sends or accepts. A grant, the largest message of a
/// session, is under 1 KiB.
pub const FRAME_BYTES_MAX: usize = 16 * 1024;
const LENGTH_BYTES: usize = 2;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PipeError {
    /// The peer closed its end between frames.
    #[error("the peer closed the pipe")]
    Closed,
    /// The peer closed its end inside a frame.
    #[error("the pipe closed inside a frame: {got} of {expected} bytes")]
    Truncated { expected: usize, got: usize },
    /// A frame over the limit; received, it leaves the pipe unusable, since its bytes
    /// are not read.
    #[error("a frame of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("pipe IO: {0}")]
    Io(#[from] std::io::Error),
}

/// Frames over one reading and one writing half.
pub struct FramedPipe<R, W> {
    reader: R,
    writer: W,
}

impl<R, W> std::fmt::Debug for FramedPipe<R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramedPipe").finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> FramedPipe<R, W> {
    pub fn new(reader: R, writer: W) -> Self {
        FramedPipe { reader, writer }
    }

    /// Sends one frame and flushes it.
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), PipeError> {
        let len = u16::try_from(frame.len())
            .ok()
            .filter(|_| frame.len() <= FRAME_BYTES_MAX)
            .ok_or(PipeError::TooLarge { len: frame.len(), max: FRAME_BYTES_MAX })?;
        let mut bytes = Vec::with_capacity(LENGTH_BYTES + frame.len());
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(frame);
        self.writer.write_all(&bytes).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Waits for the next frame. [`PipeError::Closed`] when the peer has closed its
    /// end between frames.
    pub async fn receive(&mut self) -> Result<Vec<u8>, PipeError> {
        let mut prefix = [0u8; LENGTH_BYTES];
        match read_fully(&mut self.reader, &mut prefix).await? {
            0 => return Err(PipeError::Closed),
            LENGTH_BYTES => {}
            got => return Err(PipeError::Truncated { expected: LENGTH_BYTES, got }),
        }
        let len = usize::from(u16::from_be_bytes(prefix));
        if len > FRAME_BYTES_MAX {
            return Err(PipeError::TooLarge { len, max: FRAME_BYTES_MAX });
        }
        let mut frame = vec![0u8; len];
        let got = read_fully(&mut self.reader, &mut frame).await?;
        if got < len {
            return Err(PipeError::Truncated { expected: len, got });
        }
        Ok(frame)
    }

    /// Closes this side's writing end: the peer's next receive sees
    /// [`PipeError::Closed`].
    pub async fn close(&mut self) -> Result<(), PipeError> {
        Ok(self.writer.shutdown().await?)
    }

    pub fn into_parts(self) -> (R, W) {
        (self.reader, self.writer)
    }
}

/// Reads until `buf` is full or the stream ends; how many bytes were read.
async fn read_fully<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> Result<usize, std::io::Error> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        match reader.read(rest).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf, duplex, split};

    use super::*;

    type Half = FramedPipe<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>;

    fn pipes() -> (Half, Half) {
        let (a, b) = duplex(64 * 1024);
        let ((ar, aw), (br, bw)) = (split(a), split(b));
        (FramedPipe::new(ar, aw), FramedPipe::new(br, bw))
    }

    #[tokio::test]
    async fn frames_arrive_whole_and_in_order_until_the_peer_closes() {
        let (mut a, mut b) = pipes();
        let frames = [b"hello".to_vec(), Vec::new(), vec![7u8; FRAME_BYTES_MAX]];
        for frame in &frames {
            a.send(frame).await.unwrap();
        }
        a.close().await.unwrap();
        for frame in &frames {
            assert_eq!(&b.receive().await.unwrap(), frame);
        }
        assert!(matches!(b.receive().await, Err(PipeError::Closed)));
        // The other direction still works.
        b.send(b"back").await.unwrap();
        assert_eq!(a.receive().await.unwrap(), b"back");
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_both_ways() {
        let (mut a, mut b) = pipes();
        let too_big = vec![0u8; FRAME_BYTES_MAX + 1];
        assert!(matches!(a.send(&too_big).await, Err(PipeError::TooLarge { len, .. }) if len == FRAME_BYTES_MAX + 1));
        // A peer that announces more than the limit.
        let (_, mut raw) = a.into_parts();
        raw.write_all(&u16::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(b.receive().await, Err(PipeError::TooLarge { len: 65_535, .. })));
    }

    #[tokio::test]
    async fn a_pipe_closed_inside_a_frame_is_truncated() {
        for (bytes, expected, got) in [(vec![0x00], 2, 1), (vec![0x00, 0x05, b'a', b'b'], 5, 2)] {
            let (a, mut b) = pipes();
            let (_, mut raw) = a.into_parts();
            raw.write_all(&bytes).await.unwrap();
            raw.shutdown().await.unwrap();
            let result = b.receive().await;
            assert!(
                matches!(result, Err(PipeError::Truncated { expected: e, got: g }) if e == expected && g == got),
                "{bytes:?}: {result:?}"
            );
        }
    }
}
