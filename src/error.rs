//! Errors in QEMU's shape: a QAPI error class, an errno where one applies,
//! and a human message that matches QEMU's text where QEMU has one.
//!
//! The class is what a QMP client sees as `{"error": {"class": …}}` and what
//! a C host reads with `bj_error_get_class`; the message is the `desc`.

use std::fmt;

/// QEMU's `QapiErrorClass`, in QEMU's order (the index is the C value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Everything that has no more specific class (almost all errors).
    GenericError,
    /// The QMP command does not exist.
    CommandNotFound,
    /// A device or job exists but is not active (`Block job 'x' not found`).
    DeviceNotActive,
    /// The named device or node does not exist.
    DeviceNotFound,
    /// A KVM capability is missing (never produced by this library; kept
    /// so the C values match QEMU's).
    KvmMissingCap,
}

impl ErrorClass {
    /// All classes in C-value order.
    pub const ALL: [ErrorClass; 5] = [
        ErrorClass::GenericError,
        ErrorClass::CommandNotFound,
        ErrorClass::DeviceNotActive,
        ErrorClass::DeviceNotFound,
        ErrorClass::KvmMissingCap,
    ];

    /// The QMP wire name (`"GenericError"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
        }
    }

    /// The C value (`BJ_ERROR_CLASS_*`).
    pub fn index(self) -> i32 {
        match self {
            ErrorClass::GenericError => 0,
            ErrorClass::CommandNotFound => 1,
            ErrorClass::DeviceNotActive => 2,
            ErrorClass::DeviceNotFound => 3,
            ErrorClass::KvmMissingCap => 4,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one error type of the library.
///
/// `errno` is set for I/O errors (positive, e.g. `libc::EIO`), and for
/// argument errors where the C API returns a negative errno.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    class: ErrorClass,
    errno: Option<i32>,
    message: String,
    /// QEMU's `error_append_hint`: more text for a human (a command line
    /// prints it on the lines after the message), never part of QMP's
    /// `desc`.
    hint: Option<String>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A `GenericError` with QEMU's text.
    pub fn generic(message: impl Into<String>) -> Self {
        Error {
            class: ErrorClass::GenericError,
            errno: None,
            message: message.into(),
            hint: None,
        }
    }

    /// An error of a given class.
    pub fn with_class(class: ErrorClass, message: impl Into<String>) -> Self {
        Error {
            class,
            errno: None,
            message: message.into(),
            hint: None,
        }
    }

    /// An I/O error whose message is `strerror(errno)`, as QEMU reports a
    /// failed request (`Input/output error`, `No space left on device`).
    pub fn from_errno(errno: i32) -> Self {
        Error {
            class: ErrorClass::GenericError,
            errno: Some(errno),
            message: strerror(errno),
            hint: None,
        }
    }

    /// An I/O error with a message of its own (e.g. with a path in front).
    pub fn errno_msg(errno: i32, message: impl Into<String>) -> Self {
        Error {
            class: ErrorClass::GenericError,
            errno: Some(errno),
            message: message.into(),
            hint: None,
        }
    }

    /// Attach an errno to an error.
    pub fn with_errno(mut self, errno: i32) -> Self {
        self.errno = Some(errno);
        self
    }

    /// The class.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// The errno, if the error carries one.
    pub fn errno(&self) -> Option<i32> {
        self.errno
    }

    /// The errno, or `EINVAL` for errors that are not about I/O: what the C
    /// API returns negated.
    pub fn errno_or_einval(&self) -> i32 {
        self.errno.unwrap_or(libc::EINVAL)
    }

    /// The message (QMP `desc`).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Add a line of hint (QEMU's `error_append_hint`, without its
    /// trailing newline).
    pub fn append_hint(mut self, hint: impl Into<String>) -> Self {
        let h = hint.into();
        self.hint = Some(match self.hint.take() {
            Some(old) => format!("{old}\n{h}"),
            None => h,
        });
        self
    }

    /// The hint, if any.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// The message and, on the following lines, the hint: what QEMU's
    /// tools print (`error_report_err`).
    pub fn pretty(&self) -> String {
        match &self.hint {
            Some(h) => format!("{}\n{h}", self.message),
            None => self.message.clone(),
        }
    }

    /// Prefix the message, keeping class and errno (QEMU's `error_prepend`).
    pub fn prepend(mut self, prefix: impl fmt::Display) -> Self {
        self.message = format!("{prefix}{}", self.message);
        self
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(errno) => Error::from_errno(errno),
            None => Error::errno_msg(libc::EIO, e.to_string()),
        }
    }
}

impl From<nix::errno::Errno> for Error {
    fn from(e: nix::errno::Errno) -> Self {
        Error::from_errno(e as i32)
    }
}

/// `strerror(errno)` as glibc words it, e.g. `Input/output error`.
///
/// std's `Display` for OS errors is `"<strerror text> (os error N)"`; the
/// suffix is cut so the text matches what QEMU prints.
pub fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    let suffix = format!(" (os error {errno})");
    match text.strip_suffix(&suffix) {
        Some(s) => s.to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_matches_glibc_texts_that_qemu_prints() {
        assert_eq!(strerror(libc::EIO), "Input/output error");
        assert_eq!(strerror(libc::ENOSPC), "No space left on device");
        assert_eq!(strerror(libc::ECANCELED), "Operation canceled");
    }

    #[test]
    fn io_error_keeps_errno_and_text() {
        let e: Error = std::io::Error::from_raw_os_error(libc::ENOENT).into();
        assert_eq!(e.errno(), Some(libc::ENOENT));
        assert_eq!(e.message(), "No such file or directory");
        assert_eq!(e.class(), ErrorClass::GenericError);
    }

    #[test]
    fn class_names_and_values_are_qemus() {
        let names: Vec<_> = ErrorClass::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names,
            [
                "GenericError",
                "CommandNotFound",
                "DeviceNotActive",
                "DeviceNotFound",
                "KVMMissingCap"
            ]
        );
        for (i, c) in ErrorClass::ALL.iter().enumerate() {
            assert_eq!(c.index(), i as i32);
        }
    }
}
