//! Log lines put together by hand, for the one line per request (the access
//! log).
//!
//! `tracing-subscriber` turns every field into text through `fmt::Debug`
//! and a visitor, and formats the clock anew for each line: about 9,000
//! instructions for a `proxied` line (callgrind), a third more than proxying
//! the request itself. A line whose fields are known where it is written can
//! be put together directly, the way nginx writes its access log: the
//! timestamp's date and time formatted once per second, numbers by `itoa`,
//! strings copied. [`info`] writes the same text or JSON the subscriber would
//! (a test below holds the two together), into the same non-blocking queue,
//! so lines stay in order and a slow stdout still stalls nobody.
//!
//! Whether a line is wanted stays `tracing`'s decision: check
//! `tracing::enabled!(Level::INFO)` first, so `RUST_LOG` and `logLevel` apply.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_appender::non_blocking::NonBlocking;

use super::LogFormat;

/// Where [`info`] writes: set once by [`super::init`].
static SINK: OnceLock<Sink> = OnceLock::new();

struct Sink {
    writer: NonBlocking,
    style: Style,
}

/// How the subscriber writes lines, so these match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Style {
    pub format: LogFormat,
    /// Colours, for a person at a terminal (text only).
    pub ansi: bool,
}

pub(super) fn install(writer: NonBlocking, style: Style) {
    let _ = SINK.set(Sink { writer, style });
}

thread_local! {
    /// One buffer per thread, reused: no allocation per line but the queue's.
    static LINE: RefCell<Line> = RefCell::new(Line::default());
}

/// Writes one INFO line from `target`: `message`, then what `fields` adds.
/// Does nothing before [`super::init`] (in unit tests, say).
pub fn info(target: &str, message: &str, fields: impl FnOnce(&mut Line)) {
    let Some(sink) = SINK.get() else { return };
    LINE.with_borrow_mut(|line| {
        line.start(sink.style, SystemTime::now(), target, message);
        fields(line);
        line.finish(target);
        // The queue is lossy: a full queue drops the line, never blocks.
        let _ = sink.writer.clone().write_all(&line.buf);
    });
}

/// A line being written; its methods add one field each.
#[derive(Debug)]
pub struct Line {
    buf: Vec<u8>,
    style: Style,
    /// The second whose `YYYY-MM-DDTHH:MM:SS` is in `clock_text`.
    clock_second: u64,
    clock_text: String,
}

impl Default for Line {
    fn default() -> Line {
        Line {
            buf: Vec::with_capacity(256),
            style: Style {
                format: LogFormat::Text,
                ansi: false,
            },
            clock_second: u64::MAX,
            clock_text: String::new(),
        }
    }
}

// Escape codes as tracing-subscriber uses them.
const DIM: &str = "\x1b[2m";
const ITALIC: &str = "\x1b[3m";
const GREEN: &str = "\x1b[32m";
const RESET: &str = "\x1b[0m";

impl Line {
    /// A field whose value reads as a word: `method=GET` in text (as
    /// `tracing`'s `%value`), a string in JSON.
    pub fn display(&mut self, name: &str, value: &str) -> &mut Line {
        self.name(name);
        match self.style.format {
            LogFormat::Text => self.buf.extend_from_slice(value.as_bytes()),
            LogFormat::Json => self.json_string(value),
        }
        self
    }

    /// A string field: `path="/a b"` in text (quoted and escaped as Rust's
    /// `Debug` does), a string in JSON.
    pub fn str(&mut self, name: &str, value: &str) -> &mut Line {
        self.name(name);
        match self.style.format {
            LogFormat::Text => self.quoted(value),
            LogFormat::Json => self.json_string(value),
        }
        self
    }

    /// A number field.
    pub fn u64(&mut self, name: &str, value: u64) -> &mut Line {
        self.name(name);
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        self
    }

    fn start(&mut self, style: Style, now: SystemTime, target: &str, message: &str) {
        self.style = style;
        self.buf.clear();
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since_epoch.as_secs();
        if second != self.clock_second {
            self.clock_second = second;
            self.clock_text = jiff::Timestamp::from_second(second as i64)
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
                .strftime("%Y-%m-%dT%H:%M:%S")
                .to_string();
        }
        let mut micros = [b'.', 0, 0, 0, 0, 0, 0, b'Z'];
        let mut fraction = since_epoch.subsec_micros();
        for digit in micros[1..7].iter_mut().rev() {
            *digit = b'0' + (fraction % 10) as u8;
            fraction /= 10;
        }
        let buf = &mut self.buf;
        match style {
            Style {
                format: LogFormat::Json,
                ..
            } => {
                buf.extend_from_slice(b"{\"timestamp\":\"");
                buf.extend_from_slice(self.clock_text.as_bytes());
                buf.extend_from_slice(&micros);
                buf.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":");
                self.json_string(message);
            }
            Style { ansi: false, .. } => {
                buf.extend_from_slice(self.clock_text.as_bytes());
                buf.extend_from_slice(&micros);
                buf.extend_from_slice(b"  INFO ");
                buf.extend_from_slice(target.as_bytes());
                buf.extend_from_slice(b": ");
                buf.extend_from_slice(message.as_bytes());
            }
            Style { ansi: true, .. } => {
                let _ = write!(
                    buf,
                    "{DIM}{}{}{RESET} {GREEN} INFO{RESET} {DIM}{target}{RESET}{DIM}:{RESET} {message}",
                    self.clock_text,
                    String::from_utf8_lossy(&micros),
                );
            }
        }
    }

    fn finish(&mut self, target: &str) {
        if self.style.format == LogFormat::Json {
            self.buf.extend_from_slice(b",\"target\":");
            self.json_string(target);
            self.buf.push(b'}');
        }
        self.buf.push(b'\n');
    }

    fn name(&mut self, name: &str) {
        let buf = &mut self.buf;
        match self.style {
            Style {
                format: LogFormat::Json,
                ..
            } => {
                buf.extend_from_slice(b",\"");
                buf.extend_from_slice(name.as_bytes());
                buf.extend_from_slice(b"\":");
            }
            Style { ansi: false, .. } => {
                buf.push(b' ');
                buf.extend_from_slice(name.as_bytes());
                buf.push(b'=');
            }
            Style { ansi: true, .. } => {
                let _ = write!(buf, " {ITALIC}{name}{RESET}{DIM}={RESET}");
            }
        }
    }

    fn json_string(&mut self, value: &str) {
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.buf, value);
    }

    /// `value` as `{:?}` writes it, without `fmt` for the usual plain ASCII.
    fn quoted(&mut self, value: &str) {
        let plain = |b: &u8| (b' '..=b'~').contains(b) && *b != b'"' && *b != b'\\';
        if value.as_bytes().iter().all(plain) {
            self.buf.push(b'"');
            self.buf.extend_from_slice(value.as_bytes());
            self.buf.push(b'"');
        } else {
            let _ = write!(self.buf, "{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    const PATH: &str = "/caf\u{e9}/a b\"c\\d\te";

    /// What the subscriber, set up as `init` does, writes for the line.
    fn subscriber_line(style: Style) -> String {
        let out = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let out = out.clone();
            move || Capture(out.clone())
        };
        let subscriber = tracing_subscriber::registry().with(super::super::output(style, writer));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                target: "loadbalancer::proxy",
                method = %"GET",
                path = PATH,
                plain = "/healthz",
                status = 200u64,
                "proxied"
            );
        });
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn our_line(style: Style) -> String {
        let mut line = Line::default();
        line.start(style, SystemTime::now(), "loadbalancer::proxy", "proxied");
        line.display("method", "GET")
            .str("path", PATH)
            .str("plain", "/healthz")
            .u64("status", 200);
        line.finish("loadbalancer::proxy");
        String::from_utf8(line.buf).unwrap()
    }

    /// The line with its timestamp replaced, and the timestamp.
    fn without_timestamp(line: &str) -> (String, String) {
        let start = line.find("20").expect("a timestamp");
        let end = start + line[start..].find('Z').expect("a UTC timestamp") + 1;
        let stamp = line[start..end].to_string();
        (line.replacen(&stamp, "<time>", 1), stamp)
    }

    #[test]
    fn a_hand_written_line_reads_exactly_like_the_subscribers() {
        for format in [LogFormat::Text, LogFormat::Json] {
            for ansi in [false, true] {
                if format == LogFormat::Json && ansi {
                    continue;
                }
                let style = Style { format, ansi };
                let (ours, our_stamp) = without_timestamp(&our_line(style));
                let (theirs, their_stamp) = without_timestamp(&subscriber_line(style));
                assert_eq!(ours, theirs, "{style:?}");
                assert_eq!(
                    our_stamp.len(),
                    their_stamp.len(),
                    "{our_stamp} {their_stamp}"
                );
                let ours: jiff::Timestamp = our_stamp.parse().unwrap();
                let theirs: jiff::Timestamp = their_stamp.parse().unwrap();
                assert!(ours.duration_since(theirs).abs() < jiff::SignedDuration::from_secs(5));
            }
        }
    }

    #[test]
    fn the_timestamp_has_microseconds_and_follows_the_clock_across_seconds() {
        let mut line = Line::default();
        let style = Style {
            format: LogFormat::Text,
            ansi: false,
        };
        let at = |micros: u64| UNIX_EPOCH + std::time::Duration::from_micros(micros);
        line.start(style, at(1_700_000_000_000_042), "t", "m");
        assert!(
            line.buf
                .starts_with(b"2023-11-14T22:13:20.000042Z  INFO t: m")
        );
        line.start(style, at(1_700_000_001_999_999), "t", "m");
        assert!(
            line.buf
                .starts_with(b"2023-11-14T22:13:21.999999Z  INFO t: m")
        );
    }

    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
