//! Object-store and HTTP sources: `s3://`, `gs://`, `az://` and `http(s)://` checkpoints, read
//! with ranged GETs through the `object_store` crate (signing, credentials from the environment,
//! retries with backoff).
//!
//! A URL may name one `.safetensors` object, an index (`*.json`, its shards beside it), or a
//! prefix, which is read like a local directory: its index if it has one, else its
//! `*.safetensors` objects (for `http(s)://`, which cannot list, a prefix is tried as
//! `model.safetensors.index.json`, then `model.safetensors`).
//!
//! Each object's size and ETag are taken when its header is read; every later GET sends
//! `If-Match` with that ETag and checks the size and ETag it is answered with, so an object
//! replaced during a load is an error ([`RemoteFailure::Changed`]), never a mix of old and new
//! bytes.

mod engine;
mod store;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore};
use url::Url;

pub(crate) use engine::RemoteEngine;
pub use store::OWN_KEYS;

use super::{CheckpointFile, RemoteOptions};
use crate::error::{Error, RemoteFailure, RemoteFault, Result};
use crate::format::{header_len_of, parse_header, Header, ShardIndex, MAX_INDEX_LEN};

/// Most objects a listed prefix may hold (a checkpoint has a few hundred files at most).
const MAX_LISTED_OBJECTS: usize = 100_000;

/// Headers read at once when a checkpoint opens.
const MAX_HEADER_READS: usize = 8;

/// One object of a remote checkpoint, as it was when its header was read.
#[derive(Debug)]
pub struct RemoteObject {
    url: String,
    store: Arc<dyn ObjectStore>,
    location: ObjectPath,
    size: u64,
    etag: Option<String>,
    /// The last-modified time as text: compared for equality only, where the store gives no ETag.
    last_modified: String,
}

impl RemoteObject {
    /// The object's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its ETag, when the store gave one.
    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// Its last-modification time as the store reported it (compared, never interpreted).
    pub fn last_modified(&self) -> &str {
        &self.last_modified
    }

    fn new(url: String, store: Arc<dyn ObjectStore>, location: ObjectPath, meta: &ObjectMeta) -> Self {
        RemoteObject {
            url,
            store,
            location,
            size: meta.size,
            etag: meta.e_tag.clone(),
            last_modified: meta.last_modified.to_rfc3339(),
        }
    }

    /// The GET options for `range`: `If-Match` with the ETag, where it is a strong one (a weak
    /// ETag never matches under `If-Match`; the answer's ETag is still compared).
    fn get_options(&self, range: Range<u64>) -> GetOptions {
        let strong = self.etag.as_ref().filter(|e| !e.starts_with("W/")).cloned();
        GetOptions { range: Some(GetRange::Bounded(range)), if_match: strong, ..GetOptions::default() }
    }

    /// The answer `meta` is about the object whose header was read: same size, same ETag (or,
    /// without one, same modification time).
    fn check_same(&self, meta: &ObjectMeta) -> std::result::Result<(), RemoteFault> {
        let same = meta.size == self.size
            && match (&self.etag, &meta.e_tag) {
                (Some(a), Some(b)) => a == b,
                (None, None) => self.last_modified == meta.last_modified.to_rfc3339(),
                _ => false,
            };
        match same {
            true => Ok(()),
            false => Err(RemoteFault::new(
                RemoteFailure::Changed,
                format!(
                    "the object changed since its header was read: size {} etag {:?}, now size {} etag {:?}",
                    self.size, self.etag, meta.size, meta.e_tag
                ),
            )),
        }
    }

    /// GET `range` of the object into `dst` (`dst.len() == range` length), copying the body
    /// once as it streams in.
    pub(crate) async fn read_into(&self, range: Range<u64>, dst: &mut [u8]) -> std::result::Result<(), RemoteFault> {
        let want = dst.len();
        let got =
            self.store.get_opts(&self.location, self.get_options(range)).await.map_err(RemoteFault::from_store)?;
        self.check_same(&got.meta)?;
        let mut body = got.into_stream();
        let mut filled = 0usize;
        while let Some(chunk) = body.try_next().await.map_err(RemoteFault::from_store)? {
            let end = filled.checked_add(chunk.len()).filter(|&e| e <= want).ok_or_else(|| {
                RemoteFault::new(
                    RemoteFailure::Protocol,
                    format!("the server sent more than the {want} bytes asked for"),
                )
            })?;
            dst[filled..end].copy_from_slice(&chunk);
            filled = end;
        }
        match filled == want {
            true => Ok(()),
            false => Err(RemoteFault::new(
                RemoteFailure::Protocol,
                format!("the response ended after {filled} of the {want} bytes asked for"),
            )),
        }
    }
}

impl RemoteFault {
    /// The kind of an `object_store` error, with its words: the status code where the server
    /// gave one, a timeout or refused connection found in its chain of causes.
    pub(crate) fn from_store(e: object_store::Error) -> Self {
        let failure = match &e {
            object_store::Error::NotFound { .. } => RemoteFailure::NotFound,
            object_store::Error::Precondition { .. } => RemoteFailure::Changed,
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                RemoteFailure::Denied
            }
            // A server that ignores `Range` (answers 200 with the whole object), say.
            object_store::Error::NotSupported { .. } | object_store::Error::NotImplemented { .. } => {
                RemoteFailure::Protocol
            }
            other => classify_chain(other),
        };
        RemoteFault::new(failure, e.to_string())
    }
}

/// A timeout, an unreachable server or a final status code, from the causes of `e`.
fn classify_chain(e: &(dyn std::error::Error + 'static)) -> RemoteFailure {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<object_store::client::HttpError>() {
            use object_store::client::HttpErrorKind as K;
            match h.kind() {
                K::Timeout => return RemoteFailure::TimedOut,
                K::Connect => return RemoteFailure::Unreachable,
                _ => {}
            }
        }
        cause = c.source();
    }
    // `object_store` keeps its retry error private; its text carries the final status.
    let text = e.to_string();
    let status =
        text.split("status code: ").nth(1).and_then(|rest| rest.get(..3)).and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(404) => RemoteFailure::NotFound,
        Some(401 | 403) => RemoteFailure::Denied,
        Some(412) => RemoteFailure::Changed,
        Some(code) => RemoteFailure::Status(code),
        None => RemoteFailure::Other,
    }
}

/// Open the remote checkpoint at `url`: its files, each with its validated header, and its index
/// if it has one.
/// Each file comes with its header's JSON bytes (see [`super::SharedFile`]).
#[allow(clippy::type_complexity)]
pub(crate) fn open(url: &str, opts: &RemoteOptions) -> Result<(Vec<(CheckpointFile, Vec<u8>)>, Option<ShardIndex>)> {
    let parsed = store::parse_url(url)?;
    let location = store::store_for(&parsed, opts)?;
    // Each header read may allocate up to the 100 MB limit: a few at a time.
    let concurrency = opts.concurrency.clamp(1, MAX_HEADER_READS);
    let cancel = opts.cancel.clone();
    store::run(
        async move {
            let (objects, index) = resolve(&parsed, &location).await?;
            let store = location.store;
            let files = futures_util::stream::iter(objects)
                .map(|(url, path)| open_object(Arc::clone(&store), url, path))
                .buffered(concurrency)
                .try_collect::<Vec<_>>()
                .await?;
            Ok((files, index))
        },
        cancel.as_ref(),
    )?
}

/// A remote source's failure, as an error naming `url`.
fn remote_error(url: &str, fault: RemoteFault) -> Error {
    Error::Remote { file: url.into(), tensor: None, failure: fault.failure, message: fault.message }
}

/// `(url, object path)` of the objects to load, in load order, and the index.
async fn resolve(url: &Url, at: &store::Location) -> Result<(Vec<(Url, ObjectPath)>, Option<ShardIndex>)> {
    let name = at.path.filename().unwrap_or("");
    if name.ends_with(".json") {
        return read_index(url, at).await;
    }
    if name.ends_with(".safetensors") {
        return Ok((vec![(url.clone(), at.path.clone())], None));
    }
    let dir = directory_url(url)?;
    if matches!(url.scheme(), "http" | "https") {
        // HTTP servers cannot list: the conventional names, index first.
        for file in ["model.safetensors.index.json", "model.safetensors"] {
            let candidate = child(&dir, file)?;
            let path = object_path(&candidate)?;
            match at.store.get_opts(&path, GetOptions { head: true, ..GetOptions::default() }).await {
                Ok(_) if file.ends_with(".json") => {
                    return read_index(&candidate, &store::Location { store: Arc::clone(&at.store), path }).await
                }
                Ok(_) => return Ok((vec![(candidate, path)], None)),
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(remote_error(candidate.as_str(), RemoteFault::from_store(e))),
            }
        }
        return Err(Error::BadSource {
            file: url.as_str().into(),
            message: "neither model.safetensors.index.json nor model.safetensors is there (an http(s) URL \
                      that names no file cannot be listed)"
                .into(),
        });
    }
    list_prefix(url, &dir, at).await
}

/// A prefix's index if it has one, else its `*.safetensors` objects: as a local directory.
async fn list_prefix(
    url: &Url,
    dir: &Url,
    at: &store::Location,
) -> Result<(Vec<(Url, ObjectPath)>, Option<ShardIndex>)> {
    let prefix = (!at.path.as_ref().is_empty()).then_some(&at.path);
    let under = match prefix {
        Some(p) => format!("{}/", p.as_ref()),
        None => String::new(),
    };
    // Listed page by page and stopped at the limit: a huge prefix costs bounded memory.
    let mut listing = at.store.list(prefix);
    let mut names = Vec::new();
    let mut seen = 0usize;
    while let Some(o) = listing.try_next().await.map_err(|e| remote_error(url.as_str(), RemoteFault::from_store(e)))? {
        seen += 1;
        if seen > MAX_LISTED_OBJECTS {
            return Err(Error::BadSource {
                file: url.as_str().into(),
                message: format!("the prefix holds more than the {MAX_LISTED_OBJECTS} objects a checkpoint may"),
            });
        }
        // Direct children only, as a directory's entries.
        if let Some(name) = o.location.as_ref().strip_prefix(&under).filter(|n| !n.contains('/')) {
            names.push(name.to_string());
        }
    }
    drop(listing);
    let mut indexes = Vec::new();
    let mut shards = Vec::new();
    for name in names {
        if name.ends_with(".safetensors.index.json") {
            indexes.push(name);
        } else if name.ends_with(".safetensors") {
            shards.push(name);
        }
    }
    indexes.sort();
    shards.sort();
    let index = match indexes.len() {
        0 => None,
        1 => indexes.pop(),
        n => match indexes.iter().find(|i| *i == "model.safetensors.index.json") {
            Some(i) => Some(i.clone()),
            None => {
                return Err(Error::BadSource {
                    file: url.as_str().into(),
                    message: format!("the prefix holds {n} index files; name one"),
                })
            }
        },
    };
    if let Some(index) = index {
        let index_url = child(dir, &index)?;
        let path = object_path(&index_url)?;
        return read_index(&index_url, &store::Location { store: Arc::clone(&at.store), path }).await;
    }
    if shards.is_empty() {
        return Err(Error::BadSource {
            file: url.as_str().into(),
            message: "the prefix holds no .safetensors object and no index".into(),
        });
    }
    shards
        .iter()
        .map(|s| {
            let u = child(dir, s)?;
            let p = object_path(&u)?;
            Ok((u, p))
        })
        .collect::<Result<Vec<_>>>()
        .map(|objects| (objects, None))
}

/// Read the index at `url` (bounded: its size is checked before a byte is allocated), its shards
/// being objects beside it.
async fn read_index(url: &Url, at: &store::Location) -> Result<(Vec<(Url, ObjectPath)>, Option<ShardIndex>)> {
    let name = PathBuf::from(url.as_str());
    let head = at
        .store
        .get_opts(&at.path, GetOptions { head: true, ..GetOptions::default() })
        .await
        .map_err(|e| remote_error(url.as_str(), RemoteFault::from_store(e)))?;
    if head.meta.size > MAX_INDEX_LEN {
        return Err(Error::BadIndex {
            file: name,
            tensor: None,
            message: format!("index is {} bytes, more than the {MAX_INDEX_LEN} allowed", head.meta.size),
        });
    }
    let object = RemoteObject::new(url.to_string(), Arc::clone(&at.store), at.path.clone(), &head.meta);
    let mut bytes = vec![0u8; object.size as usize];
    if object.size > 0 {
        object.read_into(0..object.size, &mut bytes).await.map_err(|f| remote_error(url.as_str(), f))?;
    }
    let dir = directory_url(url)?;
    let index = ShardIndex::from_json(&name, &bytes, |shard| {
        crate::format::index::plain_relative(shard)?;
        let u = child(&dir, shard).map_err(|e| e.to_string())?;
        Ok(PathBuf::from(u.as_str()))
    })?;
    let objects = index
        .shards
        .iter()
        .map(|p| {
            let u = store::parse_url(&p.to_string_lossy())?;
            let path = object_path(&u)?;
            Ok((u, path))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((objects, Some(index)))
}

/// Read the header of the object at `url`: its size and ETag (HEAD), the 8-byte length, then
/// exactly the header, each GET bounded and pinned to the ETag.
async fn open_object(store: Arc<dyn ObjectStore>, url: Url, path: ObjectPath) -> Result<(CheckpointFile, Vec<u8>)> {
    let name = PathBuf::from(url.as_str());
    let failed = |f: RemoteFault| remote_error(url.as_str(), f);
    let head = store
        .get_opts(&path, GetOptions { head: true, ..GetOptions::default() })
        .await
        .map_err(|e| failed(RemoteFault::from_store(e)))?;
    let object = RemoteObject::new(url.to_string(), store, path, &head.meta);
    if object.size < 8 {
        return Err(Error::FileTooSmall { file: name, len: object.size });
    }
    let mut prefix = [0u8; 8];
    object.read_into(0..8, &mut prefix).await.map_err(failed)?;
    let header_len = header_len_of(&name, prefix, object.size)?;
    // Checked above: header_len <= MAX_HEADER_LEN and <= size - 8.
    let mut header = vec![0u8; header_len as usize];
    if header_len > 0 {
        object.read_into(8..8 + header_len, &mut header).await.map_err(failed)?;
    }
    let parsed: Header = parse_header(&name, &header, object.size)?;
    Ok((CheckpointFile { path: name, header: parsed, access: super::FileAccess::Remote(Arc::new(object)) }, header))
}

/// The object at `url` as a peer found it when it read its header (`size`, `etag`,
/// `last_modified` as [`super::SharedFile`] carries them): no request is made; the first GET
/// checks them, as every GET does.
pub(crate) fn adopt(
    url: &str,
    size: u64,
    etag: Option<String>,
    last_modified: String,
    opts: &RemoteOptions,
) -> Result<RemoteObject> {
    let parsed = store::parse_url(url)?;
    let location = store::store_for(&parsed, opts)?;
    Ok(RemoteObject {
        url: parsed.to_string(),
        store: location.store,
        location: location.path,
        size,
        etag,
        last_modified,
    })
}

/// The URL of the "directory" `url` names: itself with a trailing `/` for a prefix, its parent
/// for an object.
fn directory_url(url: &Url) -> Result<Url> {
    let name = url.path_segments().and_then(|mut s| s.next_back()).unwrap_or("");
    let is_object = name.ends_with(".json") || name.ends_with(".safetensors");
    let text = url.as_str();
    let dir = match (is_object, text.ends_with('/')) {
        (true, _) => text[..text.len() - name.len()].to_string(),
        (false, true) => text.to_string(),
        (false, false) => format!("{text}/"),
    };
    store::parse_url(&dir)
}

/// `name` (a plain relative name) inside the directory URL `dir`; an error if it would lead
/// elsewhere (a name that parses as a URL of its own, say).
fn child(dir: &Url, name: &str) -> Result<Url> {
    let bad = |message: String| Error::BadSource { file: dir.as_str().into(), message };
    let joined = dir.join(name).map_err(|e| bad(format!("`{name}`: {e}")))?;
    match joined.as_str().starts_with(dir.as_str()) && joined.as_str().len() > dir.as_str().len() {
        true => Ok(joined),
        false => Err(bad(format!("`{name}` leads outside {dir}"))),
    }
}

/// The object path of `url` in its store.
fn object_path(url: &Url) -> Result<ObjectPath> {
    object_store::ObjectStoreScheme::parse(url)
        .map(|(_, p)| p)
        .map_err(|e| Error::BadSource { file: url.as_str().into(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_urls_of_objects_and_prefixes() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert_eq!(directory_url(&u("s3://b/m/model.safetensors")).unwrap().as_str(), "s3://b/m/");
        assert_eq!(directory_url(&u("s3://b/m")).unwrap().as_str(), "s3://b/m/");
        assert_eq!(directory_url(&u("s3://b/m/")).unwrap().as_str(), "s3://b/m/");
        assert_eq!(directory_url(&u("http://h:1/r/i.json")).unwrap().as_str(), "http://h:1/r/");
    }

    #[test]
    fn shard_names_stay_in_the_directory() {
        let dir = Url::parse("s3://b/m/").unwrap();
        assert_eq!(child(&dir, "a.safetensors").unwrap().as_str(), "s3://b/m/a.safetensors");
        assert_eq!(child(&dir, "sub/a.safetensors").unwrap().as_str(), "s3://b/m/sub/a.safetensors");
        assert!(child(&dir, "../a.safetensors").is_err());
        assert!(child(&dir, "/a.safetensors").is_err());
        assert!(child(&dir, "s3://other/a.safetensors").is_err());
        assert!(child(&dir, "c:a.safetensors").is_err());
        assert!(child(&dir, "").is_err());
    }
}
