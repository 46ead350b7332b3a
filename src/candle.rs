//! candle: a candle-nn [`SimpleBackend`] that loads through weightstream (feature `candle`).
//!
//! [`WeightstreamBackend`] loads every selected tensor of a checkpoint in one pipeline run when
//! it is built, into `Vec`s that candle then owns (each a zeroed allocation filled by
//! [`Loader::load_into`] and handed to candle as its storage: no second copy of the model; the
//! bytes pass through the bounded host staging ring), and hands them out through candle-nn's
//! [`VarBuilder`]. The loader's options apply: `only`, `dtype`, `shard`.
//!
//! Host memory only: candle's `cuda` feature asks for cudarc's `dynamic-linking`, which cannot
//! be built together with the `dynamic-loading` of weightstream's `cuda` feature (README,
//! "candle"). A tensor asked for on another candle device is moved there by candle
//! (`Tensor::to_device`), as candle's own backends do.
//!
//! ```
//! # let dir = tempfile::tempdir()?;
//! # let p = dir.path().join("m.safetensors");
//! use weightstream::{format::{write_file, WriteTensor}, Dtype, Loader};
//! let w: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|x| x.to_le_bytes()).collect();
//! write_file(&p, &[WriteTensor::new("layer.w", Dtype::F32, vec![2, 2], &w)], &Default::default())?;
//!
//! let dev = candle_core::Device::Cpu;
//! let vb = weightstream::candle::var_builder(&Loader::new(), &p, candle_core::DType::F32, &dev)?;
//! let t = vb.pp("layer").get((2, 2), "w")?;
//! assert_eq!(t.to_vec2::<f32>()?, [[1.0, 2.0], [3.0, 4.0]]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::path::Path;

use bytemuck::{allocation::zeroed_vec, cast_slice_mut};
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, DType, Shape, Storage, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::loader::{Destination, Loader, TensorInfo};
use crate::model::LoadStats;
use crate::sink::Device;

/// The tensors of one checkpoint, loaded into candle's memory when built, handed out through
/// candle-nn's [`SimpleBackend`] (so [`VarBuilder::from_backend`] works on any candle model).
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let p = dir.path().join("m.safetensors");
/// use weightstream::{candle::WeightstreamBackend, format::{write_file, WriteTensor}, Dtype, Loader};
/// write_file(&p, &[WriteTensor::new("w", Dtype::BF16, vec![2, 4], &[0; 16])], &Default::default())?;
/// let dev = candle_core::Device::Cpu;
/// let backend = WeightstreamBackend::new(&Loader::new().dtype(Dtype::F32), &p, &dev)?;
/// assert_eq!(backend.stats().bytes_loaded, 32); // loaded as F32, converted on the way
/// let vb = backend.into_var_builder(candle_core::DType::F32, &dev);
/// assert_eq!(vb.get((2, 4), "w")?.dtype(), candle_core::DType::F32);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct WeightstreamBackend {
    tensors: HashMap<String, Tensor>,
    stats: LoadStats,
}

impl WeightstreamBackend {
    /// Load every tensor of `path` that `loader` selects (one pipeline run, into host memory
    /// candle owns), then place them on `device`.
    ///
    /// The loader's device must be `auto` or `cpu` (both load to host memory here): a `cuda` or
    /// `null` loader is [`Error::Usage`] ([`crate::UsageError::Unsupported`]), not a silent change. A tensor whose loaded dtype
    /// candle lacks (BOOL, I8, U16, U64, F8_E5M2, the FNUZ fp8s, C64) is
    /// [`Error::BadDestination`] naming it; `Loader::dtype` converts float tensors first.
    pub fn new(loader: &Loader, path: impl AsRef<Path>, device: &candle_core::Device) -> Result<Self> {
        let path = path.as_ref();
        let loader = match loader.device_option() {
            Device::Auto | Device::Cpu => loader.clone().device(Device::Cpu),
            other => {
                let why = format!(
                    "it loads into candle's host memory: give it a cpu or auto loader, not {other} (candle's \
                     Device says where tensors go)"
                );
                return Err(Error::unsupported("device", "the candle backend", why));
            }
        };
        let infos = loader.describe(path)?;
        let mut storages = infos.iter().map(|t| storage_for(t, path)).collect::<Result<Vec<_>>>()?;
        let destinations =
            infos.iter().zip(storages.iter_mut()).map(|(t, s)| (t.name.clone(), Destination::Host(bytes_of(s))));
        let stats = loader.load_into(path, destinations)?;
        let mut tensors = HashMap::with_capacity(infos.len());
        for (t, storage) in infos.into_iter().zip(storages) {
            let shape = t.shape.iter().map(|&d| usize::try_from(d)).collect::<std::result::Result<Vec<_>, _>>();
            let shape = shape.map_err(|_| Error::internal("a shape dimension beyond usize"))?;
            let tensor = Tensor::from_storage(Storage::Cpu(storage), shape, BackpropOp::none(), false);
            let tensor = tensor.to_device(device).map_err(|e| bad(path, &t.name, format!("to {device:?}: {e}")))?;
            tensors.insert(t.name, tensor);
        }
        Ok(WeightstreamBackend { tensors, stats })
    }

    /// What the load did: bytes read and loaded, seconds, io engine.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// The loaded tensors by name, as loaded (before any dtype a [`VarBuilder`] asks for).
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    /// The loaded tensors, for code that wants them without a [`VarBuilder`].
    pub fn into_tensors(self) -> HashMap<String, Tensor> {
        self.tensors
    }

    /// A [`VarBuilder`] over these tensors, handing them out as `dtype` on `device`
    /// ([`VarBuilder::from_backend`]).
    pub fn into_var_builder(self, dtype: DType, device: &candle_core::Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

/// Load `path` with `loader` into a [`VarBuilder`] that hands tensors out as `dtype` on `device`:
/// [`WeightstreamBackend::new`], then [`WeightstreamBackend::into_var_builder`]. The candle
/// counterpart of `VarBuilder::from_mmaped_safetensors`, without `unsafe` and with every
/// weight in memory when it returns.
pub fn var_builder(
    loader: &Loader,
    path: impl AsRef<Path>,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<VarBuilder<'static>> {
    Ok(WeightstreamBackend::new(loader, path, device)?.into_var_builder(dtype, device))
}

impl SimpleBackend for WeightstreamBackend {
    /// The tensor `name`, checked to have shape `s` (candle's `UnexpectedShape` otherwise, as
    /// candle's safetensors backends report it), on `dev` as `dtype`.
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.find(name)?;
        if tensor.shape() != &s {
            Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt())?
        }
        tensor.to_device(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &candle_core::Device) -> candle_core::Result<Tensor> {
        self.find(name)?.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

impl WeightstreamBackend {
    /// A shared handle on the tensor (candle tensors share their storage when cloned).
    fn find(&self, name: &str) -> candle_core::Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())
    }
}

/// So that `?` on weightstream's results works in code that returns `candle_core::Result`; the
/// message (file and tensor) is kept.
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// candle's storage for one tensor, zeroed (`alloc_zeroed`: fresh pages, no write pass before
/// the load writes them) and exactly the tensor's loaded size.
fn storage_for(t: &TensorInfo, path: &Path) -> Result<CpuStorage> {
    let len = usize::try_from(t.byte_len).map_err(|_| bad(path, &t.name, "larger than memory".into()))?;
    let lacks = || {
        bad(
            path,
            &t.name,
            format!(
                "candle has no dtype {} (it has U8 U32 I16 I32 I64 BF16 F16 F32 F64 F8_E4M3 F6 F4 F8_E8M0)",
                t.dtype
            ),
        )
    };
    // Packed sub-byte dtypes are raw bytes in candle, as in the file.
    Ok(match t.dtype {
        Dtype::U8 => CpuStorage::U8(zeroed(len)),
        Dtype::U32 => CpuStorage::U32(zeroed(len)),
        Dtype::I16 => CpuStorage::I16(zeroed(len)),
        Dtype::I32 => CpuStorage::I32(zeroed(len)),
        Dtype::I64 => CpuStorage::I64(zeroed(len)),
        Dtype::BF16 => CpuStorage::BF16(zeroed(len)),
        Dtype::F16 => CpuStorage::F16(zeroed(len)),
        Dtype::F32 => CpuStorage::F32(zeroed(len)),
        Dtype::F64 => CpuStorage::F64(zeroed(len)),
        Dtype::F8_E4M3 => CpuStorage::F8E4M3(zeroed(len)),
        Dtype::F6_E2M3 => CpuStorage::F6E2M3(zeroed(len)),
        Dtype::F6_E3M2 => CpuStorage::F6E3M2(zeroed(len)),
        Dtype::F4 => CpuStorage::F4(zeroed(len)),
        Dtype::F8_E8M0 => CpuStorage::F8E8M0(zeroed(len)),
        Dtype::BOOL
        | Dtype::I8
        | Dtype::U16
        | Dtype::U64
        | Dtype::F8_E5M2
        | Dtype::F8_E4M3FNUZ
        | Dtype::F8_E5M2FNUZ
        | Dtype::C64 => return Err(lacks()),
    })
}

/// `len` bytes of zeroed `T`s.
fn zeroed<T: bytemuck::Zeroable>(len: usize) -> Vec<T> {
    zeroed_vec(len / std::mem::size_of::<T>())
}

/// The bytes of candle's storage, for the load to fill in place.
fn bytes_of(s: &mut CpuStorage) -> &mut [u8] {
    match s {
        CpuStorage::U8(v)
        | CpuStorage::F6E2M3(v)
        | CpuStorage::F6E3M2(v)
        | CpuStorage::F4(v)
        | CpuStorage::F8E8M0(v) => v,
        CpuStorage::U32(v) => cast_slice_mut(v),
        CpuStorage::I16(v) => cast_slice_mut(v),
        CpuStorage::I32(v) => cast_slice_mut(v),
        CpuStorage::I64(v) => cast_slice_mut(v),
        CpuStorage::BF16(v) => cast_slice_mut(v),
        CpuStorage::F16(v) => cast_slice_mut(v),
        CpuStorage::F32(v) => cast_slice_mut(v),
        CpuStorage::F64(v) => cast_slice_mut(v),
        CpuStorage::F8E4M3(v) => cast_slice_mut(v),
    }
}

fn bad(path: &Path, tensor: &str, message: String) -> Error {
    Error::BadDestination { file: path.to_path_buf(), tensor: tensor.to_string(), message }
}
