//! The loader's remote options: the storage options, how many GETs of what size, the ring
//! they need, and when a remote load to `cpu` reads in place.

use super::files::Requests;
use super::{round_to_multiple, Loader, MIN_STAGING_SIZE};
use crate::sink::Device;
use crate::stage::ring::DIRECT_ALIGN;

impl Loader {
    /// Set an `object_store` configuration key for remote sources (`aws_endpoint`,
    /// `aws_region`, `allow_http`, `timeout`, …; see [`crate::source::RemoteOptions::storage_options`]),
    /// applied after the environment's `AWS_*`, `GOOGLE_*` and `AZURE_*` variables.
    ///
    /// ```
    /// let loader = weightstream::Loader::new()
    ///     .storage_option("aws_endpoint", "http://127.0.0.1:9000")
    ///     .storage_option("aws_region", "us-east-1");
    /// # drop(loader);
    /// ```
    pub fn storage_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.remote.storage_options.push((key.into(), value.into()));
        self
    }

    /// Ranged GETs in flight at most, for remote sources (default 8; clamped to 1..=1024). The
    /// staging ring holds every GET in flight and two more: about (concurrency + 2) × request
    /// size of host memory ([`Loader::remote_ring_dims`]).
    ///
    /// ```
    /// let loader = weightstream::Loader::new().remote_concurrency(16).remote_request_size(16 << 20);
    /// # drop(loader);
    /// ```
    pub fn remote_concurrency(mut self, requests: usize) -> Self {
        self.remote.concurrency = requests.clamp(1, 1024);
        self
    }

    /// Bytes of one ranged GET at most, for remote sources (default 8 MiB; rounded to 4 KiB,
    /// at least 64 KiB). A staging slot holds at least one request, and the ring about
    /// (concurrency + 2) of them.
    ///
    /// ```
    /// let loader = weightstream::Loader::new().remote_request_size(4 << 20);
    /// # drop(loader);
    /// ```
    pub fn remote_request_size(mut self, bytes: usize) -> Self {
        self.remote.request_size = round_to_multiple(bytes.max(MIN_STAGING_SIZE), DIRECT_ALIGN as usize);
        self
    }

    /// The staging ring a load of a remote source to `device` uses: `(buffers, bytes each)`, as
    /// set, else a slot per GET in flight and two more, each holding a whole GET.
    ///
    /// ```
    /// use weightstream::{Device, Loader};
    /// assert_eq!(Loader::new().remote_ring_dims(Device::Cpu), (10, 8 << 20));
    /// assert_eq!(Loader::new().remote_ring_dims(Device::Cuda(0)), (8, 16 << 20));
    /// assert_eq!(Loader::new().remote_concurrency(16).remote_ring_dims(Device::Cpu), (18, 8 << 20));
    /// ```
    pub fn remote_ring_dims(&self, device: Device) -> (usize, usize) {
        self.ring_dims_for(device, Some(self.requests()))
    }

    /// How a remote source is read: GETs of the request size, the concurrency in flight.
    pub(super) fn requests(&self) -> Requests {
        Requests { size: self.remote.request_size, concurrency: self.remote.concurrency }
    }
}
