//! The remote-test servers themselves (tests/remote_support): each starts, takes an object and
//! serves it back through object_store with a range and `If-Match`; the fault proxy's schedules
//! do what they say against object_store's retries and timeouts.
//!
//! A server whose program is not installed is skipped with a `SKIPPED:` line, unless
//! `WEIGHTSTREAM_REQUIRE_SERVERS=1`. Install them with `scripts/install_test_servers.sh`.

#![cfg(feature = "remote")]

mod remote_support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use remote_support::{
    block_on, build_store, quick_retry, AzureServer, FaultProxy, GcsServer, HttpServer, Outcome, RemoteServer,
    S3Server, Schedule,
};

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The store and path for an object URL, the way a user's URL and options reach object_store.
fn open(url: &str, options: &[(String, String)]) -> (Box<dyn ObjectStore>, Path) {
    let url = url::Url::parse(url).unwrap_or_else(|e| panic!("bad URL {url}: {e}"));
    object_store::parse_url_opts(&url, options.iter().cloned()).unwrap_or_else(|e| panic!("parse_url_opts({url}): {e}"))
}

fn ranged(
    store: &dyn ObjectStore,
    path: &Path,
    range: std::ops::Range<u64>,
    etag: &str,
) -> object_store::Result<Vec<u8>> {
    block_on(async {
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            if_match: Some(etag.to_string()),
            ..Default::default()
        };
        let result = store.get_opts(path, options).await?;
        Ok(result.bytes().await?.to_vec())
    })
}

/// Put, HEAD, ranged GETs with If-Match at odd offsets, a stale ETag, a streamed body, a rewrite
/// that changes the ETag, a listing.
fn round_trip(server: &dyn RemoteServer, enforces_if_match: bool, lists: bool) {
    let key = "dir/model-00001.safetensors";
    let data = random_bytes(5 << 20 | 12345, 7);
    server.put(key, &data);
    let (store, path) = open(&server.url(key), &server.options());

    let meta = block_on(store.head(&path)).unwrap_or_else(|e| panic!("HEAD {key}: {e}"));
    assert_eq!(meta.size, data.len() as u64);
    let etag = meta.e_tag.clone().expect("the server gives an ETag");

    let n = data.len() as u64;
    for range in [1..4097, 12_345..12_345 + (3 << 20) + 7, n - 13..n] {
        let got = ranged(store.as_ref(), &path, range.clone(), &etag)
            .unwrap_or_else(|e| panic!("GET {key} {range:?} If-Match {etag}: {e}"));
        assert!(got == data[range.start as usize..range.end as usize], "bytes of {range:?} differ");
    }

    let stale = ranged(store.as_ref(), &path, 100..200, "\"not-the-etag\"");
    if enforces_if_match {
        assert!(
            matches!(stale, Err(object_store::Error::Precondition { .. })),
            "a wrong If-Match must fail with Precondition, got {stale:?}"
        );
    } else {
        assert!(stale.is_ok(), "this server ignores If-Match (so far): {stale:?}");
    }

    // The whole body as a stream of chunks.
    let streamed = block_on(async {
        let mut stream = store.get(&path).await?.into_stream();
        let mut all = Vec::new();
        while let Some(chunk) = stream.next().await {
            all.extend_from_slice(&chunk?);
        }
        Ok::<_, object_store::Error>(all)
    })
    .unwrap_or_else(|e| panic!("streaming {key}: {e}"));
    assert!(streamed == data, "streamed body differs");

    // A rewrite of the same size: a new ETag, and the old one no longer matches.
    let mut changed = data.clone();
    changed[0] ^= 0xff;
    server.put(key, &changed);
    let new_etag = block_on(store.head(&path)).unwrap_or_else(|e| panic!("HEAD {key}: {e}")).e_tag.expect("ETag");
    assert_ne!(new_etag, etag, "a rewrite must change the ETag");
    if enforces_if_match {
        let old = ranged(store.as_ref(), &path, 0..10, &etag);
        assert!(matches!(old, Err(object_store::Error::Precondition { .. })), "the old ETag after a rewrite: {old:?}");
    }
    // A version pin (GCS: the generation) finds a rewrite too: the old version is gone.
    if let Some(version) = meta.version.clone() {
        let pinned = block_on(async {
            let options =
                GetOptions { range: Some(GetRange::Bounded(0..10)), version: Some(version), ..Default::default() };
            store.get_opts(&path, options).await?.bytes().await
        });
        assert!(
            matches!(pinned, Err(object_store::Error::NotFound { .. })),
            "the old version after a rewrite: {pinned:?}"
        );
    }

    if lists {
        let root = build_store(server.url("").trim_end_matches('/'), &server.options(), None);
        let listing = block_on(root.list_with_delimiter(Some(&Path::from("dir"))))
            .unwrap_or_else(|e| panic!("listing dir/: {e}"));
        let names: Vec<String> = listing.objects.iter().map(|m| m.location.to_string()).collect();
        assert_eq!(names, vec![key.to_string()]);
    }

    server.delete(key);
    let gone = block_on(store.head(&path));
    assert!(matches!(gone, Err(object_store::Error::NotFound { .. })), "after delete: {gone:?}");
}

#[test]
fn s3_moto_round_trip() {
    let Some(server) = S3Server::start() else { return };
    round_trip(&server, true, true);
}

#[test]
fn s3_moto_checks_signatures() {
    let Some(server) = S3Server::start() else { return };
    server.put("signed.bin", b"hello");
    let mut options = server.options();
    for (k, v) in options.iter_mut() {
        if k == "aws_secret_access_key" {
            *v = "not-the-secret".into();
        }
    }
    let (store, path) = open(&server.url("signed.bin"), &options);
    let result = block_on(store.head(&path));
    assert!(
        matches!(result, Err(object_store::Error::PermissionDenied { .. }) | Err(object_store::Error::Generic { .. })),
        "a bad signature must be refused, got {result:?}"
    );
    let result = block_on(store.get(&path)).map(|_| ());
    let text = format!("{result:?}");
    assert!(text.contains("SignatureDoesNotMatch"), "{text}");
}

#[test]
fn http_nginx_round_trip() {
    let Some(server) = HttpServer::start() else { return };
    let lists = server.propfind;
    round_trip(&server, true, lists);
}

#[test]
fn azure_azurite_round_trip() {
    let Some(server) = AzureServer::start() else { return };
    round_trip(&server, true, true);
}

#[test]
fn gcs_fake_gcs_server_round_trip() {
    let Some(server) = GcsServer::start() else { return };
    // fake-gcs-server ignores If-Match; its generation (the version) pins an object.
    round_trip(&server, false, true);
}

/// Every option key the fixtures hand out is one object_store's builders know (build_store
/// refuses unknown keys; parse_url_opts would drop them silently).
#[test]
fn option_keys_are_config_keys() {
    use object_store::aws::AmazonS3ConfigKey;
    use object_store::azure::AzureConfigKey;
    use object_store::gcp::GoogleConfigKey;
    use object_store::ClientConfigKey;
    for key in [
        "aws_endpoint",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_region",
        "aws_allow_http",
        "aws_virtual_hosted_style_request",
        "timeout",
        "connect_timeout",
    ] {
        key.parse::<AmazonS3ConfigKey>().unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    for key in [
        "azure_storage_account_name",
        "azure_storage_account_key",
        "azure_storage_endpoint",
        "azure_storage_use_emulator",
        "allow_http",
        "azure_allow_http",
        "timeout",
    ] {
        key.parse::<AzureConfigKey>().unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    for key in ["google_service_account_key", "google_service_account", "allow_http", "google_allow_http", "timeout"] {
        key.parse::<GoogleConfigKey>().unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    for key in ["allow_http", "timeout", "connect_timeout"] {
        key.parse::<ClientConfigKey>().unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    // Not a client key: the HTTP store takes only ClientConfigKey.
    assert!("aws_allow_http".parse::<ClientConfigKey>().is_err());
}

/// Each schedule against object_store's retries, through a proxy in front of `server`.
fn proxy_schedules(server: &dyn RemoteServer, signed: bool) {
    let key = "proxied.bin";
    let data = random_bytes(1 << 20, 3);
    server.put(key, &data);
    let path = Path::from(key);
    let etag = block_on(server.store().head(&path)).unwrap_or_else(|e| panic!("HEAD {key}: {e}")).e_tag.expect("ETag");

    // Pass-through: range, If-Match and the signature go through unchanged.
    let proxy = FaultProxy::start(&server.endpoint(), Schedule::PassThrough);
    let store = server.store_via(&proxy.endpoint(), None);
    let got = ranged(store.as_ref(), &path, 1000..3000, &etag).expect("through the proxy");
    assert!(got == data[1000..3000]);
    let seen = proxy.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].outcome, Outcome::Forwarded(206));
    assert_eq!(seen[0].header("if-match"), Some(etag.as_str()));
    assert_eq!(seen[0].header("range"), Some("bytes=1000-2999"));
    if signed {
        assert!(seen[0].header("authorization").is_some());
    }

    // N failures, then the retry gets through (object_store's default retry).
    for status in [503, 500, 429] {
        proxy.set_schedule(Schedule::FailThenPass { status, times: 2 });
        let before = proxy.requests();
        let got =
            ranged(store.as_ref(), &path, 5..50, &etag).unwrap_or_else(|e| panic!("{status} twice, then a pass: {e}"));
        assert!(got == data[5..50]);
        assert_eq!(proxy.requests() - before, 3, "{status}: 2 failures and 1 pass");
    }

    // Always failing: retries give up (a short retry configuration: none is settable through
    // storage options, and the default one takes about a minute to give up).
    proxy.set_schedule(Schedule::AlwaysFail { status: 503 });
    let quick = server.store_via(&proxy.endpoint(), Some(quick_retry(2)));
    let before = proxy.requests();
    let failed = ranged(quick.as_ref(), &path, 0..10, &etag);
    assert!(failed.is_err(), "always 503 must fail");
    assert!(format!("{failed:?}").contains("503"), "{failed:?}");
    assert_eq!(proxy.requests() - before, 3, "1 try and 2 retries");

    // Stalls: the client's timeout (a storage option) ends each try.
    let mut options = server.options_via(&proxy.endpoint());
    options.push(("timeout".into(), "1s".into()));
    let root = server.url_via(&proxy.endpoint(), "");
    let timing_out = build_store(root.trim_end_matches('/'), &options, Some(quick_retry(1)));
    proxy.set_schedule(Schedule::AlwaysStall);
    let before = proxy.requests();
    let start = Instant::now();
    let stalled = ranged(timing_out.as_ref(), &path, 0..10, &etag);
    let took = start.elapsed();
    assert!(stalled.is_err(), "a stalled server must time out");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(20), "two 1 s timeouts took {took:?}");
    assert_eq!(proxy.requests() - before, 2, "1 try and 1 retry");

    // One stall, then the retry after the timeout gets through.
    proxy.set_schedule(Schedule::StallThenPass { times: 1 });
    let got = ranged(timing_out.as_ref(), &path, 7..77, &etag).expect("stall then pass");
    assert!(got == data[7..77]);

    drop(proxy);
    server.delete(key);
}

#[test]
fn fault_proxy_in_front_of_moto() {
    let Some(server) = S3Server::start() else { return };
    proxy_schedules(&server, true);
}

#[test]
fn fault_proxy_in_front_of_nginx() {
    let Some(server) = HttpServer::start() else { return };
    proxy_schedules(&server, false);
}

#[test]
fn fault_proxy_in_front_of_azurite() {
    let Some(server) = AzureServer::start() else { return };
    proxy_schedules(&server, true);
}

#[test]
fn fault_proxy_in_front_of_fake_gcs() {
    let Some(server) = GcsServer::start() else { return };
    proxy_schedules(&server, false);
}
