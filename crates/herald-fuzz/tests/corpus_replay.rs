//! Replays every fuzz corpus and regression input through its target on
//! the stable toolchain, so that what the fuzzers found (and every crash
//! fixed since) is checked by `cargo test`.
#![allow(clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn every_corpus_and_regression_input_replays_cleanly() {
    let mut total = 0;
    for (target, run) in herald_fuzz::TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target} is missing or empty: the corpus is kept in the repository"
        );
        let regressions = files(&fuzz_dir().join("regressions").join(target));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).expect("a corpus file");
            // A panic names the input: replay it with the fuzz target.
            eprintln!("{target}: {}", path.display());
            run(&data);
            total += 1;
        }
    }
    assert!(total >= herald_fuzz::TARGETS.len());
}

#[test]
fn seeds_pass_their_targets() {
    for (target, seeds) in herald_fuzz::seeds::all() {
        let run = herald_fuzz::TARGETS
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, f)| *f)
            .unwrap_or_else(|| panic!("no target {target}"));
        assert!(!seeds.is_empty(), "{target} has no seeds");
        let before = herald_fuzz::accepted();
        for s in &seeds {
            run(s);
        }
        // Some seeds are refusals on purpose (an unsigned token, a CSR
        // asking to be a CA); the others reach the accepting path, where
        // the round trips and properties are asserted.
        let accepted = herald_fuzz::accepted() - before;
        eprintln!(
            "{target}: {} seeds reached {accepted} accepting paths",
            seeds.len()
        );
        assert!(
            accepted > 0,
            "no seed of {target} reaches its accepting path"
        );
    }
}
