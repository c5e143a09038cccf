//! Bounded line reading, shared by the server (requests) and the client (responses): a peer
//! that never sends a newline must cost at most `max` bytes of memory.

use std::io::{self, BufRead};

#[derive(Debug)]
pub(crate) enum LineError {
    /// The line is longer than the limit (the rest is left unread).
    TooLong,
    Io(io::Error),
}

/// Reads one line into `line` (without the newline and a trailing `\r`). Returns `Ok(false)` at
/// end of stream with nothing read; a last line without a newline counts as a line.
pub(crate) fn read_line<R: BufRead>(reader: &mut R, max: usize, line: &mut Vec<u8>) -> Result<bool, LineError> {
    line.clear();
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LineError::Io(e)),
        };
        if buf.is_empty() {
            return Ok(!line.is_empty());
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            return Err(LineError::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(if done { take + 1 } else { take });
        if done {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize, buf_cap: usize) -> Vec<Result<Vec<u8>, &'static str>> {
        let mut reader = io::BufReader::with_capacity(buf_cap, input);
        let mut out = Vec::new();
        let mut line = Vec::new();
        loop {
            match read_line(&mut reader, max, &mut line) {
                Ok(true) => out.push(Ok(line.clone())),
                Ok(false) => return out,
                Err(LineError::TooLong) => {
                    out.push(Err("too long"));
                    return out;
                }
                Err(LineError::Io(_)) => unreachable!("slices do not fail"),
            }
        }
    }

    #[test]
    fn splits_lines_across_buffer_refills() {
        for cap in [1, 2, 3, 64] {
            assert_eq!(
                lines(b"ab\r\ncd\n\nlast", 8, cap),
                vec![Ok(b"ab".to_vec()), Ok(b"cd".to_vec()), Ok(vec![]), Ok(b"last".to_vec())]
            );
        }
    }

    #[test]
    fn stops_at_the_limit() {
        for cap in [1, 4, 64] {
            assert_eq!(lines(b"12345678\n", 8, cap), vec![Ok(b"12345678".to_vec())]);
            assert_eq!(lines(b"123456789\nnext\n", 8, cap), vec![Err("too long")]);
            assert_eq!(lines(b"123456789", 8, cap), vec![Err("too long")]);
        }
    }
}
