//! Byte-level reading and writing for the fixed-layout wire encodings.
//!
//! Integers are big-endian; variable-length fields carry a length prefix. A
//! [`Reader`] never panics: every read checks the remaining length first.

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside `field`.
    #[error("input ends inside field `{0}`")]
    Truncated(&'static str),
    /// `field` holds a value the encoding does not allow.
    #[error("field `{field}` is invalid: {why}")]
    Invalid {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Bytes are left over after the last field.
    #[error("{0} bytes after the end of the message")]
    TrailingBytes(usize),
}

/// A cursor over a byte slice.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(field));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    /// One byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    /// A big-endian u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    /// A big-endian u64.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// A presence flag: exactly 0 (absent) or 1 (present).
    pub fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid {
                field,
                why: "presence flag must be 0 or 1",
            }),
        }
    }

    /// Bytes with a one-byte length prefix.
    pub fn short_bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u8(field)?;
        self.take(n.into(), field)
    }

    /// Bytes with a four-byte length prefix.
    pub fn long_bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(field)?;
        let n = usize::try_from(n).map_err(|_| DecodeError::Truncated(field))?;
        self.take(n, field)
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails unless every byte has been read.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// Appends fields to a byte vector.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// A writer with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    /// Raw bytes, no prefix.
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// A big-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_be_bytes())
    }

    /// A big-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_be_bytes())
    }

    /// Bytes with a one-byte length prefix. The caller guarantees `b.len() <= 255`.
    pub fn short_bytes(&mut self, b: &[u8]) -> &mut Self {
        debug_assert!(b.len() <= usize::from(u8::MAX));
        self.u8(b.len() as u8).raw(b)
    }

    /// Bytes with a four-byte length prefix. The caller guarantees `b.len() <= u32::MAX`.
    pub fn long_bytes(&mut self, b: &[u8]) -> &mut Self {
        debug_assert!(u32::try_from(b.len()).is_ok());
        self.u32(b.len() as u32).raw(b)
    }

    /// An optional fixed-size field: a presence flag, then the bytes if present.
    pub fn optional(&mut self, b: Option<&[u8]>) -> &mut Self {
        match b {
            Some(b) => self.u8(1).raw(b),
            None => self.u8(0),
        }
    }

    /// The bytes written so far.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    /// The finished bytes.
    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }
}
