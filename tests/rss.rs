//! Opening a backbone maps it and reads only the header, the graph and the per-channel
//! records: the weights are not copied. Alone in its own test binary so that no other test's
//! allocations disturb the process's memory counters.
#![cfg(feature = "import")]

use edgecl::backbone::mmap::MappedFile;
use edgecl::backbone::Backbone;
use edgecl::format::graph::WeightFormat;
use edgecl::import::onnx::{import, ImportOptions};
use std::os::fd::AsRawFd;

/// (VmRSS, RssAnon) in bytes.
fn rss() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let get = |key: &str| -> usize {
        let l = status.lines().find(|l| l.starts_with(key)).unwrap();
        l.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 1024
    };
    (get("VmRSS:"), get("RssAnon:"))
}

fn open_and_measure(path: &std::path::Path) -> (usize, usize) {
    let before = rss();
    // SAFETY: the file is private to this test and not modified while mapped.
    #[allow(unsafe_code)]
    let map = unsafe { MappedFile::open(path) }.unwrap();
    let bb = Backbone::open(map.bytes()).unwrap();
    let after = rss();
    assert_eq!(bb.layers().len(), 94);
    (after.0.saturating_sub(before.0), after.1.saturating_sub(before.1))
}

#[test]
fn opening_lite0_does_not_copy_weights() {
    let path = std::env::temp_dir().join(format!("edgecl-rss-{}.ecb", std::process::id()));
    {
        let opts = ImportOptions {
            input: [3, 224, 224],
            mean: vec![0.5; 3],
            std: vec![0.5; 3],
            drop_head: false,
            name: "lite0".into(),
        };
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/models/efficientnet-lite0.onnx");
        let bytes = import(std::path::Path::new(model), &opts).unwrap().emit(WeightFormat::I8);
        std::fs::write(&path, &bytes).unwrap();
    }
    let file_len = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(file_len > 4_000_000, "the Lite0 file is {file_len} bytes");

    // Cold page cache, as on a device opening its backbone at boot: only what open reads
    // (header, graph, per-channel records) becomes resident.
    let f = std::fs::File::open(&path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: plain syscall on an open descriptor; advice only.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
    let (cold_rss, cold_anon) = open_and_measure(&path);
    eprintln!("cold cache: RSS +{cold_rss} B, anonymous +{cold_anon} B (file {file_len} B)");
    assert!(cold_rss < 1 << 20, "cold open grew RSS by {cold_rss} bytes");

    // Warm page cache: the kernel may map whole large page-cache folios (2 MB on ext4 with
    // Linux 6.x) on the first touch. Those pages are shared with the page cache, not copies;
    // anonymous memory, where a copy would land, still grows by less than 1 MB.
    let (warm_rss, warm_anon) = open_and_measure(&path);
    eprintln!("warm cache: RSS +{warm_rss} B, anonymous +{warm_anon} B");
    assert!(warm_anon < 1 << 20, "warm open grew anonymous memory by {warm_anon} bytes");
    assert!(warm_rss < file_len / 2, "warm open made {warm_rss} bytes of a {file_len}-byte file resident");
    let _ = std::fs::remove_file(path);
}
