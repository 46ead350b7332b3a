//! Usage errors in a shape a caller can match on: which option, which value, what it needed.

use super::{shown, shown_message, Error};

/// Something weightstream was asked to do that it cannot do as asked: a bad option value, an
/// option that this device, source or way of loading cannot honour, two options that exclude
/// each other... Carried by [`Error::Usage`]; its [`crate::ErrorKind`] is
/// [`crate::ErrorKind::Usage`], and it is never a silent downgrade.
///
/// Options are named as the [`crate::Loader`] method (and the Python keyword) that sets them:
/// `"staging_count"`, `"zero_copy"`, `"dtype"`, `"only"`, `"device"`...
///
/// ```
/// use weightstream::{Device, Error, UsageError};
/// let err = "tpu".parse::<Device>().unwrap_err();
/// assert!(matches!(err, Error::Usage(UsageError::BadOption { option: "device", .. })));
/// assert_eq!(err.to_string(), "device `tpu`: expected auto, cpu, null, cuda or cuda:N");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// An option's value is outside what the option accepts (a staging count or size out of
    /// bounds, a dtype that is no conversion target, an unknown device or engine name...).
    #[error("{option} `{}`: expected {}", shown(value), shown_message(expected))]
    BadOption {
        /// The option.
        option: &'static str,
        /// The value given, as text.
        value: String,
        /// What it accepts.
        expected: String,
    },
    /// An option that this device, source or way of loading cannot honour (zero-copy off CUDA,
    /// `direct` on a remote source, a device that a way of loading does not fill...).
    #[error("{} does not support `{option}`: {}", shown_message(by), shown_message(why))]
    Unsupported {
        /// The option.
        option: &'static str,
        /// What cannot honour it: a device (`"device cpu"`), a way of loading (`"load_into"`,
        /// `"stream"`, `"the candle backend"`), a source (`"a remote source"`)...
        by: String,
        /// Why, in words.
        why: String,
    },
    /// Two options that exclude each other.
    #[error("`{a}` and `{b}` exclude each other: {}", shown_message(why))]
    Conflict {
        /// One option.
        a: &'static str,
        /// The other.
        b: &'static str,
        /// Why, in words.
        why: String,
    },
    /// An option that works only with another, which was not given.
    #[error("`{option}` needs `{needs}`")]
    Requires {
        /// The option given.
        option: &'static str,
        /// The option it needs.
        needs: &'static str,
    },
    /// A glob (of `only` or `split`) that does not parse.
    #[error("{option} `{}`: {}", shown(glob), shown_message(message))]
    BadGlob {
        /// The option.
        option: &'static str,
        /// The glob.
        glob: String,
        /// What the glob parser reported.
        message: String,
    },
    /// A tensor-parallel share that does not exist: the world size is 0 or the rank not below it.
    #[error("shard {rank}/{world}: the rank must be below the world size (> 0)")]
    BadShardSpec {
        /// The rank asked for.
        rank: usize,
        /// The world size asked for.
        world: usize,
    },
    /// Two slices asked of one tensor.
    #[error("two slices of `{}`: one slice a tensor (index the loaded block for other dimensions)", shown(tensor))]
    SliceTwice {
        /// The tensor.
        tensor: String,
    },
    /// A storage option (credentials, endpoint, timeouts) that the object store refused.
    #[error("{}: storage option `{}`: {}", shown(url), shown(key), shown_message(message))]
    BadStorageOption {
        /// The object's URL.
        url: String,
        /// The option's key.
        key: String,
        /// What the store reported.
        message: String,
    },
    /// A tensor or header that [`crate::format::write_file`] cannot write: its bytes do not fit
    /// its dtype and shape, its name is reserved or given twice, or the header is too large.
    #[error("{}{}", tensor_prefix(tensor), shown_message(message))]
    BadWrite {
        /// The tensor, when one is at fault.
        tensor: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// The bytes of a tensor loaded to the null device were asked for: they were dropped.
    #[error("tensor `{}` was loaded to the null device: its bytes were dropped", shown(tensor))]
    BytesDropped {
        /// The tensor.
        tensor: String,
    },
    /// A loaded tensor used where it cannot be: on another device than asked, or read as
    /// elements that its length does not hold a whole number of.
    #[error("tensor `{}`: {}", shown(tensor), shown_message(why))]
    BadTensorUse {
        /// The tensor.
        tensor: String,
        /// Why, in words.
        why: String,
    },
}

fn tensor_prefix(tensor: &Option<String>) -> String {
    match tensor {
        Some(t) => format!("tensor `{}`: ", shown(t)),
        None => String::new(),
    }
}

impl From<UsageError> for Error {
    fn from(e: UsageError) -> Self {
        Error::Usage(e)
    }
}

impl Error {
    /// [`UsageError::BadOption`].
    pub(crate) fn bad_option(option: &'static str, value: impl ToString, expected: impl Into<String>) -> Self {
        UsageError::BadOption { option, value: value.to_string(), expected: expected.into() }.into()
    }

    /// [`UsageError::Unsupported`].
    pub(crate) fn unsupported(option: &'static str, by: impl Into<String>, why: impl Into<String>) -> Self {
        UsageError::Unsupported { option, by: by.into(), why: why.into() }.into()
    }

    /// [`UsageError::Conflict`].
    pub(crate) fn conflict(a: &'static str, b: &'static str, why: impl Into<String>) -> Self {
        UsageError::Conflict { a, b, why: why.into() }.into()
    }

    /// [`UsageError::BadWrite`] about tensor `tensor`.
    pub(crate) fn bad_write(tensor: &str, message: impl Into<String>) -> Self {
        UsageError::BadWrite { tensor: Some(tensor.to_string()), message: message.into() }.into()
    }
}
