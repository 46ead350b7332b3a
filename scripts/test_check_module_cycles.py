"""Tests of scripts/check_module_cycles.py on small crate trees written to a temporary directory.

Run: .venv/bin/python -m pytest -q scripts/test_check_module_cycles.py
"""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "check_module_cycles.py"

_spec = importlib.util.spec_from_file_location("check_module_cycles", SCRIPT)
cmc = importlib.util.module_from_spec(_spec)
sys.modules["check_module_cycles"] = cmc
_spec.loader.exec_module(cmc)


def tree(root: Path, files: dict[str, str]) -> Path:
    """Writes `files` (paths relative to src/) and returns the src/ directory."""
    src = root / "src"
    for rel, text in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return src


def check(src: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(src)], capture_output=True, text=True, timeout=60)


def edges(src: Path) -> set[tuple[str, str]]:
    graph = cmc.build_graph(cmc.load_tree(src))
    return {(cmc.show(a), cmc.show(b)) for a, outs in graph.items() for b in outs}


# The format layer opens files through `source` (ShardIndex::read), which reads indexes.
FORMAT_SOURCE = {
    "lib.rs": "pub mod format;\npub mod source;\npub use format::Dtype;\n",
    "format/mod.rs": """\
        mod dtype;
        pub(crate) mod index;
        pub use dtype::Dtype;
        pub use index::ShardIndex;
        """,
    "format/dtype.rs": "pub enum Dtype { F32 }\n",
    "format/index.rs": """\
        use crate::format::Dtype;
        pub struct ShardIndex(Dtype);
        impl ShardIndex {
            pub fn read(p: &std::path::Path) -> std::io::Result<std::fs::File> {
                crate::source::open_regular(p)
            }
        }
        """,
    "source/mod.rs": """\
        mod local;
        pub use local::open_regular;
        use crate::format::ShardIndex;
        pub struct Checkpoint(Vec<ShardIndex>);
        """,
    "source/local.rs": """\
        use super::Checkpoint;
        pub fn open_regular(p: &std::path::Path) -> std::io::Result<std::fs::File> { std::fs::File::open(p) }
        pub fn open(_: &Checkpoint) {}
        """,
}


def test_format_index_and_source_is_a_cycle(tmp_path):
    r = check(tree(tmp_path, FORMAT_SOURCE))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "format -> source -> format" in r.stdout
    assert "format::index -> source::local" in r.stdout
    assert "`crate::source::open_regular`" in r.stdout


def test_format_without_source_passes(tmp_path):
    files = dict(FORMAT_SOURCE)
    files["format/index.rs"] = """\
        use crate::format::Dtype;
        pub struct ShardIndex(Dtype);
        impl ShardIndex {
            pub fn from_reader(r: impl std::io::Read) -> Self { let _ = r; ShardIndex(Dtype::F32) }
        }
        """
    r = check(tree(tmp_path, files))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no module cycles" in r.stdout


# `pipeline` takes `CancelToken` through `loader`'s re-export; it lives in `cancel`.
LOADER_PIPELINE = {
    "lib.rs": "mod cancel;\nmod loader;\nmod pipeline;\npub use loader::Loader;\n",
    "cancel.rs": "pub struct CancelToken;\n",
    "loader/mod.rs": """\
        mod run;
        pub use crate::cancel::CancelToken;
        pub struct Loader { cancel: Option<CancelToken> }
        """,
    "loader/run.rs": """\
        use super::Loader;
        pub fn go(l: &Loader) { crate::pipeline::run(l.cancel.as_ref()) }
        """,
    "pipeline.rs": """\
        use crate::loader::CancelToken;
        pub fn run(_: Option<&CancelToken>) {}
        """,
}


def test_loader_and_pipeline_through_a_reexport_is_a_cycle(tmp_path):
    r = check(tree(tmp_path, LOADER_PIPELINE))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "loader -> pipeline -> loader" in r.stdout
    assert "re-exported by loader" in r.stdout


def test_loader_and_pipeline_through_the_defining_module_passes(tmp_path):
    files = dict(LOADER_PIPELINE)
    files["pipeline.rs"] = "pub fn run(_: Option<&crate::cancel::CancelToken>) {}\n"
    src = tree(tmp_path, files)
    r = check(src)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("pipeline", "cancel") in edges(src)


# `stage` takes `Fence` and `HostMemory` from `sink`, whose CUDA layer builds stage rings.
SINK_STAGE = {
    "lib.rs": "pub mod sink;\npub mod stage;\n",
    "sink/mod.rs": """\
        pub mod cuda;
        mod host;
        pub use host::HostMemory;
        pub struct Fence;
        pub trait Sink { fn deliver(&mut self) -> Fence; }
        pub fn cuda_available() -> bool { cuda::device_count() > 0 }
        """,
    "sink/host.rs": "pub struct HostMemory;\nimpl super::Sink for HostMemory { fn deliver(&mut self) -> super::Fence { super::Fence } }\n",
    "sink/cuda/mod.rs": """\
        pub mod memory;
        use crate::sink::{Fence, Sink};
        use crate::stage::{StagingMemory, StagingRing};
        pub fn device_count() -> usize { 0 }
        pub fn pinned_ring() -> StagingRing { StagingRing(vec![Box::new(memory::PinnedBuf) as Box<dyn StagingMemory>]) }
        """,
    "sink/cuda/memory.rs": """\
        use crate::stage::StagingMemory;
        pub struct PinnedBuf;
        impl StagingMemory for PinnedBuf {}
        """,
    "stage/mod.rs": """\
        pub mod ring;
        pub use ring::{StagingMemory, StagingRing};
        use crate::sink::Fence;
        """,
    "stage/ring.rs": """\
        use crate::sink::{Fence, HostMemory};
        pub trait StagingMemory {}
        pub struct StagingRing(pub Vec<Box<dyn StagingMemory>>);
        """,
}


def test_sink_stage_and_sink_cuda_is_a_cycle(tmp_path):
    r = check(tree(tmp_path, SINK_STAGE))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "sink -> stage -> sink" in r.stdout
    assert "sink::cuda -> stage::ring" in r.stdout or "sink::cuda::memory -> stage::ring" in r.stdout
    assert "stage::ring -> sink" in r.stdout or "stage -> sink" in r.stdout


def test_memory_and_cuda_as_leaves_pass(tmp_path):
    # The layout the issue asks for: memory under both stage and sink, cuda a leaf.
    src = tree(
        tmp_path,
        {
            "lib.rs": "pub mod cuda;\npub mod memory;\npub mod sink;\npub mod stage;\n",
            "memory.rs": "pub struct Fence;\npub struct HostMemory;\npub trait StagingMemory {}\n",
            "cuda/mod.rs": "pub mod memory;\npub fn device_count() -> usize { 0 }\n",
            "cuda/memory.rs": "pub struct PinnedBuf;\nimpl crate::memory::StagingMemory for PinnedBuf {}\n",
            "sink/mod.rs": """\
                pub mod cuda;
                use crate::memory::Fence;
                pub trait Sink { fn deliver(&mut self) -> Fence; }
                """,
            "sink/cuda.rs": "use crate::cuda::memory::PinnedBuf;\nuse super::Sink;\n",
            "stage/mod.rs": """\
                pub mod ring;
                pub use ring::StagingRing;
                use crate::memory::{Fence, HostMemory};
                """,
            "stage/ring.rs": """\
                use crate::memory::StagingMemory;
                pub struct StagingRing(pub Vec<Box<dyn StagingMemory>>);
                pub fn pinned_ring() -> StagingRing { StagingRing(vec![Box::new(crate::cuda::memory::PinnedBuf)]) }
                """,
        },
    )
    r = check(src)
    assert r.returncode == 0, r.stdout + r.stderr
    e = edges(src)
    assert ("stage::ring", "cuda::memory") in e and ("sink::cuda", "cuda::memory") in e
    assert not any(a.startswith("cuda") and b.split("::")[0] in ("sink", "stage") for a, b in e)


def test_acyclic_tree_with_folder_modules_passes(tmp_path):
    # A folder's mod.rs and its files use each other (the folder's inside); comments, strings
    # and #[cfg(test)] code name other modules without making edges.
    src = tree(
        tmp_path,
        {
            "lib.rs": "mod a;\nmod b;\n#[cfg(test)]\nmod b_tests;\n",
            "a/mod.rs": """\
                mod x;
                pub struct Shared;
                pub fn f() { x::g() }
                """,
            "a/x.rs": """\
                use super::Shared;
                /// Not an import: [`crate::b::B`].
                pub fn g() { let _s = "crate::b::B"; let _c = '"'; let _ = Shared; }
                #[cfg(test)]
                mod tests {
                    use crate::b::B;
                }
                """,
            "b.rs": "pub struct B;\npub fn h() { crate::a::f() }\n",
            "b_tests.rs": "use crate::b::B;\nfn t() { crate::a::f(); let _ = crate::b::h; }\n",
        },
    )
    r = check(src)
    assert r.returncode == 0, r.stdout + r.stderr
    e = edges(src)
    assert e == {("a", "a::x"), ("a::x", "a"), ("b", "a")}, e


def test_reexports_resolve_to_the_defining_module(tmp_path):
    # `format` re-exports its files' items, and the crate root re-exports `format`'s: a file that
    # uses `crate::format::Dtype` depends on `format::dtype`, not on `format`, so neither
    # re-export makes a cycle, and `source` depends on the files, not on the facade.
    src = tree(
        tmp_path,
        {
            "lib.rs": "pub mod format;\npub mod source;\npub use format::{Dtype, ShardIndex};\n",
            "format/mod.rs": """\
                mod dtype;
                mod index;
                pub use dtype::Dtype;
                pub use index::ShardIndex;
                pub const MAX: usize = 1;
                """,
            "format/dtype.rs": "pub enum Dtype { F32 }\n",
            "format/index.rs": """\
                use crate::format::Dtype;
                pub struct ShardIndex(Dtype, [u8; super::MAX]);
                """,
            "source/mod.rs": """\
                mod local;
                use crate::format::ShardIndex;
                pub fn dtype() -> crate::format::Dtype { crate::format::Dtype::F32 }
                """,
            "source/local.rs": "use crate::format::ShardIndex as Index;\npub fn f(_: Index) {}\n",
        },
    )
    r = check(src)
    assert r.returncode == 0, r.stdout + r.stderr
    e = edges(src)
    assert ("format::index", "format::dtype") in e
    assert ("format::index", "format") in e  # super::MAX is format's own item
    assert ("format", "format::index") in e  # the re-export
    assert ("source", "format::index") in e and ("source", "format::dtype") in e
    assert ("source::local", "format::index") in e
    assert not any(b == "format" for a, b in e if a.startswith("source"))


def test_the_repository_check_runs_in_seconds():
    import time

    t = time.monotonic()
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    assert time.monotonic() - t < 10


def test_root_reexports_used_inside_the_crate_are_errors(tmp_path):
    files = {
        "lib.rs": """\
            mod cancel;
            pub mod format;
            mod loader;
            mod user;
            pub use format::Dtype;
            pub use loader::CancelToken;
            pub fn root_own() -> Dtype { Dtype::F32 }
            """,
        "cancel.rs": "pub struct CancelToken;\n",
        "format/mod.rs": "mod dtype;\npub use dtype::Dtype;\n",
        "format/dtype.rs": "pub enum Dtype { F32 }\n",
        "loader/mod.rs": "pub use crate::cancel::CancelToken;\n",
        "user.rs": """\
            use crate::{format, Dtype};
            pub fn f(_: &crate::CancelToken) -> Dtype { crate::root_own() }
            """,
    }
    r = check(tree(tmp_path / "bad", files))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no module cycles" in r.stdout
    assert "src/user.rs:1 `crate::Dtype`: write `crate::format::Dtype`" in r.stdout
    assert "src/user.rs:2 `crate::CancelToken`: write `crate::cancel::CancelToken`" in r.stdout
    # `crate::format` (a module) and `crate::root_own` (the root's own item) are fine.
    assert "crate::format`" not in r.stdout and "root_own" not in r.stdout
    files["user.rs"] = """\
        use crate::format::Dtype;
        pub fn f(_: &crate::cancel::CancelToken) -> Dtype { crate::root_own() }
        """
    r = check(tree(tmp_path / "good", files))
    assert r.returncode == 0, r.stdout + r.stderr
