#!/usr/bin/env python3
"""Loading a checkpoint from a loopback object server: weightstream against the baselines.

Run through scripts/remote_bench.sh, which installs what this needs; see its header for usage.

Servers (each started here on a free loopback port, stopped at the end):
  nginx   plain HTTP, sendfile on, serving a directory of links to the checkpoint's files
  s3rver  S3 (npm `s3rver`, file-backed, Node); the default S3 server
  moto    S3 (PyPI `moto[server]`); far too slow for a 2 GiB object (see BENCHMARKS.md), kept
          for small files

Contenders, one run each per round, in the same order every round (A B C A B C ...):
  ceiling   curl: the whole object(s) as 8 MiB ranged GETs, 8 at a time, to /dev/null
            (one curl process, --parallel): what the server can give
  ws-cpu    weightstream load URL --device cpu
  ws-null   weightstream load URL --device null
  download  what a user writes without a remote loader: download (aws s3 cp for S3, curl for
            HTTP) to a temp dir on the checkpoint's disk, then weightstream load LOCAL
            --device cpu; the copy is deleted after each round
  runai     Run:ai Model Streamer (SafetensorsStreamer, S3 only), every tensor touched

Times are wall-clock seconds of the whole command(s), process start and exit included; peak
RSS is /usr/bin/time's %M (the larger of the two processes for `download`). "in-process s" is
the load's own time where the tool reports one (weightstream's JSON `seconds`; Run:ai's stream
time after its imports). Medians over rounds; the output is a markdown table.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = ROOT / ".venv"
MiB = 1 << 20
ACCESS_KEY = "S3RVER"  # s3rver's built-in key pair; moto accepts any
SECRET_KEY = "S3RVER"
BUCKET = "bench"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"remote_bench: {what} exited ({proc.returncode}) while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"remote_bench: {what} did not listen on {port} in {timeout} s")


def checkpoint_files(path):
    """(name relative to the served root, local path, size) for each file to serve."""
    p = Path(path).resolve()
    if p.is_file():
        return [(p.name, p, p.stat().st_size)], p.name
    files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    if not files:
        raise SystemExit(f"remote_bench: no files in {p}")
    out = [(f"{p.name}/{f.relative_to(p).as_posix()}", f, f.stat().st_size) for f in files]
    return out, p.name


def entry_key(files, root_name, is_dir, entry):
    """What the loaders are pointed at: the file, the folder's index JSON, or the folder."""
    if entry:
        return f"{root_name}/{entry}" if is_dir else entry
    if not is_dir:
        return files[0][0]
    idx = [k for k, _, _ in files if k.endswith(".safetensors.index.json")]
    return idx[0] if len(idx) == 1 else f"{root_name}/"


class Servers:
    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.procs = []

    def start_nginx(self, files):
        d = self.workdir / "nginx"
        www = d / "www"
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        for key, local, _ in files:
            dst = www / key
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.symlink_to(local)
        port = free_port()
        conf = d / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers read what root can
        conf.write_text(f"""{user}worker_processes 2;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  default_type application/octet-stream;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  server {{ listen 127.0.0.1:{port}; root {www}; }}
}}
""")
        p = subprocess.Popen(["nginx", "-p", str(d), "-c", str(conf), "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=open(d / "stderr", "w"))
        self.procs.append(p)
        wait_port(port, p, "nginx")
        return f"http://127.0.0.1:{port}"

    def start_s3(self, kind, files, data_dir):
        port = free_port()
        if kind == "s3rver":
            exe = VENV / "node" / "node_modules" / ".bin" / "s3rver"
            data = Path(data_dir)
            data.mkdir(parents=True, exist_ok=True)
            cmd = [str(exe), "-d", str(data), "-a", "127.0.0.1", "-p", str(port), "-s",
                   "--allow-mismatched-signatures", "--no-vhost-buckets",
                   "--configure-bucket", BUCKET]
        else:
            cmd = [str(VENV / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                             stderr=open(self.workdir / f"{kind}.log", "w"))
        self.procs.append(p)
        wait_port(port, p, kind)
        endpoint = f"http://127.0.0.1:{port}"
        upload(endpoint, files)
        return endpoint

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if "nginx" not in str(p.args) else signal.SIGQUIT)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def s3_env(endpoint):
    env = dict(os.environ)
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
               AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1",
               AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true",
               AWS_ALLOW_HTTP="true")
    return env


def upload(endpoint, files):
    import boto3
    from boto3.s3.transfer import TransferConfig

    e = s3_env(endpoint)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"])
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.ClientError:
        pass  # s3rver's --configure-bucket made it
    except Exception as err:  # BucketAlreadyOwnedByYou and friends
        if "Bucket" not in type(err).__name__:
            raise
    cfg = TransferConfig(multipart_chunksize=64 * MiB, max_concurrency=4)
    for key, local, size in files:
        try:
            if s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"] == size:
                log(f"  s3://{BUCKET}/{key} already there ({size} bytes)")
                continue
        except Exception:
            pass
        t = time.perf_counter()
        s3.upload_file(str(local), BUCKET, key, Config=cfg)
        log(f"  uploaded s3://{BUCKET}/{key} ({size} bytes) in {time.perf_counter() - t:.1f} s")


def curl_config(base_url, files, chunk, path):
    groups = []
    for key, _, size in files:
        for off in range(0, size, chunk):
            end = min(off + chunk, size) - 1
            groups.append(f'url = "{base_url}/{key}"\nrange = "{off}-{end}"\n'
                          'output = "/dev/null"\nsilent\nshow-error\nfail\n')
    Path(path).write_text("next\n".join(groups))


def timed(cmd, env=None, stdout_json=False):
    """Run cmd under /usr/bin/time; (seconds, peak RSS bytes, stdout)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t = time.perf_counter()
        r = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        dt = time.perf_counter() - t
        if r.returncode != 0:
            msg = [ln.strip() for ln in (r.stderr or r.stdout).splitlines()
                   if ln.strip() and "--:--" not in ln and not ln.startswith("DL%")]
            raise RuntimeError(f"{Path(cmd[0]).name} exited {r.returncode}: "
                               + " / ".join(dict.fromkeys(msg[-3:])))
        lines = [ln for ln in Path(rss.name).read_text().splitlines() if ln.strip()]
        return dt, int(lines[-1]) * 1024, r.stdout


def ws_seconds(stdout):
    try:
        return float(json.loads(stdout)["seconds"])
    except Exception:
        return None


class Contender:
    def __init__(self, name, fn):
        self.name, self.fn = name, fn
        self.secs, self.rss, self.inner, self.errors = [], [], [], []

    def run(self, pre_run):
        try:
            if pre_run:
                self.fn()  # untimed: the timed run gets the same first-touch costs as others
            s, rss, inner = self.fn()
        except Exception as err:  # recorded, the rest goes on
            self.errors.append(str(err))
            log(f"    {self.name}: FAILED {err}")
            return
        self.secs.append(s)
        self.rss.append(rss)
        if inner is not None:
            self.inner.append(inner)
        extra = f" (in-process {inner:.2f} s)" if inner is not None else ""
        log(f"    {self.name}: {s:.2f} s{extra}, peak RSS {rss / MiB:.0f} MiB")


def build_contenders(a, server, base, files, key, scratch, total, is_dir, root_name):
    """The contenders against one server; base is its URL, key what the loaders open."""
    s3 = server != "nginx"
    env = s3_env(base) if s3 else dict(os.environ)
    url = f"s3://{BUCKET}/{key}" if s3 else f"{base}/{key}"
    opts = []
    if s3:
        for kv in (f"aws_endpoint={base}", f"aws_access_key_id={ACCESS_KEY}",
                   f"aws_secret_access_key={SECRET_KEY}", "aws_region=us-east-1",
                   "allow_http=true"):
            opts += ["--storage-option", kv]
    cfg = Path(a.workdir) / f"curl_{server}.cfg"
    curl_config(base if not s3 else f"{base}/{BUCKET}", files, a.ceiling_chunk, cfg)
    out = []

    def ceiling():
        s, rss, _ = timed(["curl", "--silent", "--show-error", "--parallel", "--parallel-max",
                           str(a.ceiling_parallel), "-K", str(cfg)])
        return s, rss, None
    out.append(Contender(f"curl ceiling ({a.ceiling_parallel} × {a.ceiling_chunk // MiB} MiB "
                         "ranged GETs, /dev/null)", ceiling))

    def ws(device):
        def f():
            s, rss, so = timed([a.weightstream, "load", url, "--device", device, "--json",
                                "--quiet", *opts, *a.ws_arg], env=env)
            return s, rss, ws_seconds(so)
        return f
    if a.weightstream:
        for dev in a.devices.split(","):
            out.append(Contender(f"weightstream load URL --device {dev}", ws(dev)))

    def download():
        d = Path(tempfile.mkdtemp(prefix="remote_bench_dl_", dir=scratch))
        try:
            t = time.perf_counter()
            if s3:
                if is_dir:  # the whole folder, whatever the loaders open in it
                    src, dst, rec = f"s3://{BUCKET}/{root_name}/", d / root_name, ["--recursive"]
                else:
                    src, dst, rec = f"s3://{BUCKET}/{key}", d / key, []
                _, rss1, _ = timed([str(VENV / "bin" / "aws"), "s3", "cp", "--only-show-errors",
                                    *rec, src, str(dst)], env=env)
            else:
                cmd = ["curl", "--silent", "--show-error", "--fail", "--create-dirs"]
                for k, _, _ in files:
                    cmd += ["-o", str(d / k), f"{base}/{k}"]
                _, rss1, _ = timed(cmd)
            _, rss2, so = timed([a.weightstream, "load", str(d / key), "--device",
                                 a.baseline_device, "--json", "--quiet"])
            return time.perf_counter() - t, max(rss1, rss2), ws_seconds(so)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    if a.weightstream:
        how = "aws s3 cp" if s3 else "curl -o"
        out.append(Contender(f"download ({how}) + weightstream load LOCAL --device "
                             f"{a.baseline_device}", download))

    if s3 and a.runai:
        renv = dict(env)
        renv.update(RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0",
                    RUNAI_STREAMER_CONCURRENCY=str(a.runai_concurrency),
                    RUNAI_STREAMER_CHUNK_BYTESIZE=str(a.runai_chunk))
        urls = [f"s3://{BUCKET}/{k}" for k, _, _ in files if k.endswith(".safetensors")]

        def runai():
            s, rss, so = timed([str(VENV / "bin" / "python"), str(Path(__file__).resolve()),
                                "_runai", str(total), *urls], env=renv)
            return s, rss, json.loads(so.strip().splitlines()[-1])["seconds"]
        out.append(Contender(f"Run:ai Model Streamer {a.runai_version} (S3, concurrency "
                             f"{a.runai_concurrency}, {a.runai_chunk // MiB} MiB chunks)", runai))
    return out


def runai_child(argv):
    """One Run:ai load in this process: stream the files, touch each tensor, print JSON."""
    expect, urls = int(argv[0]), argv[1:]
    t0 = time.perf_counter()
    from runai_model_streamer import SafetensorsStreamer
    t1 = time.perf_counter()
    n = nbytes = 0
    acc = 0.0
    with SafetensorsStreamer() as streamer:
        if len(urls) == 1:
            streamer.stream_file(urls[0])
        else:
            streamer.stream_files(urls)
        for _name, t in streamer.get_tensors():
            n += 1
            nbytes += t.numel() * t.element_size()
            if t.numel():
                acc += float(t.reshape(-1)[0])  # touch the tensor's memory
    t2 = time.perf_counter()
    print(json.dumps({"tensors": n, "bytes": nbytes, "import_s": t1 - t0, "seconds": t2 - t1,
                      "touched": acc == acc}))
    if nbytes > expect:
        raise SystemExit(f"runai: {nbytes} tensor bytes from {expect} file bytes")


def fs(x):
    return f"{x:.3f}" if x < 1 else f"{x:.2f}"


def med(xs):
    return statistics.median(xs) if xs else None


def table(results, total, rounds):
    lines = ["| server | contender | median s | GB/s | of ceiling | peak RSS MiB | in-process s |"
             " runs |", "|---|---|---|---|---|---|---|---|"]
    for server, conts in results:
        ceil = med(conts[0].secs) if conts and conts[0].name.startswith("curl") else None
        for c in conts:
            s = med(c.secs)
            if s is None:
                why = (c.errors[-1] if c.errors else "not run").replace("|", "/")[:160]
                lines.append(f"| {server} | {c.name} | failed | | | | | 0/{rounds}: {why} |")
                continue
            frac = f"{ceil / s:.2f}" if ceil else ""
            inner = fs(med(c.inner)) if c.inner else ""
            lines.append(f"| {server} | {c.name} | {fs(s)} | {total / s / 1e9:.2f} | {frac} | "
                         f"{med(c.rss) / MiB:.0f} | {inner} | {len(c.secs)}/{rounds} |")
    return "\n".join(lines)


def sweep(a, base, key, total, files):
    """weightstream against nginx over --remote-concurrency × --remote-request-size."""
    url = f"{base}/{key}"
    concs = [int(x) for x in a.sweep_concurrency.split(",")]
    sizes = [parse_size(x) for x in a.sweep_request_size.split(",")]
    configs = [(c, s) for c in concs for s in sizes]
    res = {cfg: [] for cfg in configs}
    cfg_file = Path(a.workdir) / "curl_sweep.cfg"
    curl_config(base, files, a.ceiling_chunk, cfg_file)
    ceiling = []
    for r in range(a.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]  # rotate the start
        log(f"  sweep round {r + 1}/{a.rounds}")
        try:
            ceiling.append(timed(["curl", "--silent", "--show-error", "--parallel",
                                  "--parallel-max", str(a.ceiling_parallel), "-K",
                                  str(cfg_file)])[0])
        except Exception as err:
            log(f"    curl ceiling: FAILED {err}")
        for c, s in order:
            cmd = [a.weightstream, "load", url, "--device", a.sweep_device, "--json", "--quiet",
                   "--remote-concurrency", str(c), "--remote-request-size", str(s), *a.ws_arg]
            try:
                if a.pre_run:
                    timed(cmd)
                dt, _, _ = timed(cmd)
                res[(c, s)].append(dt)
            except Exception as err:
                log(f"    c={c} s={s}: FAILED {err}")
    hdr = "| --remote-concurrency | " + " | ".join(
        f"--remote-request-size {s // MiB}M" for s in sizes) + " |"
    lines = [f"weightstream load {url.rsplit('/', 1)[-1]} --device {a.sweep_device} from nginx: "
             "median s (GB/s)" + (f"; curl ceiling in the same rounds {fs(med(ceiling))} s "
                                   f"({total / med(ceiling) / 1e9:.2f} GB/s)" if ceiling else ""),
             "", hdr, "|---|" + "---|" * len(sizes)]
    best = min((med(v), k) for k, v in res.items() if v) if any(res.values()) else None
    for c in concs:
        cells = []
        for s in sizes:
            m = med(res[(c, s)])
            cell = "failed" if m is None else f"{fs(m)} ({total / m / 1e9:.2f})"
            if best and (c, s) == best[1]:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_size(x):
    x = x.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(x[-1:], 1)
    return int(x.rstrip("KMG")) * mult


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_runai":
        return runai_child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a .safetensors file or a folder of them")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-pre-run", dest="pre_run", action="store_false",
                    help="skip the untimed run of each command right before its timed run "
                    "(this VM pays first touches of fresh memory unevenly; see BENCHMARKS.md)")
    ap.add_argument("--servers", default="nginx,s3rver",
                    help="comma list of nginx, s3rver, moto (default nginx,s3rver)")
    ap.add_argument("--weightstream", default="", help="the weightstream binary ('' to skip it)")
    ap.add_argument("--devices", default="cpu,null",
                    help="the remote weightstream loads' targets, one row each (default cpu,null)")
    ap.add_argument("--baseline-device", default="cpu",
                    help="the download baseline's local load target (default cpu)")
    ap.add_argument("--ws-arg", action="append", default=[],
                    help="extra argument for every remote weightstream load (repeatable)")
    ap.add_argument("--entry", default="",
                    help="for a folder: the file inside it the loaders open (default: its "
                    "*.safetensors.index.json, else the folder itself)")
    ap.add_argument("--no-runai", dest="runai", action="store_false")
    ap.add_argument("--runai-concurrency", type=int, default=8,
                    help="RUNAI_STREAMER_CONCURRENCY (its documented default for object "
                    "storage: 8)")
    ap.add_argument("--runai-chunk", type=parse_size, default=8 * MiB,
                    help="RUNAI_STREAMER_CHUNK_BYTESIZE (documented default for object storage: 8M)")
    ap.add_argument("--ceiling-parallel", type=int, default=8)
    ap.add_argument("--ceiling-chunk", type=parse_size, default=8 * MiB)
    ap.add_argument("--sweep", action="store_true",
                    help="also sweep --remote-concurrency × --remote-request-size against nginx")
    ap.add_argument("--sweep-only", action="store_true", help="only the sweep")
    ap.add_argument("--sweep-concurrency", default="4,8,16")
    ap.add_argument("--sweep-request-size", default="4M,8M,16M")
    ap.add_argument("--sweep-device", default="cpu")
    ap.add_argument("--s3-data", default="",
                    help="s3rver's data folder, kept between runs so the upload is done once "
                    "(default: a temp folder, deleted)")
    ap.add_argument("--scratch", default="",
                    help="where the download baseline writes its copy (default: next to the "
                    "checkpoint, so on its disk)")
    a = ap.parse_args()

    files, root_name = checkpoint_files(a.path)
    is_dir = Path(a.path).is_dir()
    key = entry_key(files, root_name, is_dir, a.entry)
    st = [sz for k, _, sz in files if k.endswith(".safetensors")]
    total = sum(st) if st else sum(sz for _, _, sz in files)
    scratch = a.scratch or str(Path(a.path).resolve().parent)
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    try:
        import runai_model_streamer  # noqa: F401
        from importlib.metadata import version
        a.runai_version = version("runai-model-streamer")
    except Exception as err:
        a.runai_version = None
        if a.runai:
            log(f"remote_bench: Run:ai Model Streamer not importable ({err}); its row is skipped")
            a.runai = False

    work = tempfile.mkdtemp(prefix="remote_bench_")
    os.chmod(work, 0o755)  # nginx's workers drop root and must reach the links in it
    a.workdir = work
    own_s3 = not a.s3_data
    s3_data = a.s3_data or os.path.join(work, "s3rver")
    srv = Servers(work)
    try:
        bases = {}
        for s in servers:
            log(f"starting {s}")
            bases[s] = srv.start_nginx(files) if s == "nginx" else srv.start_s3(s, files, s3_data)
        pre = ", each timed run right after an untimed one" if a.pre_run else ""
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        print(f"# remote_bench {time.strftime('%Y-%m-%d %H:%M')}: {a.path} ({total} bytes, "
              f"{len(files)} file(s)), {a.rounds} rounds{pre}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f}, checkout at {rev or '?'}", flush=True)
        # Warm: the servers' files into the page cache, one untimed pass each.
        for s in servers:
            cfg = Path(work) / f"warm_{s}.cfg"
            curl_config(bases[s] if s == "nginx" else f"{bases[s]}/{BUCKET}", files, 8 * MiB, cfg)
            subprocess.run(["curl", "-s", "--parallel", "-K", str(cfg)], check=False,
                           stderr=subprocess.DEVNULL)

        results = []
        if not a.sweep_only:
            results = [(s, build_contenders(a, s, bases[s], files, key, scratch, total, is_dir,
                                            root_name))
                       for s in servers]
            for r in range(a.rounds):
                log(f"round {r + 1}/{a.rounds}")
                for s, conts in results:
                    log(f"  {s}")
                    for c in conts:
                        c.run(a.pre_run)
            print()
            print(table(results, total, a.rounds))
            if "s3rver" in servers and a.runai:
                print("\n(Run:ai: RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0, AWS_ENDPOINT_URL; "
                      "its in-process time excludes importing torch.)")
        if (a.sweep or a.sweep_only) and a.weightstream and "nginx" in bases:
            print()
            print(sweep(a, bases["nginx"], key, total, files))
        sys.stdout.flush()
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
        if own_s3:
            shutil.rmtree(s3_data, ignore_errors=True)


if __name__ == "__main__":
    main()
