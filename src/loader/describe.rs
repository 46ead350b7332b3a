//! What a load would produce, without loading: [`Loader::describe`].

use std::path::Path;

use super::Loader;
use crate::error::Result;
use crate::format::Dtype;

/// One tensor as a load with the loader's options would produce it: its loaded dtype and shape
/// (after `dtype` and `shard`), and its size, which is what a [`crate::Destination`] for it must
/// hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its name in the checkpoint.
    pub name: String,
    /// The dtype it loads as.
    pub dtype: Dtype,
    /// The dtype the file stores.
    pub stored_dtype: Dtype,
    /// Its loaded shape (a shard's shape when it is split).
    pub shape: Vec<u64>,
    /// Its loaded size in bytes.
    pub byte_len: u64,
}

impl Loader {
    /// The tensors a load of `path` would produce with these options, in file order: their
    /// loaded dtypes, shapes and sizes. Only headers are read; the options are checked as a load
    /// checks them, and a bad shard is the same error.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let p = dir.path().join("m.safetensors");
    /// use weightstream::{format::{write_file, WriteTensor}, Device, Dtype, Loader};
    /// write_file(&p, &[WriteTensor::new("w", Dtype::BF16, vec![4, 2], &[0; 16])], &Default::default())?;
    /// let loader = Loader::new().device(Device::Cpu).dtype(Dtype::F32).shard(1, 2).split("w", 0);
    /// let t = &loader.describe(&p)?[0];
    /// assert_eq!((t.dtype, t.stored_dtype, t.shape.as_slice(), t.byte_len), (Dtype::F32, Dtype::BF16, &[2, 2][..], 16));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn describe(&self, path: impl AsRef<Path>) -> Result<Vec<TensorInfo>> {
        let ckpt = self.open(path.as_ref())?;
        let (_, plan) = self.plan_of(&ckpt, &|_| true)?;
        Ok(plan
            .tensors
            .into_iter()
            .map(|t| TensorInfo {
                name: t.name,
                dtype: t.dtype,
                stored_dtype: t.stored_dtype,
                shape: t.shape,
                byte_len: t.len,
            })
            .collect())
    }
}
