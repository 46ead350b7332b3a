//! From a URL to an `object_store` client: which store, its credentials and endpoint (the
//! standard environment variables, then the caller's storage options), its retries, and the
//! runtime its requests run on.

use std::future::Future;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreScheme, RetryConfig};
use url::Url;

use super::RemoteOptions;
use crate::cancel::CancelToken;
use crate::error::{Error, Result, UsageError};

/// The keys of [`RemoteOptions::storage_options`] that weightstream reads itself; every other
/// key is the store's (`object_store`'s config keys).
pub const OWN_KEYS: [&str; 2] = ["max_retries", "retry_timeout"];

/// A URL taken apart: the store that serves it and the object's path in that store.
pub(crate) struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub path: ObjectPath,
}

/// The URL `text`, parsed; an error naming it if it is not a URL of a store we know.
pub(crate) fn parse_url(text: &str) -> Result<Url> {
    let url = Url::parse(text).map_err(|e| bad(text, format!("not a valid URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        // Credentials in a URL end up in logs and error messages: refuse them.
        return Err(bad(
            text,
            "credentials in the URL are not accepted; use storage options or the environment".into(),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad(text, "a query or fragment in the URL is not supported".into()));
    }
    Ok(url)
}

/// The store serving `url` and the object's path in it, configured from the environment and
/// `opts`. One client serves every object of a checkpoint (one connection pool).
pub(crate) fn store_for(url: &Url, opts: &RemoteOptions) -> Result<Location> {
    let (scheme, path) = ObjectStoreScheme::parse(url).map_err(|e| bad(url.as_str(), e.to_string()))?;
    let retry = retry_config(url, opts)?;
    let store_opts = || opts.storage_options.iter().filter(|(k, _)| !OWN_KEYS.contains(&k.as_str()));
    let key_error = |k: &str, e: object_store::Error| -> Error {
        UsageError::BadStorageOption { url: url.to_string(), key: k.to_string(), message: e.to_string() }.into()
    };
    let built: std::result::Result<Arc<dyn ObjectStore>, object_store::Error> = match scheme {
        ObjectStoreScheme::AmazonS3 => {
            let mut b = AmazonS3Builder::from_env().with_url(url.as_str()).with_retry(retry);
            for (k, v) in store_opts() {
                b = b.with_config(k.parse().map_err(|e| key_error(k, e))?, v);
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let mut b = GoogleCloudStorageBuilder::from_env().with_url(url.as_str()).with_retry(retry);
            for (k, v) in store_opts() {
                b = b.with_config(k.parse().map_err(|e| key_error(k, e))?, v);
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let mut b = MicrosoftAzureBuilder::from_env().with_url(url.as_str()).with_retry(retry);
            for (k, v) in store_opts() {
                b = b.with_config(k.parse().map_err(|e| key_error(k, e))?, v);
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        ObjectStoreScheme::Http => {
            let origin = url.origin().ascii_serialization();
            let mut b = HttpBuilder::new().with_url(origin).with_retry(retry);
            if url.scheme() == "http" {
                b = b.with_config(ClientConfigKey::AllowHttp, "true");
            }
            for (k, v) in store_opts() {
                b = b.with_config(k.parse::<ClientConfigKey>().map_err(|e| key_error(k, e))?, v);
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        _ => return Err(bad(url.as_str(), "not an s3://, gs://, az:// or http(s):// URL".into())),
    };
    let store = built.map_err(|e| bad(url.as_str(), format!("cannot set up the store: {e}")))?;
    Ok(Location { store, path })
}

/// Retries with backoff (5xx, 429, timeouts and broken bodies are retried by `object_store`):
/// its defaults, or `max_retries` / `retry_timeout` from the storage options.
fn retry_config(url: &Url, opts: &RemoteOptions) -> Result<RetryConfig> {
    let mut retry = RetryConfig::default();
    for (k, v) in &opts.storage_options {
        match k.as_str() {
            "max_retries" => {
                retry.max_retries =
                    v.parse().map_err(|_| bad(url.as_str(), format!("max_retries `{v}` is not a count")))?
            }
            "retry_timeout" => retry.retry_timeout = parse_duration(v).map_err(|m| bad(url.as_str(), m))?,
            _ => {}
        }
    }
    Ok(retry)
}

/// `30s`, `500ms`, `2m` (humantime's syntax, as object_store's own `timeout` takes) or a plain
/// number of seconds.
fn parse_duration(v: &str) -> std::result::Result<Duration, String> {
    match v.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(v)
            .map_err(|e| format!("retry_timeout `{v}` is not a duration (e.g. 30s, 500ms, 2m): {e}")),
    }
}

fn bad(url: &str, message: String) -> Error {
    Error::BadSource { file: url.into(), message }
}

/// The runtime that every remote request runs on: started on first use, shared by all loads.
///
/// A child forked after it started has none of its threads (a `DataLoader` worker, a
/// `multiprocessing` fork): a task spawned there would never run, and its waiter would hang. So
/// the runtime belongs to the process that built it, and a child builds its own (the parent's is
/// left alone, leaked: its threads are not there to stop).
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: Mutex<Option<(u32, &'static tokio::runtime::Runtime)>> = Mutex::new(None);
    let mut slot = RUNTIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let pid = std::process::id();
    if let Some((owner, rt)) = *slot {
        if owner == pid {
            return Ok(rt);
        }
    }
    // Bodies are copied into staging memory on these threads: a few cores' worth.
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("ws-remote")
        .enable_all()
        .build()
        // The OS refused its threads: no weightstream bug.
        .map_err(|source| Error::ReadEngine { source })?;
    let rt: &'static tokio::runtime::Runtime = Box::leak(Box::new(rt));
    *slot = Some((pid, rt));
    Ok(rt)
}

/// A handle to the remote runtime (of this process).
pub(crate) fn handle() -> Result<tokio::runtime::Handle> {
    runtime().map(|rt| rt.handle().clone())
}

/// Run `fut` on the remote runtime and wait for its output on this thread, or until `cancel`
/// is cancelled (then the task is aborted: [`Error::Cancelled`]). Unlike
/// `Runtime::block_on`, this works from any thread, an async runtime's own among them.
pub(crate) fn run<F>(fut: F, cancel: Option<&CancelToken>) -> Result<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let task = runtime()?.spawn(async move {
        let _ = tx.send(fut.await);
    });
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(out) => return Ok(out),
            Err(RecvTimeoutError::Timeout) if cancel.is_some_and(CancelToken::is_cancelled) => {
                task.abort();
                return Err(Error::Cancelled);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::internal("a remote request ended without an answer"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("1e400").is_err());
    }

    #[test]
    fn urls_with_credentials_or_queries_are_refused() {
        assert!(parse_url("https://user:pw@example.com/m.safetensors").is_err());
        assert!(parse_url("https://example.com/m.safetensors?sig=1").is_err());
        assert!(parse_url("s3://bucket/m.safetensors").is_ok());
        assert!(parse_url("not a url").is_err());
    }

    #[test]
    fn unknown_storage_options_are_errors() {
        let url = parse_url("s3://bucket/m.safetensors").unwrap();
        let opts =
            RemoteOptions { storage_options: vec![("no_such_key".into(), "1".into())], ..RemoteOptions::default() };
        let err = store_for(&url, &opts).err().expect("an unknown key is refused");
        assert!(err.to_string().contains("no_such_key"), "{err}");
    }

    #[test]
    fn the_runtime_runs_from_inside_another_runtime() {
        let outer = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let got = outer.block_on(async { run(async { 41 + 1 }, None) }).unwrap();
        assert_eq!(got, 42);
    }
}
