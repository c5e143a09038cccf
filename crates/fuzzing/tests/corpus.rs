//! The committed seed corpora (`fuzz/corpus/<target>/`) are the ones `seeds` builds. Run with
//! `VMQ_WRITE_CORPUS=1` to (re)write them after changing a seed.

use std::path::PathBuf;

#[test]
fn committed_corpus_matches_the_seed_builders() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let write = std::env::var_os("VMQ_WRITE_CORPUS").is_some();
    for (target, seeds) in vmq_fuzzing::seeds::all() {
        let dir = root.join(target);
        if write {
            std::fs::create_dir_all(&dir).expect("create corpus directory");
        }
        for (name, bytes) in seeds {
            let path = dir.join(format!("seed-{name}"));
            if write {
                std::fs::write(&path, &bytes).expect("write seed");
            } else {
                let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(committed == bytes, "{} differs from its builder: VMQ_WRITE_CORPUS=1", path.display());
            }
        }
    }
}
