//! An error as one line: its message and every cause after it.
//!
//! hyper's and kube's top-level messages ("client error (Connect)") do not
//! say what happened; the causes below them do. Both binaries log and show
//! errors this way, so it is written once.

use std::error::Error;
use std::fmt::Write as _;

/// The error and its causes, `: `-separated. A cause whose text the line
/// already ends with (a wrapper that repeats its source) is written once.
pub fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            let _ = write!(text, ": {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// The first error of type `E` in `error`'s chain of causes.
pub fn find<'a, E: Error + 'static>(error: &'a (dyn Error + 'static)) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<E>() {
            return Some(found);
        }
        next = current.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Outer(&'static str, #[source] std::io::Error);

    #[test]
    fn the_line_names_every_cause_once_and_the_cause_is_found() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let error = Outer("tcp connect error", io);
        assert_eq!(chain(&error), "tcp connect error: connection refused");
        let repeated = Outer(
            "connection refused",
            std::io::Error::other("connection refused"),
        );
        assert_eq!(chain(&repeated), "connection refused");
        assert!(find::<std::io::Error>(&error).is_some());
        assert!(find::<std::fmt::Error>(&error).is_none());
    }
}
